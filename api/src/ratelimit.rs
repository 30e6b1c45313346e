//! Per-tenant request rates on one node: a token bucket per tenant, refilled
//! at the tenant's rate up to its burst. The node's setting
//! (`KVQL_TENANT_RATE`, `KVQL_TENANT_BURST`) applies unless the tenant has
//! its own (`kvql tenant set-rate`, read with the token's verification and so
//! applied within the auth cache TTL). Counted per node: with N nodes behind
//! a balancer a tenant gets up to N times its rate.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::auth::Principal;
use crate::clock::Clock;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// A rate: `per_second` requests per second, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// A tenant's own setting, as stored on its row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TenantRate {
    /// The node's setting.
    #[default]
    NodeDefault,
    /// No limit, whatever the node's setting.
    Unlimited,
    /// Its own rate.
    Own(Rate),
}

impl TenantRate {
    /// From the tenant row's `rate_limit` and `rate_burst`.
    pub fn from_columns(limit: Option<i64>, burst: Option<i64>) -> TenantRate {
        let clamp = |n: i64| u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        match limit {
            None => TenantRate::NodeDefault,
            Some(n) if n <= 0 => TenantRate::Unlimited,
            Some(n) => TenantRate::Own(Rate {
                per_second: clamp(n),
                burst: clamp(burst.unwrap_or(n)),
            }),
        }
    }

    /// The tenant row's `(rate_limit, rate_burst)` for this setting: the
    /// inverse of [`TenantRate::from_columns`].
    pub fn to_columns(self) -> (Option<i64>, Option<i64>) {
        match self {
            TenantRate::NodeDefault => (None, None),
            TenantRate::Unlimited => (Some(0), None),
            TenantRate::Own(r) => (Some(i64::from(r.per_second)), Some(i64::from(r.burst))),
        }
    }
}

/// Buckets kept before full (idle) ones are dropped, which loses nothing: a
/// full bucket is what a new one starts as. Tenants are made only by the
/// operator, so clients cannot grow the map; this bounds the work of a
/// node serving very many of them.
const MAX_BUCKETS: usize = 100_000;

struct Bucket {
    rate: Rate,
    tokens: f64,
    at_ms: i64,
}

/// The buckets of one node.
pub struct TenantLimiter {
    default: Option<Rate>,
    clock: Clock,
    metrics: Metrics,
    buckets: Mutex<HashMap<i64, Bucket>>,
}

impl TenantLimiter {
    pub fn new(
        per_second: Option<u32>,
        burst: Option<u32>,
        clock: Clock,
        metrics: Metrics,
    ) -> TenantLimiter {
        TenantLimiter {
            default: per_second.map(|per_second| Rate {
                per_second,
                burst: burst.unwrap_or(per_second),
            }),
            clock,
            metrics,
            buckets: Mutex::default(),
        }
    }

    /// Counts one request of `principal`'s tenant; `RATE_LIMITED` with the
    /// seconds until one more is allowed when its bucket is empty.
    pub fn admit(&self, principal: &Principal) -> Result<(), ApiError> {
        let Some(rate) = self.rate_of(principal) else {
            return Ok(());
        };
        let refused = self.with_bucket(principal, rate, |bucket| {
            if bucket.tokens >= 1.0 {
                bucket.tokens -= 1.0;
                None
            } else {
                Some((1.0 - bucket.tokens) / f64::from(rate.per_second))
            }
        });
        let Some(wait) = refused else {
            return Ok(());
        };
        self.metrics.tenant_rate_refused();
        Err(ApiError::RateLimited {
            message: format!(
                "your tenant is over its request rate on this node ({} per second, {} at once); retry later",
                rate.per_second, rate.burst
            ),
            retry_after: (wait.ceil() as u64).max(1),
        })
    }

    /// Counts `n` more requests of a request already admitted (the other
    /// operations of a GraphQL batch, whose size is known only once its body
    /// is read). Never refuses: the bucket may go below empty, and the
    /// tenant's next requests wait until it has refilled. Batches admitted
    /// together, before any was charged, could owe a burst of batches; the
    /// debt stops at one burst below empty, so that the wait it causes is at
    /// most twice the time to fill the bucket.
    pub fn charge(&self, principal: &Principal, n: u32) {
        if n == 0 {
            return;
        }
        if let Some(rate) = self.rate_of(principal) {
            self.with_bucket(principal, rate, |bucket| {
                bucket.tokens = (bucket.tokens - f64::from(n)).max(-f64::from(rate.burst));
            });
        }
    }

    fn rate_of(&self, principal: &Principal) -> Option<Rate> {
        match principal.rate {
            TenantRate::NodeDefault => self.default,
            TenantRate::Unlimited => None,
            TenantRate::Own(rate) => Some(rate),
        }
    }

    /// Runs `f` on the tenant's bucket, refilled to now at `rate`.
    fn with_bucket<T>(
        &self,
        principal: &Principal,
        rate: Rate,
        f: impl FnOnce(&mut Bucket) -> T,
    ) -> T {
        let now = self.clock.now_ms();
        // The buckets are plain numbers: a panic elsewhere while holding
        // the lock leaves nothing half-done worth refusing everyone over.
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tenant = principal.tenant().get();
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&tenant) {
            buckets.retain(|_, b| b.refilled(now) < f64::from(b.rate.burst));
        }
        let bucket = buckets.entry(tenant).or_insert(Bucket {
            rate,
            tokens: f64::from(rate.burst),
            at_ms: now,
        });
        // A changed rate keeps what the bucket held (at most the new burst),
        // so that switching between rates cannot refill it.
        bucket.tokens = bucket.refilled(now).min(f64::from(rate.burst));
        bucket.rate = rate;
        bucket.at_ms = now.max(bucket.at_ms);
        f(bucket)
    }
}

impl Bucket {
    /// The tokens at `now`, refilled since `at_ms`, at most the burst.
    fn refilled(&self, now: i64) -> f64 {
        let elapsed = (now - self.at_ms).max(0) as f64 / 1000.0;
        (self.tokens + elapsed * f64::from(self.rate.per_second)).min(f64::from(self.rate.burst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_rates_read_from_their_columns() {
        assert_eq!(
            TenantRate::from_columns(None, Some(5)),
            TenantRate::NodeDefault
        );
        assert_eq!(
            TenantRate::from_columns(Some(0), None),
            TenantRate::Unlimited
        );
        assert_eq!(
            TenantRate::from_columns(Some(10), None),
            TenantRate::Own(Rate {
                per_second: 10,
                burst: 10
            })
        );
        assert_eq!(
            TenantRate::from_columns(Some(10), Some(0)),
            TenantRate::Own(Rate {
                per_second: 10,
                burst: 1
            })
        );
        assert_eq!(
            TenantRate::from_columns(Some(i64::MAX), Some(3)),
            TenantRate::Own(Rate {
                per_second: u32::MAX,
                burst: 3
            })
        );
    }

    #[test]
    fn tenant_rates_round_trip_through_their_columns() {
        for rate in [
            TenantRate::NodeDefault,
            TenantRate::Unlimited,
            TenantRate::Own(Rate {
                per_second: 7,
                burst: 9,
            }),
        ] {
            let (limit, burst) = rate.to_columns();
            assert_eq!(TenantRate::from_columns(limit, burst), rate);
        }
    }

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let b = Bucket {
            rate: Rate {
                per_second: 4,
                burst: 6,
            },
            tokens: 0.0,
            at_ms: 1_000,
        };
        assert_eq!(b.refilled(1_000), 0.0);
        assert_eq!(b.refilled(1_500), 2.0);
        assert_eq!(b.refilled(500), 0.0);
        assert_eq!(b.refilled(60_000), 6.0);
    }
}
