//! Login throttling: failed logins counted per username and per client
//! address in a fixed window, and the client address itself (the TCP peer, or
//! `X-Forwarded-For` when the peer is a trusted proxy).
//!
//! The counts live in this node's memory only, in caches with a bounded
//! number of entries: several nodes behind a load balancer each allow the
//! configured number of failures.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use crate::clock::Clock;
use crate::error::ApiError;

/// An IP address or a CIDR block, as in `KVQL_TRUSTED_PROXIES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(u32::from(net).into(), u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8, bits: u8) -> bool {
    let shift = u32::from(bits - prefix);
    shift >= u32::from(bits) || (a >> shift) == (b >> shift)
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<IpNet, String> {
        let s = s.trim();
        let bad = || format!("{s:?} is not an IP address or CIDR block (e.g. 10.0.0.0/8, ::1)");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let addr = addr.parse::<IpAddr>().map_err(|_| bad())?.to_canonical();
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(bits);
        if prefix > bits {
            return Err(bad());
        }
        Ok(IpNet { addr, prefix })
    }
}

/// The reverse proxies whose `X-Forwarded-For` is believed
/// (`KVQL_TRUSTED_PROXIES`): comma-separated addresses or CIDR blocks; empty
/// for none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }
}

impl FromStr for TrustedProxies {
    type Err = String;

    fn from_str(s: &str) -> Result<TrustedProxies, String> {
        s.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }
}

/// Parses `KVQL_TRUSTED_PROXIES`.
pub fn parse_trusted_proxies(s: &str) -> Result<TrustedProxies, String> {
    s.parse()
}

/// The address a request comes from. The TCP peer, unless it is a trusted
/// proxy: then the rightmost `X-Forwarded-For` entry that is not itself a
/// trusted proxy (entries to its left can be written by anyone). An entry
/// that does not parse ends the walk at the proxy that passed it on.
pub fn client_addr<'a>(
    peer: Option<IpAddr>,
    forwarded_for: impl Iterator<Item = &'a str>,
    trusted: &TrustedProxies,
) -> Option<IpAddr> {
    let peer = peer?.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.contains(ip);
    if !is_trusted(peer) {
        return Some(peer);
    }
    let entries: Vec<&str> = forwarded_for.flat_map(|h| h.split(',')).collect();
    let mut last = peer;
    for entry in entries.iter().rev() {
        let Some(ip) = parse_forwarded_entry(entry) else {
            return Some(last);
        };
        if !is_trusted(ip) {
            return Some(ip);
        }
        last = ip;
    }
    Some(last)
}

fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

/// Limits for [`LoginThrottle`].
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub per_username: u32,
    pub per_address: u32,
    pub window: Duration,
}

/// Failures counted since `start` (Unix ms, when the window opened), and
/// attempts whose password is being checked.
#[derive(Clone, Copy, Debug)]
struct Window {
    start: i64,
    failures: u32,
    pending: u32,
}

/// Most usernames and addresses remembered each; beyond it the least
/// recently used are forgotten, so memory stays bounded under a spray of
/// invented usernames.
const MAX_ENTRIES: u64 = 100_000;

/// Usernames are at most 64 bytes; longer ones are counted by their first
/// 64 bytes so that a key never grows with the request.
const MAX_USERNAME_KEY: usize = 64;

/// Counts failed logins per username and per client address.
pub struct LoginThrottle {
    clock: Clock,
    limits: Limits,
    window_ms: i64,
    users: moka::sync::Cache<Box<str>, Window>,
    addrs: moka::sync::Cache<IpAddr, Window>,
}

impl LoginThrottle {
    pub fn new(limits: Limits, clock: Clock) -> LoginThrottle {
        // The caches' own expiry only frees memory; whether a window is over
        // is decided with the injected clock.
        LoginThrottle {
            clock,
            limits,
            window_ms: i64::try_from(limits.window.as_millis()).unwrap_or(i64::MAX),
            users: bounded_cache(limits.window),
            addrs: bounded_cache(limits.window),
        }
    }

    /// Admits a login attempt, or refuses it with the seconds until the
    /// window ends when the username or the address has used up its
    /// failures. Once a key has failed in its window, attempts still being
    /// checked count as failures too, so concurrent guesses cannot slip past
    /// the limit; a key without failures is not held back by attempts in
    /// flight, so many correct logins of one user at once all go through
    /// (the hashing queue bounds that first wave). The attempt ends as the
    /// returned guard says; dropped unresolved, it does not count.
    pub fn begin(&self, username: &str, client: Option<IpAddr>) -> Result<Attempt<'_>, ApiError> {
        let now = self.clock.now_ms();
        let user = username_key(username);
        if let Some(retry_after) =
            self.admit(&self.users, user.into(), self.limits.per_username, now)
        {
            return Err(limited(retry_after));
        }
        let addr = client.map(address_key);
        if let Some(addr) = addr
            && let Some(retry_after) = self.admit(&self.addrs, addr, self.limits.per_address, now)
        {
            self.end(&self.users, user.into(), 0);
            return Err(limited(retry_after));
        }
        Ok(Attempt {
            throttle: self,
            user: user.into(),
            addr,
            open: true,
        })
    }

    /// Adds one attempt in flight under `key`, or the seconds to wait if the
    /// key has used up `max` in the current window.
    fn admit<K>(
        &self,
        cache: &moka::sync::Cache<K, Window>,
        key: K,
        max: u32,
        now: i64,
    ) -> Option<u64>
    where
        K: std::hash::Hash + Eq + Send + Sync + 'static,
    {
        let mut refused = None;
        cache.entry(key).and_upsert_with(|old| {
            let w = match old.map(|e| e.into_value()) {
                Some(w) if now.saturating_sub(w.start) < self.window_ms => w,
                // A window over is forgotten, but attempts still in flight
                // keep counting as in flight.
                Some(w) => Window {
                    start: now,
                    failures: 0,
                    pending: w.pending,
                },
                None => Window {
                    start: now,
                    failures: 0,
                    pending: 0,
                },
            };
            let used = if w.failures == 0 {
                0
            } else {
                w.failures.saturating_add(w.pending)
            };
            if used >= max {
                refused = self.retry_after(w, now);
                if refused.is_some() {
                    return w;
                }
            }
            Window {
                pending: w.pending.saturating_add(1),
                ..w
            }
        });
        refused
    }

    /// Ends an attempt in flight under `key`, adding `failures`.
    fn end<K>(&self, cache: &moka::sync::Cache<K, Window>, key: K, failures: u32)
    where
        K: std::hash::Hash + Eq + Send + Sync + 'static,
    {
        let now = self.clock.now_ms();
        cache.entry(key).and_upsert_with(|old| match old {
            Some(e) => {
                let w = e.into_value();
                Window {
                    failures: w.failures.saturating_add(failures),
                    pending: w.pending.saturating_sub(1),
                    ..w
                }
            }
            None => Window {
                start: now,
                failures,
                pending: 0,
            },
        });
    }

    fn retry_after(&self, w: Window, now: i64) -> Option<u64> {
        let ends = w.start.saturating_add(self.window_ms);
        if now >= ends {
            return None;
        }
        let ms = u64::try_from(ends - now).unwrap_or(0);
        Some(ms.div_ceil(1000).max(1))
    }
}

/// One login attempt admitted by [`LoginThrottle::begin`].
pub struct Attempt<'t> {
    throttle: &'t LoginThrottle,
    user: Box<str>,
    addr: Option<IpAddr>,
    open: bool,
}

impl Attempt<'_> {
    /// The password was right: the username's failures are cleared (not the
    /// address's, so that one good account does not reset a spray from that
    /// address).
    pub fn succeeded(mut self) {
        self.open = false;
        let t = self.throttle;
        t.users.invalidate(&self.user);
        if let Some(addr) = self.addr {
            t.end(&t.addrs, addr, 0);
        }
    }

    /// The password was wrong, or the user unknown or disabled.
    pub fn failed(mut self) {
        self.open = false;
        let t = self.throttle;
        t.end(&t.users, self.user.clone(), 1);
        if let Some(addr) = self.addr {
            t.end(&t.addrs, addr, 1);
        }
    }
}

impl Drop for Attempt<'_> {
    /// Unresolved (the password was never checked: the server was busy or
    /// failed, or the client went away): the attempt does not count.
    fn drop(&mut self) {
        if self.open {
            let t = self.throttle;
            t.end(&t.users, self.user.clone(), 0);
            if let Some(addr) = self.addr {
                t.end(&t.addrs, addr, 0);
            }
        }
    }
}

fn limited(retry_after: u64) -> ApiError {
    ApiError::RateLimited {
        message: "too many failed logins; try again later".into(),
        retry_after,
    }
}

fn bounded_cache<K, V>(ttl: Duration) -> moka::sync::Cache<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    moka::sync::Cache::builder()
        .max_capacity(MAX_ENTRIES)
        .time_to_live(ttl)
        .build()
}

fn username_key(username: &str) -> &str {
    let mut end = username.len().min(MAX_USERNAME_KEY);
    while !username.is_char_boundary(end) {
        end -= 1;
    }
    &username[..end]
}

/// IPv6 clients are counted per /64, the block one subscriber usually holds.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn ip_nets_parse_and_match() {
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains("10.1.2.3".parse().unwrap()));
        assert!(n.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        let one: IpNet = "::1".parse().unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("proxy".parse::<IpNet>().is_err());
        assert_eq!("".parse::<TrustedProxies>(), Ok(TrustedProxies::default()));
        let list: TrustedProxies = " 10.0.0.0/8, ::1 ,".parse().unwrap();
        assert!(list.contains("::1".parse().unwrap()));
        assert!(list.contains("10.9.9.9".parse().unwrap()));
        assert!(!list.contains("192.0.2.1".parse().unwrap()));
        assert!("10.0.0.1, nope".parse::<TrustedProxies>().is_err());
    }

    #[test]
    fn forwarded_for_is_used_only_behind_a_trusted_proxy() {
        let trusted: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        let xff = ["1.1.1.1, 2.2.2.2"];
        // An untrusted peer: its header is ignored.
        assert_eq!(
            client_addr(ip("3.3.3.3"), xff.into_iter(), &trusted),
            ip("3.3.3.3")
        );
        // A trusted peer: the rightmost untrusted entry.
        assert_eq!(
            client_addr(ip("10.0.0.1"), xff.into_iter(), &trusted),
            ip("2.2.2.2")
        );
        // Trusted hops are skipped, across several headers.
        assert_eq!(
            client_addr(
                ip("10.0.0.1"),
                ["1.1.1.1", "2.2.2.2, 10.0.0.7"].into_iter(),
                &trusted
            ),
            ip("2.2.2.2")
        );
        // Garbage ends the walk at the proxy that passed it on.
        assert_eq!(
            client_addr(ip("10.0.0.1"), ["1.1.1.1, junk"].into_iter(), &trusted),
            ip("10.0.0.1")
        );
        // No header: the proxy itself.
        assert_eq!(
            client_addr(ip("10.0.0.1"), std::iter::empty(), &trusted),
            ip("10.0.0.1")
        );
        // Ports are tolerated.
        assert_eq!(
            client_addr(ip("10.0.0.1"), ["[2001:db8::1]:443"].into_iter(), &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(client_addr(None, xff.into_iter(), &trusted), None);
    }

    #[test]
    fn failures_are_limited_per_username_and_forgotten_after_the_window() {
        let clock = Clock::manual();
        let t = LoginThrottle::new(
            Limits {
                per_username: 2,
                per_address: 3,
                window: Duration::from_secs(60),
            },
            clock.clone(),
        );
        let a = ip("192.0.2.1");
        t.begin("alice", a).unwrap().failed();
        t.begin("alice", a).unwrap().failed();
        let Err(ApiError::RateLimited { retry_after, .. }) = t.begin("alice", None) else {
            panic!("alice should be throttled");
        };
        assert_eq!(retry_after, 60);
        // A refused attempt does not count against the address: one is left.
        t.begin("bob", a).unwrap().failed();
        assert!(t.begin("carol", a).is_err());
        // The window ends: everything is forgotten; a success clears the name.
        clock.advance(Duration::from_secs(60));
        t.begin("alice", a).unwrap().failed();
        t.begin("alice", a).unwrap().succeeded();
        t.begin("alice", None).unwrap().failed();
        t.begin("alice", None).unwrap().failed();
        assert!(t.begin("alice", None).is_err());
    }

    #[test]
    fn attempts_in_flight_count_only_once_a_key_has_failed() {
        let t = LoginThrottle::new(
            Limits {
                per_username: 3,
                per_address: 100,
                window: Duration::from_secs(60),
            },
            Clock::manual(),
        );
        // Without failures, any number of attempts may be checked at once
        // (many correct logins of one service user).
        let herd: Vec<_> = (0..10).map(|_| t.begin("svc", None).unwrap()).collect();
        herd.into_iter().for_each(Attempt::succeeded);
        // After one failure, those in flight count: 1 failed + 2 in flight.
        t.begin("eve", None).unwrap().failed();
        let a = t.begin("eve", None).unwrap();
        let b = t.begin("eve", None).unwrap();
        assert!(t.begin("eve", None).is_err());
        // An attempt never checked (dropped) does not count.
        drop(a);
        let c = t.begin("eve", None).unwrap();
        b.failed();
        c.failed();
        assert!(t.begin("eve", None).is_err());
    }

    #[test]
    fn long_usernames_and_ipv6_neighbours_share_a_key() {
        let long = "é".repeat(100);
        assert!(username_key(&long).len() <= MAX_USERNAME_KEY);
        assert_eq!(
            address_key("2001:db8::1".parse().unwrap()),
            address_key("2001:db8::ffff".parse().unwrap())
        );
        assert_ne!(
            address_key("2001:db8::1".parse().unwrap()),
            address_key("2001:db8:0:1::1".parse().unwrap())
        );
    }
}
