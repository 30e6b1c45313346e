//! The server's notion of "now", in Unix epoch milliseconds.
//!
//! Everything time-based (TTL expiry, token expiry, the sweeper) reads this
//! clock, so expiry is exact to the millisecond and tests can move time forward
//! instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self { manual: None }
    }

    /// A clock that starts at the current system time and only moves when
    /// [`Clock::advance`] is called. For tests.
    pub fn manual() -> Self {
        Self {
            manual: Some(Arc::new(AtomicI64::new(system_now_ms()))),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.manual {
            Some(ms) => ms.load(Ordering::SeqCst),
            None => system_now_ms(),
        }
    }

    /// Moves a manual clock forward. Panics on the system clock: only tests call it.
    pub fn advance(&self, by: std::time::Duration) {
        let ms = self
            .manual
            .as_ref()
            .expect("only a manual clock can be advanced");
        ms.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

fn system_now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Unix milliseconds as RFC 3339 in UTC with milliseconds, e.g. `2026-11-24T10:00:00.000Z`.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_is_utc_with_milliseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
    }

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let c = Clock::manual();
        let t = c.now_ms();
        c.advance(std::time::Duration::from_millis(1500));
        assert_eq!(c.now_ms(), t + 1500);
    }
}
