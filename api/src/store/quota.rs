//! Quotas: how many keys a tenant may keep and how many bytes they may
//! hold. Usage is kept by the database itself (triggers on `object`, see
//! the quotas migration), in the transaction of each write, on the tenant's
//! counter row that every writer of the tenant already holds; so the check
//! made before a write commits is exact under concurrency and across nodes
//! (see `write`).

use crate::error::ApiError;

/// One limit as a tenant's row sets it (`tenant.max_keys`, `max_bytes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QuotaLimit {
    /// The servers' default (`KVQL_DEFAULT_MAX_KEYS`, `KVQL_DEFAULT_MAX_BYTES`).
    #[default]
    Default,
    /// No limit, whatever the default.
    Unlimited,
    /// At most this many.
    Max(u64),
}

impl QuotaLimit {
    pub fn from_column(value: Option<i64>) -> QuotaLimit {
        match value {
            None => QuotaLimit::Default,
            Some(n) if n < 0 => QuotaLimit::Unlimited,
            Some(n) => QuotaLimit::Max(n as u64),
        }
    }

    pub fn to_column(self) -> Option<i64> {
        match self {
            QuotaLimit::Default => None,
            QuotaLimit::Unlimited => Some(-1),
            QuotaLimit::Max(n) => Some(i64::try_from(n).unwrap_or(i64::MAX)),
        }
    }

    /// `none`, `default` or a number (0 or more).
    pub fn parse(text: &str) -> Result<QuotaLimit, String> {
        match text {
            "none" => Ok(QuotaLimit::Unlimited),
            "default" => Ok(QuotaLimit::Default),
            n => Some(n)
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|n| i64::try_from(*n).is_ok())
                .map(QuotaLimit::Max)
                .ok_or_else(|| format!("invalid limit {n:?}: use a number, none or default")),
        }
    }

    /// The limit in force, given the servers' default.
    pub fn resolve(self, default: Option<u64>) -> Option<u64> {
        match self {
            QuotaLimit::Default => default,
            QuotaLimit::Unlimited => None,
            QuotaLimit::Max(n) => Some(n),
        }
    }
}

/// A tenant's own limits, as its row sets them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantQuota {
    pub max_keys: QuotaLimit,
    pub max_bytes: QuotaLimit,
}

impl TenantQuota {
    pub fn from_columns(max_keys: Option<i64>, max_bytes: Option<i64>) -> TenantQuota {
        TenantQuota {
            max_keys: QuotaLimit::from_column(max_keys),
            max_bytes: QuotaLimit::from_column(max_bytes),
        }
    }

    /// The limits in force, given the servers' defaults.
    pub fn resolve(self, defaults: Quota) -> Quota {
        Quota {
            max_keys: self.max_keys.resolve(defaults.max_keys),
            max_bytes: self.max_bytes.resolve(defaults.max_bytes),
        }
    }
}

/// The limits in force for a tenant; `None`: no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quota {
    pub max_keys: Option<u64>,
    pub max_bytes: Option<u64>,
}

impl Quota {
    pub fn is_unlimited(&self) -> bool {
        self.max_keys.is_none() && self.max_bytes.is_none()
    }

    /// The stricter of two quotas, limit by limit (no limit is the loosest).
    pub(super) fn tightest(self, other: Quota) -> Quota {
        let min = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Quota {
            max_keys: min(self.max_keys, other.max_keys),
            max_bytes: min(self.max_bytes, other.max_bytes),
        }
    }

    /// `QUOTA_EXCEEDED` if going from `before` to `after` breaks a limit: a
    /// write may leave a tenant over a limit (lowered below its usage) only
    /// if it does not grow what is over.
    pub(super) fn check(&self, before: Usage, after: Usage) -> Result<(), ApiError> {
        let over = |max: Option<u64>, before: i64, after: i64| {
            max.is_some_and(|max| after > before && after > i64::try_from(max).unwrap_or(i64::MAX))
        };
        if over(self.max_keys, before.keys, after.keys) {
            return Err(ApiError::QuotaExceeded(format!(
                "the tenant may keep {} keys; this write would make {}",
                self.max_keys.unwrap_or_default(),
                after.keys
            )));
        }
        if over(self.max_bytes, before.bytes, after.bytes) {
            return Err(ApiError::QuotaExceeded(format!(
                "the tenant may store {} bytes; this write would make {}",
                self.max_bytes.unwrap_or_default(),
                after.bytes
            )));
        }
        Ok(())
    }

    /// Whether writes adding up to `keys` keys and `bytes` bytes might break
    /// a limit from `usage` (writes that add nothing never do).
    pub(super) fn may_exceed(&self, usage: Usage, keys: i64, bytes: i64) -> bool {
        let near = |max: Option<u64>, used: i64, more: i64| {
            max.is_some_and(|max| {
                more > 0 && used.saturating_add(more) > i64::try_from(max).unwrap_or(i64::MAX)
            })
        };
        near(self.max_keys, usage.keys, keys) || near(self.max_bytes, usage.bytes, bytes)
    }
}

/// What a tenant stores: keys, and their bytes (each key's UTF-8 bytes plus
/// its value's compact JSON).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub keys: i64,
    pub bytes: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(keys: i64, bytes: i64) -> Usage {
        Usage { keys, bytes }
    }

    #[test]
    fn limits_parse_from_numbers_none_and_default() {
        assert_eq!(QuotaLimit::parse("0"), Ok(QuotaLimit::Max(0)));
        assert_eq!(QuotaLimit::parse("12"), Ok(QuotaLimit::Max(12)));
        assert_eq!(QuotaLimit::parse("none"), Ok(QuotaLimit::Unlimited));
        assert_eq!(QuotaLimit::parse("default"), Ok(QuotaLimit::Default));
        for bad in [
            "",
            "-1",
            "+5",
            " 5",
            "1.5",
            "ten",
            "99999999999999999999",
            "9223372036854775808",
        ] {
            assert!(QuotaLimit::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_round_trip_through_their_column() {
        for limit in [
            QuotaLimit::Default,
            QuotaLimit::Unlimited,
            QuotaLimit::Max(0),
            QuotaLimit::Max(7),
        ] {
            assert_eq!(QuotaLimit::from_column(limit.to_column()), limit);
        }
    }

    #[test]
    fn a_tenants_own_limit_overrides_the_default_and_none_lifts_it() {
        let defaults = Quota {
            max_keys: Some(10),
            max_bytes: Some(100),
        };
        let own = TenantQuota {
            max_keys: QuotaLimit::Max(3),
            max_bytes: QuotaLimit::Unlimited,
        };
        assert_eq!(
            own.resolve(defaults),
            Quota {
                max_keys: Some(3),
                max_bytes: None
            }
        );
        assert_eq!(TenantQuota::default().resolve(defaults), defaults);
    }

    #[test]
    fn a_write_may_reach_a_limit_but_not_pass_it() {
        let q = Quota {
            max_keys: Some(2),
            max_bytes: Some(100),
        };
        assert!(q.check(usage(1, 10), usage(2, 100)).is_ok());
        assert!(q.check(usage(2, 10), usage(3, 20)).is_err());
        assert!(q.check(usage(1, 90), usage(1, 101)).is_err());
    }

    #[test]
    fn a_tenant_over_a_lowered_limit_may_still_shrink_or_stay() {
        let q = Quota {
            max_keys: Some(1),
            max_bytes: Some(10),
        };
        assert!(q.check(usage(5, 50), usage(4, 40)).is_ok());
        assert!(q.check(usage(5, 50), usage(5, 50)).is_ok());
        assert!(q.check(usage(5, 50), usage(5, 51)).is_err());
        assert!(q.check(usage(5, 50), usage(6, 40)).is_err());
    }

    #[test]
    fn the_tightest_of_two_quotas_takes_each_smaller_limit() {
        let a = Quota {
            max_keys: Some(10),
            max_bytes: None,
        };
        let b = Quota {
            max_keys: Some(1000),
            max_bytes: Some(5),
        };
        let both = Quota {
            max_keys: Some(10),
            max_bytes: Some(5),
        };
        assert_eq!(a.tightest(b), both);
        assert_eq!(b.tightest(a), both);
        assert_eq!(Quota::default().tightest(a), a);
    }

    #[test]
    fn zero_allows_nothing_more() {
        let q = Quota {
            max_keys: Some(0),
            max_bytes: None,
        };
        assert!(q.check(usage(0, 0), usage(1, 5)).is_err());
        assert!(q.may_exceed(usage(0, 0), 1, 5));
        assert!(!Quota::default().may_exceed(usage(i64::MAX, i64::MAX), 1, 1));
        assert!(!q.may_exceed(usage(5, 0), 0, 0), "deletes only");
    }
}
