//! Parsed inputs of the store. Doors parse raw input into these at the edge;
//! store functions take only parsed values.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use std::sync::Arc;

use crate::error::ApiError;

/// A key: 1 to 512 bytes of UTF-8 without control characters. `/`, spaces,
/// `?`, `%` and non-ASCII characters are all fine.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

impl Key {
    pub const MAX_BYTES: usize = 512;

    pub fn parse(raw: impl Into<String>) -> Result<Key, ApiError> {
        let raw = raw.into();
        if raw.is_empty() || raw.len() > Self::MAX_BYTES {
            return Err(ApiError::invalid(
                "key",
                format!(
                    "must be 1 to {} bytes of UTF-8, got {} bytes",
                    Self::MAX_BYTES,
                    raw.len()
                ),
            ));
        }
        check_no_control("key", &raw)?;
        Ok(Key(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

fn check_no_control(field: &str, s: &str) -> Result<(), ApiError> {
    match s.chars().position(char::is_control) {
        Some(at) => Err(ApiError::invalid(
            field,
            format!("must not contain control characters (found one at character {at})"),
        )),
        None => Ok(()),
    }
}

/// A key prefix for listing: like a key, but may be empty (everything).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prefix(String);

impl Prefix {
    pub fn parse(raw: Option<String>) -> Result<Prefix, ApiError> {
        let raw = raw.unwrap_or_default();
        if raw.len() > Key::MAX_BYTES {
            return Err(ApiError::invalid(
                "prefix",
                format!("must be at most {} bytes", Key::MAX_BYTES),
            ));
        }
        check_no_control("prefix", &raw)?;
        Ok(Prefix(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The smallest string greater than every string that starts with this
    /// prefix, in byte order; `None` when there is no upper bound (empty prefix).
    pub fn upper_bound(&self) -> Option<String> {
        let mut chars: Vec<char> = self.0.chars().collect();
        while let Some(last) = chars.pop() {
            if let Some(next) = next_char(last) {
                chars.push(next);
                return Some(chars.into_iter().collect());
            }
        }
        None
    }
}

/// The next Unicode scalar value; UTF-8 byte order follows code point order.
fn next_char(c: char) -> Option<char> {
    let mut n = c as u32 + 1;
    if (0xD800..=0xDFFF).contains(&n) {
        n = 0xE000;
    }
    char::from_u32(n)
}

/// A time-to-live in whole seconds, 1 to 315,360,000 (ten years).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ttl(u32);

impl Ttl {
    pub const MAX_SECONDS: i64 = 315_360_000;

    pub fn parse(seconds: i64) -> Result<Ttl, ApiError> {
        if (1..=Self::MAX_SECONDS).contains(&seconds) {
            Ok(Ttl(seconds as u32))
        } else {
            Err(ApiError::invalid(
                "ttl",
                format!(
                    "must be a whole number of seconds from 1 to {}, got {seconds}",
                    Self::MAX_SECONDS
                ),
            ))
        }
    }

    /// `None` (no expiry) stays `None`.
    pub fn parse_opt(seconds: Option<i64>) -> Result<Option<Ttl>, ApiError> {
        seconds.map(Ttl::parse).transpose()
    }

    pub fn millis(self) -> i64 {
        i64::from(self.0) * 1000
    }
}

/// A value: any JSON, as compact text of at most the configured size. Strings
/// may not contain U+0000, which PostgreSQL cannot store, so both backends
/// refuse it alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Data(String);

impl Data {
    pub fn parse(value: &serde_json::Value, max_bytes: u64) -> Result<Data, ApiError> {
        if contains_nul(value) {
            return Err(ApiError::invalid(
                "data",
                "strings must not contain the NUL character (\\u0000)",
            ));
        }
        let text = serde_json::to_string(value).map_err(ApiError::internal)?;
        if text.len() as u64 > max_bytes {
            return Err(ApiError::PayloadTooLarge(format!(
                "data is {} bytes of JSON; the limit is {max_bytes}",
                text.len()
            )));
        }
        Ok(Data(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn contains_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

/// A version as clients send it back: a decimal number, bare or quoted as in an ETag.
pub fn parse_version(field: &str, raw: &str) -> Result<i64, ApiError> {
    let trimmed = raw.trim();
    let unquoted = trimmed
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(trimmed);
    unquoted
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| {
            ApiError::invalid(
                field,
                format!("expected a version such as \"3\" (an ETag from this server), got {raw:?}"),
            )
        })
}

/// What a write expects to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Anything: create or replace.
    Any,
    /// A live value, whatever its version (`If-Match: *`).
    Exists,
    /// A live value at exactly this version (`If-Match: "3"`).
    Version(i64),
    /// No live value: create only (`If-None-Match: *`).
    Absent,
}

/// A revision as clients send it back (`after`, `afterRevision`): 0 (before
/// every change) or more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Revision(i64);

impl Revision {
    pub const ZERO: Revision = Revision(0);

    pub fn parse(field: &str, raw: i64) -> Result<Revision, ApiError> {
        if raw >= 0 {
            Ok(Revision(raw))
        } else {
            Err(ApiError::invalid(
                field,
                format!("must be a revision (0 or more), got {raw}"),
            ))
        }
    }

    /// From decimal text, as the GraphQL `Revision` scalar and cursors carry it.
    pub fn parse_text(field: &str, raw: &str) -> Result<Revision, ApiError> {
        raw.trim()
            .parse::<i64>()
            .map_err(|_| {
                ApiError::invalid(
                    field,
                    format!("expected a revision such as \"42\", got {raw:?}"),
                )
            })
            .and_then(|n| Revision::parse(field, n))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// What a change feed follows: one key, or every key under a prefix (all
/// keys when the prefix is empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Watch {
    Key(Key),
    Prefix(Prefix),
    /// No key: what a caller follows of keys outside the prefix its API
    /// key is restricted to (see `auth::ReadScope::narrow_watch`).
    Nothing,
}

impl Watch {
    /// From the `key` and `prefix` a client sent: at most one of them.
    pub fn parse(key: Option<String>, prefix: Option<String>) -> Result<Watch, ApiError> {
        match (key, prefix) {
            (Some(_), Some(_)) => Err(ApiError::invalid(
                "key",
                "give either `key` (one key) or `prefix` (keys under it), not both",
            )),
            (Some(key), None) => Ok(Watch::Key(Key::parse(key)?)),
            (None, prefix) => Ok(Watch::Prefix(Prefix::parse(prefix)?)),
        }
    }

    pub fn matches(&self, key: &str) -> bool {
        match self {
            Watch::Key(k) => k.as_str() == key,
            Watch::Prefix(p) => key.starts_with(p.as_str()),
            Watch::Nothing => false,
        }
    }
}

/// How long a long-poll may wait for a change: 0 to 60 whole seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wait(u8);

impl Wait {
    pub const MAX_SECONDS: i64 = 60;
    pub const MAX: Wait = Wait(Self::MAX_SECONDS as u8);

    pub fn parse(seconds: Option<i64>) -> Result<Wait, ApiError> {
        match seconds {
            None => Ok(Wait(0)),
            Some(s) if (0..=Self::MAX_SECONDS).contains(&s) => Ok(Wait(s as u8)),
            Some(s) => Err(ApiError::invalid(
                "wait",
                format!(
                    "must be a whole number of seconds from 0 to {}, got {s}",
                    Self::MAX_SECONDS
                ),
            )),
        }
    }

    pub fn duration(self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.0))
    }
}

/// An opaque position in a listing: the last key of the previous page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor(String);

impl Cursor {
    pub fn after(key: &str) -> Cursor {
        Cursor(key.to_owned())
    }

    pub fn parse(raw: &str) -> Result<Cursor, ApiError> {
        URL_SAFE_NO_PAD
            .decode(raw)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            // Keys hold no control characters, so no issued cursor does; and
            // PostgreSQL cannot compare against a NUL.
            .filter(|key| !key.chars().any(char::is_control))
            .map(Cursor)
            .ok_or_else(|| ApiError::invalid("cursor", "not a cursor returned by a previous page"))
    }

    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0.as_bytes())
    }

    pub fn key(&self) -> &str {
        &self.0
    }
}

/// A page size for listings, 1 to 1,000; 100 when not given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit(u32);

impl Limit {
    pub const MAX: i64 = 1000;
    pub const DEFAULT: u32 = 100;

    pub fn parse(field: &str, raw: Option<i64>) -> Result<Limit, ApiError> {
        match raw {
            None => Ok(Limit(Self::DEFAULT)),
            Some(n) if (1..=Self::MAX).contains(&n) => Ok(Limit(n as u32)),
            Some(n) => Err(ApiError::invalid(
                field,
                format!("must be from 1 to {}, got {n}", Self::MAX),
            )),
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// A live value, as read or just written.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub key: String,
    /// The value as compact JSON text.
    pub data: Arc<str>,
    pub version: i64,
    /// The revision of the change that wrote this value (see `revision`); 0
    /// for values written before revisions existed.
    pub revision: i64,
    /// Whole seconds left before expiry, rounded up; `None` if it never expires.
    pub ttl: Option<i64>,
    pub expires_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// One committed change of a tenant's data, as the change log keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// Strictly increasing per tenant, in commit order; gaps are allowed.
    pub revision: i64,
    pub kind: super::events::EventKind,
    pub key: String,
    /// The version written, deleted or expired.
    pub version: i64,
    /// The value written, as compact JSON text (`Put` only).
    pub data: Option<Arc<str>>,
    /// When the value written expires, in Unix milliseconds (`Put` only).
    pub expires_at: Option<i64>,
    /// When the key was created, in Unix milliseconds (`Put` only).
    pub created_at: Option<i64>,
    /// When the change was made, in Unix milliseconds.
    pub at: i64,
}

impl Change {
    /// The change that wrote `object`.
    pub fn put(object: &Object) -> Change {
        Change {
            revision: object.revision,
            kind: super::events::EventKind::Put,
            key: object.key.clone(),
            version: object.version,
            data: Some(object.data.clone()),
            expires_at: object.expires_at,
            created_at: Some(object.created_at),
            at: object.updated_at,
        }
    }

    /// A key gone at `version` by `kind` (a delete or an expiry) at time `at`.
    pub fn gone(
        kind: super::events::EventKind,
        revision: i64,
        key: String,
        version: i64,
        at: i64,
    ) -> Change {
        Change {
            revision,
            kind,
            key,
            version,
            data: None,
            expires_at: None,
            created_at: None,
            at,
        }
    }

    /// The value a `Put` wrote, as an object seen at `now`.
    pub fn object(&self, now: i64) -> Option<Object> {
        Some(Object {
            key: self.key.clone(),
            data: self.data.clone()?,
            version: self.version,
            revision: self.revision,
            ttl: self.expires_at.map(|e| super::sql::seconds_left(e, now)),
            expires_at: self.expires_at,
            created_at: self.created_at.unwrap_or(self.at),
            updated_at: self.at,
        })
    }

    /// The value as a JSON tree, for `Put`.
    pub fn data_json(&self) -> Option<serde_json::Value> {
        self.data
            .as_deref()
            .map(|d| serde_json::from_str(d).unwrap_or(serde_json::Value::Null))
    }
}

impl Object {
    /// The value as a JSON tree.
    pub fn data_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null)
    }

    /// The strong ETag for this version, e.g. `"3"`.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_accept_slashes_spaces_percent_and_unicode() {
        for k in [
            "a/b",
            "with space",
            "100%",
            "what?",
            "ключ",
            "🔑",
            "/",
            "a\u{a0}b",
        ] {
            assert_eq!(Key::parse(k).unwrap().as_str(), k);
        }
    }

    #[test]
    fn keys_refuse_empty_long_and_control_characters() {
        assert_eq!(Key::parse("").unwrap_err().code(), "INVALID_INPUT");
        assert!(Key::parse("x".repeat(512)).is_ok());
        let err = Key::parse("x".repeat(513)).unwrap_err();
        assert_eq!(err.field(), Some("key"));
        // 171 three-byte characters are 513 bytes.
        assert!(Key::parse("€".repeat(171)).is_err());
        for bad in ["a\nb", "tab\t", "nul\0", "del\u{7f}", "c1\u{85}"] {
            assert!(Key::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn ttl_bounds() {
        assert!(Ttl::parse(0).is_err());
        assert!(Ttl::parse(-5).is_err());
        assert_eq!(Ttl::parse(1).unwrap().millis(), 1000);
        assert!(Ttl::parse(315_360_000).is_ok());
        let err = Ttl::parse(315_360_001).unwrap_err();
        assert_eq!(err.field(), Some("ttl"));
        assert_eq!(Ttl::parse_opt(None).unwrap(), None);
    }

    #[test]
    fn data_is_any_json_within_the_limit() {
        for v in [
            json!(null),
            json!(1),
            json!("s"),
            json!([1, 2]),
            json!({"a": {"b": true}}),
        ] {
            assert_eq!(Data::parse(&v, 100).unwrap().as_str(), v.to_string());
        }
        let err = Data::parse(&json!("x".repeat(20)), 10).unwrap_err();
        assert_eq!(err.code(), "PAYLOAD_TOO_LARGE");
        // The limit counts compact JSON, quotes included: "12345678" is 10 bytes.
        assert!(Data::parse(&json!("12345678"), 10).is_ok());
        assert!(Data::parse(&json!("123456789"), 10).is_err());
    }

    #[test]
    fn data_refuses_nul_anywhere() {
        assert!(Data::parse(&json!({"a": ["x\u{0}y"]}), 100).is_err());
        assert!(Data::parse(&json!({"k\u{0}": 1}), 100).is_err());
        // A backslash followed by "u0000" is an ordinary string.
        assert!(Data::parse(&json!("\\u0000"), 100).is_ok());
    }

    #[test]
    fn prefix_upper_bound_covers_exactly_the_prefix() {
        assert_eq!(Prefix::parse(None).unwrap().upper_bound(), None);
        assert_eq!(
            Prefix::parse(Some("ab".into())).unwrap().upper_bound(),
            Some("ac".into())
        );
        assert_eq!(
            Prefix::parse(Some("a\u{ff}".into())).unwrap().upper_bound(),
            Some("a\u{100}".into())
        );
        assert_eq!(
            Prefix::parse(Some("a\u{d7ff}".into()))
                .unwrap()
                .upper_bound(),
            Some("a\u{e000}".into())
        );
        assert_eq!(
            Prefix::parse(Some("a\u{10ffff}".into()))
                .unwrap()
                .upper_bound(),
            Some("b".into())
        );
        let p = Prefix::parse(Some("user/é".into())).unwrap();
        let upper = p.upper_bound().unwrap();
        for inside in ["user/é", "user/éz", "user/é\u{10ffff}\u{10ffff}"] {
            assert!(inside.as_bytes() < upper.as_bytes());
        }
        assert!("user/ê".as_bytes() >= upper.as_bytes());
    }

    #[test]
    fn versions_parse_bare_or_quoted() {
        assert_eq!(parse_version("If-Match", "\"3\"").unwrap(), 3);
        assert_eq!(parse_version("If-Match", " 42 ").unwrap(), 42);
        assert!(parse_version("If-Match", "W/\"3\"").is_err());
        assert!(parse_version("If-Match", "\"0\"").is_err());
        assert!(parse_version("If-Match", "abc").is_err());
    }

    #[test]
    fn revisions_are_zero_or_more() {
        assert_eq!(Revision::parse("after", 0).unwrap(), Revision::ZERO);
        assert_eq!(Revision::parse("after", 42).unwrap().get(), 42);
        assert_eq!(
            Revision::parse("after", -1).unwrap_err().field(),
            Some("after")
        );
        assert_eq!(Revision::parse_text("after", " 7 ").unwrap().get(), 7);
        for bad in ["", "x", "-3", "1.5", "99999999999999999999"] {
            assert!(Revision::parse_text("after", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_feed_follows_one_key_or_a_prefix_never_both() {
        let key = Watch::parse(Some("a/b".into()), None).unwrap();
        assert!(key.matches("a/b"));
        assert!(!key.matches("a/bc"));
        let prefix = Watch::parse(None, Some("a/".into())).unwrap();
        assert!(prefix.matches("a/b") && prefix.matches("a/"));
        assert!(!prefix.matches("b/a"));
        let all = Watch::parse(None, None).unwrap();
        assert!(all.matches("anything"));
        let both = Watch::parse(Some("a".into()), Some("a".into())).unwrap_err();
        assert_eq!(both.code(), "INVALID_INPUT");
        assert!(Watch::parse(Some(String::new()), None).is_err());
    }

    #[test]
    fn waits_are_0_to_60_seconds() {
        assert_eq!(Wait::parse(None).unwrap().duration().as_secs(), 0);
        assert_eq!(Wait::parse(Some(60)).unwrap().duration().as_secs(), 60);
        assert_eq!(Wait::parse(Some(61)).unwrap_err().field(), Some("wait"));
        assert!(Wait::parse(Some(-1)).is_err());
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let c = Cursor::after("a/b ü");
        assert_eq!(Cursor::parse(&c.encode()).unwrap(), c);
        assert!(Cursor::parse("!!!").is_err());
    }

    #[test]
    fn limits() {
        assert_eq!(Limit::parse("limit", None).unwrap().get(), 100);
        assert_eq!(Limit::parse("limit", Some(1000)).unwrap().get(), 1000);
        assert!(Limit::parse("limit", Some(0)).is_err());
        assert!(Limit::parse("limit", Some(1001)).is_err());
    }
}
