//! Places counted against a cap: how many WebSockets, change feeds, ... this
//! node holds open, in all and per user. A place is claimed before the work
//! it stands for begins and given back when its guard is dropped, however
//! the work ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A count of open places, capped at each claim.
#[derive(Default)]
pub struct Count(AtomicU64);

/// One place of a [`Count`]; given back when dropped.
pub struct CountSlot(Arc<Count>);

impl Count {
    /// A place, unless `max` are taken already.
    pub fn claim(self: &Arc<Self>, max: u64) -> Option<CountSlot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| CountSlot(self.clone()))
    }

    /// The places taken now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for CountSlot {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Open places per user.
#[derive(Default)]
pub struct PerUser(Mutex<HashMap<i64, u64>>);

/// One place of a user in a [`PerUser`]; given back when dropped.
pub struct UserSlot {
    owner: Arc<PerUser>,
    user: i64,
}

impl PerUser {
    /// A place for `user`, unless they hold `max` already.
    pub fn claim(self: &Arc<Self>, user: i64, max: u64) -> Option<UserSlot> {
        let mut counts = self.0.lock().ok()?;
        let n = counts.entry(user).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(UserSlot {
            owner: self.clone(),
            user,
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.owner.0.lock()
            && let Some(n) = counts.get_mut(&self.user)
        {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_refuses_past_its_cap_and_takes_back_dropped_places() {
        let count = Arc::new(Count::default());
        let a = count.claim(2).expect("first");
        let _b = count.claim(2).expect("second");
        assert!(count.claim(2).is_none());
        drop(a);
        assert_eq!(count.get(), 1);
        assert!(count.claim(2).is_some());
    }

    #[test]
    fn per_user_places_are_capped_per_user_and_forgotten_at_zero() {
        let places = Arc::new(PerUser::default());
        let a = places.claim(1, 1).expect("user 1");
        assert!(places.claim(1, 1).is_none());
        let b = places.claim(2, 1).expect("user 2 has their own cap");
        drop(a);
        drop(b);
        assert!(places.0.lock().expect("lock").is_empty());
        assert!(places.claim(1, 1).is_some());
    }
}
