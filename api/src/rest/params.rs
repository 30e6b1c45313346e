//! Inputs as they travel, documented with the exact rules the store's parsers
//! apply (`Key::parse`, `Prefix::parse`, `Limit::parse`, If-Match), so that
//! the OpenAPI document describes what the server accepts, no more, no less.
//!
//! These types only carry the text or number: parsing stays in one place
//! (the store's parsers and [`IfMatch::parse`]), which names the field at
//! fault in its error. The schema here documents those parsers.

use std::borrow::Cow;

use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::types::{ParseFromJSON, ParseFromParameter, ParseResult, ToJSON, Type};

use crate::error::ApiError;
use crate::store::{self, Expect, Key, Limit};

/// What `char::is_control` refuses (Unicode category Cc), as an ECMA-262
/// pattern: keys and prefixes may hold any other character.
const NO_CONTROL_CHARACTERS: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$";

/// A wire type that documents `$schema` and otherwise is `$inner`.
macro_rules! documented {
    ($(#[$attr:meta])* $name:ident($inner:ty), $type_name:literal, $schema:expr) => {
        $(#[$attr])*
        #[derive(Debug, Clone, PartialEq, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl Type for $name {
            const IS_REQUIRED: bool = true;
            type RawValueType = Self;
            type RawElementValueType = Self;

            fn name() -> Cow<'static, str> {
                $type_name.into()
            }

            fn schema_ref() -> MetaSchemaRef {
                MetaSchemaRef::Inline(Box::new($schema))
            }

            fn as_raw_value(&self) -> Option<&Self::RawValueType> {
                Some(self)
            }

            fn raw_element_iter<'a>(
                &'a self,
            ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
                Box::new(self.as_raw_value().into_iter())
            }
        }

        impl ParseFromJSON for $name {
            fn parse_from_json(value: Option<serde_json::Value>) -> ParseResult<Self> {
                <$inner>::parse_from_json(value)
                    .map($name)
                    .map_err(|e| e.propagate())
            }
        }

        impl ToJSON for $name {
            fn to_json(&self) -> Option<serde_json::Value> {
                self.0.to_json()
            }
        }

        impl ParseFromParameter for $name {
            fn parse_from_parameter(value: &str) -> ParseResult<Self> {
                <$inner>::parse_from_parameter(value)
                    .map($name)
                    .map_err(|e| e.propagate())
            }
        }
    };
}

fn string_schema(description: &'static str) -> MetaSchema {
    MetaSchema {
        description: Some(description),
        ..MetaSchema::new("string")
    }
}

fn key_schema() -> MetaSchema {
    MetaSchema {
        min_length: Some(1),
        // JSON Schema counts characters, the server bytes: a key of up to 512
        // ASCII characters fits, and no key over 512 characters can.
        max_length: Some(Key::MAX_BYTES),
        pattern: Some(NO_CONTROL_CHARACTERS.into()),
        example: Some(serde_json::Value::String("exampleKey".into())),
        ..string_schema(
            "1 to 512 bytes of UTF-8 without control characters; `/`, spaces, `?`, `%` \
             and non-ASCII characters are fine. In a path, percent-encode it (`a%2Fb` is `a/b`).",
        )
    }
}

documented!(
    /// A key as sent; [`KeyText::parse`] applies the rules.
    KeyText(String),
    "Key",
    key_schema()
);

impl KeyText {
    pub fn parse(self) -> Result<Key, ApiError> {
        Key::parse(self.0)
    }
}

documented!(
    /// A listing prefix as sent.
    PrefixText(String),
    "Prefix",
    MetaSchema {
        max_length: Some(Key::MAX_BYTES),
        pattern: Some(NO_CONTROL_CHARACTERS.into()),
        ..string_schema(
            "Only keys that start with this; at most 512 bytes of UTF-8 without control \
             characters. Empty or absent: every key.",
        )
    }
);

documented!(
    /// A page size as sent; `Limit::parse` applies the range.
    LimitParam(i64),
    "Limit",
    MetaSchema {
        format: Some("int64"),
        minimum: Some(1.0),
        maximum: Some(Limit::MAX as f64),
        description: Some("Values per page, 1 to 1000; 100 when absent."),
        ..MetaSchema::new("integer")
    }
);

documented!(
    /// A listing cursor as sent; `Cursor::parse` reads it.
    CursorText(String),
    "Cursor",
    MetaSchema {
        // The shape of what `Cursor::encode` writes: unpadded base64url, in
        // its canonical form (a final partial group has its spare bits zero).
        pattern: Some(
            "^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-][AQgw]|[A-Za-z0-9_-]{2}[AEIMQUYcgkosw048])?$"
                .into()
        ),
        ..string_schema(
            "The `next_cursor` of the previous page, as it was given (opaque: one this \
             server did not issue is refused with 400).",
        )
    }
);

documented!(
    /// A revision as sent (`after`); `Revision::parse` applies the range.
    RevisionParam(i64),
    "Revision",
    MetaSchema {
        format: Some("int64"),
        minimum: Some(0.0),
        description: Some(
            "A revision of your data: the `last_revision` of a previous page, or the \
             `revision` of a value or change. 0 means before every change.",
        ),
        ..MetaSchema::new("integer")
    }
);

documented!(
    /// A long-poll wait as sent; `Wait::parse` applies the range.
    WaitParam(i64),
    "Wait",
    MetaSchema {
        format: Some("int64"),
        minimum: Some(0.0),
        maximum: Some(store::Wait::MAX_SECONDS as f64),
        description: Some(
            "Seconds to hold the request while no change has arrived, 0 to 60; 0 when absent.",
        ),
        ..MetaSchema::new("integer")
    }
);

documented!(
    /// A history cursor as sent; `Revision::parse_text` reads it.
    HistoryCursorText(String),
    "HistoryCursor",
    MetaSchema {
        pattern: Some("^(0|[1-9][0-9]{0,17})$".into()),
        ..string_schema(
            "The `next_cursor` of the previous page of this key's history, as it was given.",
        )
    }
);

/// Versions are written as at most 18 digits: a key would need 10^18 writes
/// to outgrow it, and every such number fits an i64.
const VERSION_PATTERN: &str = "[1-9][0-9]{0,17}";

documented!(
    /// An `If-Match` header as sent; [`IfMatch::parse`] reads it.
    IfMatch(String),
    "IfMatch",
    MetaSchema {
        pattern: Some(format!("^(\\*|{VERSION_PATTERN}|\"{VERSION_PATTERN}\")$")),
        ..string_schema(
            "`*` (a live value must exist) or the ETag of the current version, e.g. `\"3\"` \
             (quotes optional).",
        )
    }
);

impl IfMatch {
    /// `*`, or a version of 1 to 18 digits without a leading zero, bare or in
    /// quotes: exactly what the documented pattern admits.
    pub fn parse(&self) -> Result<Expect, ApiError> {
        let raw = self.0.as_str();
        if raw == "*" {
            return Ok(Expect::Exists);
        }
        let digits = raw
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or(raw);
        let well_formed = (1..=18).contains(&digits.len())
            && !digits.starts_with('0')
            && digits.bytes().all(|b| b.is_ascii_digit());
        if !well_formed {
            return Err(ApiError::invalid(
                "If-Match",
                format!(
                    "expected `*` or a version such as \"3\" (an ETag from this server), got {raw:?}"
                ),
            ));
        }
        store::parse_version("If-Match", digits).map(Expect::Version)
    }
}

documented!(
    /// `If-None-Match` on PUT: only `*` is meaningful there.
    CreateOnly(String),
    "CreateOnly",
    MetaSchema {
        enum_items: vec![serde_json::Value::String("*".into())],
        ..string_schema("`*`: create only; 409 `ALREADY_EXISTS` if a live value exists.")
    }
);

impl CreateOnly {
    pub fn parse(&self) -> Result<Expect, ApiError> {
        if self.0 == "*" {
            Ok(Expect::Absent)
        } else {
            Err(ApiError::invalid(
                "If-None-Match",
                "only `*` (create only) is supported on PUT",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_reads_exactly_what_its_pattern_admits() {
        for (raw, expected) in [
            ("*", Some(Expect::Exists)),
            ("3", Some(Expect::Version(3))),
            ("\"3\"", Some(Expect::Version(3))),
            (
                "999999999999999999",
                Some(Expect::Version(999_999_999_999_999_999)),
            ),
            ("", None),
            ("0", None),
            ("03", None),
            ("+3", None),
            ("\"3", None),
            ("3\"", None),
            ("W/\"3\"", None),
            ("1000000000000000000", None),
            (" 3", None),
        ] {
            assert_eq!(IfMatch(raw.into()).parse().ok(), expected, "{raw:?}");
        }
    }
}
