//! The TTL sweeper: deletes expired rows in bounded batches, so that storage
//! does not grow with dead values. Reads never depend on it: an expired value
//! is invisible from the millisecond it expires, swept or not.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::store::Store;

/// A running sweeper. Dropping it stops the task.
pub struct Sweeper {
    passes: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Sweeper {
    /// Starts sweeping every `interval`, at most `batch` rows per transaction.
    pub fn spawn(store: Store, interval: Duration, batch: u32) -> Sweeper {
        let (tx, passes) = watch::channel(0u64);
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                sweep_all(&store, batch).await;
                tx.send_modify(|n| *n += 1);
            }
        });
        Sweeper { passes, task }
    }

    /// A receiver that changes after every completed pass.
    pub fn passes(&self) -> watch::Receiver<u64> {
        self.passes.clone()
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One pass: batches until fewer than `batch` rows were expired, then the
/// same for change log entries past their retention.
async fn sweep_all(store: &Store, batch: u32) {
    let expired = drain("expired values", batch, || store.sweep(batch)).await;
    if expired > 0 {
        tracing::debug!(deleted = expired, "swept expired values");
    }
    let compacted = drain("change log", batch, || store.compact(batch)).await;
    if compacted > 0 {
        tracing::debug!(removed = compacted, "compacted the change log");
    }
}

/// Runs `step` until it removes fewer than `batch`; how many it removed.
async fn drain<F, Fut>(what: &str, batch: u32, step: F) -> usize
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<usize, crate::error::ApiError>>,
{
    let mut total = 0usize;
    loop {
        match step().await {
            Ok(n) => {
                total += n;
                if n < batch as usize {
                    break;
                }
                // Let other writers in between batches.
                tokio::task::yield_now().await;
            }
            Err(e) => {
                tracing::warn!(error = ?e, what, "sweeper pass failed; retrying next interval");
                break;
            }
        }
    }
    total
}
