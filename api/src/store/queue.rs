//! The queue shared by a few workers (committers, readers), each of which
//! takes everything waiting at once.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc};

/// The receiving end, shared by the workers.
pub(super) struct Shared<T>(Arc<Mutex<mpsc::Receiver<T>>>);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

/// A queue of at most `capacity` waiting items.
pub(super) fn channel<T>(capacity: usize) -> (mpsc::Sender<T>, Shared<T>) {
    let (tx, rx) = mpsc::channel(capacity);
    (tx, Shared(Arc::new(Mutex::new(rx))))
}

impl<T> Shared<T> {
    /// Waits for an item, then takes those waiting behind it until their
    /// total `weight` reaches `max`. `None` once every sender is gone.
    pub(super) async fn next_group(
        &self,
        max: usize,
        weight: impl Fn(&T) -> usize,
    ) -> Option<Vec<T>> {
        let mut rx = self.0.lock().await;
        let first = rx.recv().await?;
        Some(take_waiting(&mut rx, first, max, weight))
    }

    /// [`Shared::next_group`] for a worker on a thread of its own, outside
    /// the async runtime.
    pub(super) fn blocking_next_group(
        &self,
        max: usize,
        weight: impl Fn(&T) -> usize,
    ) -> Option<Vec<T>> {
        let mut rx = self.0.blocking_lock();
        let first = rx.blocking_recv()?;
        Some(take_waiting(&mut rx, first, max, weight))
    }
}

/// `first` and the items waiting behind it, until their total `weight`
/// reaches `max`.
fn take_waiting<T>(
    rx: &mut mpsc::Receiver<T>,
    first: T,
    max: usize,
    weight: impl Fn(&T) -> usize,
) -> Vec<T> {
    let mut total = weight(&first);
    let mut group = vec![first];
    while total < max {
        match rx.try_recv() {
            Ok(next) => {
                total += weight(&next);
                group.push(next);
            }
            Err(_) => break,
        }
    }
    group
}
