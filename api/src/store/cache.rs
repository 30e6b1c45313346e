//! A read cache of objects for SQLite, where one kvql process owns the
//! database and so sees every write.
//!
//! Writers (the committer, in commit order) store what they wrote, or a
//! tombstone for a delete. Readers fill misses from the database, but only if
//! no commit happened while they read: each commit bumps a sequence number
//! under the same lock that guards fills, so a slow reader can never put an
//! older value over a newer one.
//!
//! When most lookups miss (a working set larger than the cache), a fill
//! mostly evicts an entry as likely to be read again as the one it brings,
//! at the price of an insert and an eviction on the request's thread (with
//! 1,000,000 keys and the default 32 MiB, that made a GET slower with the
//! cache than without). Then only one miss in [`FILL_ONE_IN`] is filled:
//! keys read often still get in, and the cache's own admission (moka's
//! TinyLFU) still decides which stay.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::Object;
use super::sql::seconds_left;

#[derive(Clone)]
enum Entry {
    Value(Arc<Object>),
    /// Known to have no live value.
    Absent,
}

/// What the cache knows about a key.
pub(super) enum Lookup {
    /// A live value (TTL recomputed for `now`).
    Live(Object),
    /// No live value: absent, deleted or expired.
    Gone,
    /// Not cached; read the database.
    Unknown,
}

pub(super) struct Cache {
    map: moka::sync::Cache<(i64, Box<str>), Entry>,
    seq: Mutex<u64>,
    admission: Admission,
}

/// Lookups are counted in windows of this many.
const WINDOW: u32 = 1024;

/// More misses than this in a window, and the next window fills only one
/// miss in [`FILL_ONE_IN`].
const MOSTLY_MISSES: u32 = WINDOW * 3 / 4;

const FILL_ONE_IN: u32 = 8;

/// Whether recent lookups mostly missed (see the module's documentation).
/// The counts are approximate under concurrency, which is all they need.
#[derive(Default)]
struct Admission {
    lookups: AtomicU32,
    misses: AtomicU32,
    mostly_misses: AtomicBool,
    misses_since_fill: AtomicU32,
}

impl Admission {
    fn saw(&self, miss: bool) {
        if miss {
            self.misses.fetch_add(1, Relaxed);
        }
        // Exactly one lookup ends a window; those counted meanwhile are lost.
        if self.lookups.fetch_add(1, Relaxed) + 1 == WINDOW {
            self.lookups.store(0, Relaxed);
            let misses = self.misses.swap(0, Relaxed);
            self.mostly_misses.store(misses > MOSTLY_MISSES, Relaxed);
        }
    }

    fn admits(&self) -> bool {
        !self.mostly_misses.load(Relaxed)
            || self
                .misses_since_fill
                .fetch_add(1, Relaxed)
                .is_multiple_of(FILL_ONE_IN)
    }
}

/// Bytes counted for an entry besides its key and value: the map's own
/// bookkeeping, the object's fields and a second copy of the key.
const ENTRY_OVERHEAD: usize = 320;

/// The cache counts weight in units of this many bytes: moka sizes its
/// frequency sketch by the capacity, which must therefore not be in bytes.
const UNIT: u64 = 256;

impl Cache {
    pub(super) fn new(max_bytes: u64) -> Cache {
        let map = moka::sync::Cache::builder()
            .max_capacity((max_bytes / UNIT).max(1))
            .weigher(|k: &(i64, Box<str>), v: &Entry| {
                let value = match v {
                    Entry::Value(o) => o.data.len(),
                    Entry::Absent => 0,
                };
                let bytes = (2 * k.1.len() + value + ENTRY_OVERHEAD) as u64;
                u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
            })
            .build();
        Cache {
            map,
            seq: Mutex::new(0),
            admission: Admission::default(),
        }
    }

    pub(super) fn lookup(&self, tenant: i64, key: &str, now: i64) -> Lookup {
        let found = self.map.get(&(tenant, key.into()));
        self.admission.saw(found.is_none());
        match found {
            Some(Entry::Value(o)) => match o.expires_at {
                Some(at) if at <= now => Lookup::Gone,
                expires_at => {
                    let mut object = (*o).clone();
                    object.ttl = expires_at.map(|at| seconds_left(at, now));
                    Lookup::Live(object)
                }
            },
            Some(Entry::Absent) => Lookup::Gone,
            None => Lookup::Unknown,
        }
    }

    /// The commit sequence before a database read, for [`Cache::fill`].
    pub(super) fn read_started(&self) -> u64 {
        *self.seq.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores what a database read found, unless a commit happened since
    /// `started`, or another fill or a commit holds the lock: a fill is only
    /// an optimisation, and readers must not queue behind each other when
    /// most reads miss (a working set larger than the cache). Then most
    /// fills are skipped too (see the module's documentation).
    pub(super) fn fill(&self, started: u64, tenant: i64, key: &str, found: Option<&Object>) {
        if !self.admission.admits() {
            return;
        }
        let seq = match self.seq.try_lock() {
            Ok(seq) => seq,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        if *seq == started {
            let entry = match found {
                Some(o) => Entry::Value(Arc::new(o.clone())),
                None => Entry::Absent,
            };
            self.map.insert((tenant, key.into()), entry);
        }
    }

    /// Records committed writes: `Some(object)` written, `None` deleted.
    pub(super) fn committed<'a>(
        &self,
        tenant: i64,
        writes: impl Iterator<Item = (&'a str, Option<&'a Object>)>,
    ) {
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        *seq += 1;
        for (key, object) in writes {
            let entry = match object {
                Some(o) => Entry::Value(Arc::new(o.clone())),
                None => Entry::Absent,
            };
            self.map.insert((tenant, key.into()), entry);
        }
    }

    /// Drops `keys` of `tenant` whose writes may or may not have been
    /// committed; reads already under way do not fill them back.
    pub(super) fn uncertain<'a>(&self, tenant: i64, keys: impl Iterator<Item = &'a str>) {
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        *seq += 1;
        for key in keys {
            self.map.invalidate(&(tenant, key.into()));
        }
    }

    /// Drops keys the sweeper removed (they were expired, so already invisible).
    pub(super) fn forget(&self, tenant: i64, key: &str) {
        self.map.invalidate(&(tenant, key.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(key: &str, version: i64, expires_at: Option<i64>) -> Object {
        Object {
            key: key.into(),
            data: "1".into(),
            version,
            revision: version,
            ttl: None,
            expires_at,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn a_fill_that_raced_a_commit_is_dropped() {
        let cache = Cache::new(1 << 20);
        let started = cache.read_started();
        cache.committed(1, [("k", Some(&object("k", 2, None)))].into_iter());
        cache.fill(started, 1, "k", Some(&object("k", 1, None)));
        match cache.lookup(1, "k", 0) {
            Lookup::Live(o) => assert_eq!(o.version, 2),
            _ => panic!("expected the committed value"),
        }
    }

    #[test]
    fn a_fill_never_waits_for_the_lock() {
        let cache = Cache::new(1 << 20);
        let started = cache.read_started();
        let held = cache.seq.lock().expect("lock");
        cache.fill(started, 1, "k", Some(&object("k", 1, None)));
        drop(held);
        assert!(matches!(cache.lookup(1, "k", 0), Lookup::Unknown));
        cache.fill(started, 1, "k", Some(&object("k", 1, None)));
        assert!(matches!(cache.lookup(1, "k", 0), Lookup::Live(_)));
    }

    /// How many of `keys` fresh misses, each filled, are then cached.
    fn filled_of(cache: &Cache, round: &str, keys: usize) -> usize {
        (0..keys)
            .filter(|i| {
                let key = format!("{round}-{i}");
                assert!(matches!(cache.lookup(1, &key, 0), Lookup::Unknown));
                cache.fill(cache.read_started(), 1, &key, Some(&object(&key, 1, None)));
                matches!(cache.lookup(1, &key, 0), Lookup::Live(_))
            })
            .count()
    }

    #[test]
    fn while_most_lookups_miss_only_some_misses_are_filled() {
        let cache = Cache::new(1 << 20);
        assert_eq!(
            filled_of(&cache, "warm", 64),
            64,
            "a new cache fills every miss"
        );
        for i in 0..WINDOW {
            cache.lookup(1, &format!("absent-{i}"), 0);
        }
        let filled = filled_of(&cache, "cold", 64);
        assert_eq!(filled, 64 / FILL_ONE_IN as usize);
    }

    #[test]
    fn once_lookups_hit_again_every_miss_is_filled() {
        let cache = Cache::new(1 << 20);
        for i in 0..WINDOW {
            cache.lookup(1, &format!("absent-{i}"), 0);
        }
        cache.committed(1, [("hot", Some(&object("hot", 1, None)))].into_iter());
        for _ in 0..WINDOW {
            assert!(matches!(cache.lookup(1, "hot", 0), Lookup::Live(_)));
        }
        assert_eq!(filled_of(&cache, "again", 32), 32);
    }

    #[test]
    fn tenants_are_kept_apart_and_deletes_are_remembered() {
        let cache = Cache::new(1 << 20);
        cache.committed(1, [("k", Some(&object("k", 1, None)))].into_iter());
        assert!(matches!(cache.lookup(2, "k", 0), Lookup::Unknown));
        cache.committed(1, [("k", None)].into_iter());
        assert!(matches!(cache.lookup(1, "k", 0), Lookup::Gone));
    }

    #[test]
    fn expired_values_are_gone_and_ttl_is_recomputed() {
        let cache = Cache::new(1 << 20);
        let started = cache.read_started();
        cache.fill(started, 1, "k", Some(&object("k", 1, Some(10_000))));
        match cache.lookup(1, "k", 8_500) {
            Lookup::Live(o) => assert_eq!(o.ttl, Some(2)),
            _ => panic!("live"),
        }
        assert!(matches!(cache.lookup(1, "k", 10_000), Lookup::Gone));
    }
}
