//! Bounds on untrusted text, checked before anything recursive parses or
//! walks it: one linear pass over the bytes, no allocation, no recursion.
//!
//! - JSON (request bodies, GraphQL variables, WebSocket messages): nesting
//!   depth, and integers that do not fit in 64 bits (serde_json would round
//!   them to a float; kvql keeps numbers exact or refuses them).
//! - GraphQL documents: nesting depth of `{`, `[` and `(` (selections,
//!   literals, arguments, variable defaults), and the same integer rule.

use async_graphql_value::RAW_VALUE_TOKEN;

use crate::error::ApiError;

/// Most nesting levels accepted in JSON and in GraphQL documents when not
/// configured; far below where any parser or walk could exhaust a stack.
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// Highest configurable nesting limit: serde_json itself refuses more than
/// 128 levels, and every walk of a value must stay far from the stack's end.
pub const MAX_DEPTH_CEILING: usize = 100;

/// Checks JSON text: nesting at most `max_depth` arrays/objects deep, and
/// every integer literal within i64/u64. Invalid JSON passes (the parser
/// that runs next reports it); `what` names the input in the error.
pub fn check_json(bytes: &[u8], max_depth: usize, what: &str) -> Result<(), ApiError> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let end = skip_json_string(bytes, i + 1);
                if is_key(bytes, end) && is_raw_value_token(&bytes[i..end.min(bytes.len())]) {
                    return Err(ApiError::InvalidInput {
                        field: None,
                        message: format!(
                            "the {what} has an object key `{RAW_VALUE_TOKEN}`: the JSON \
                             library reserves it (it would read the object as other JSON), \
                             so kvql refuses it"
                        ),
                    });
                }
                i = end;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(too_deep(what, max_depth));
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'-' | b'0'..=b'9' => i = check_number(bytes, i, what)?,
            _ => i += 1,
        }
    }
    Ok(())
}

/// Checks a GraphQL document: `{`, `[` and `(` nested at most `max_depth`
/// deep, and every integer literal within i64/u64. Strings, block strings
/// and comments are skipped; names are skipped whole, so digits in them are
/// not numbers.
pub fn check_graphql(text: &str, max_depth: usize) -> Result<(), ApiError> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' && bytes[i] != b'\r' {
                    i += 1;
                }
            }
            b'"' if bytes[i..].starts_with(b"\"\"\"") => i = skip_block_string(bytes, i + 3),
            b'"' => i = skip_json_string(bytes, i + 1),
            b'{' | b'[' | b'(' => {
                depth += 1;
                if depth > max_depth {
                    return Err(too_deep("GraphQL document", max_depth));
                }
                i += 1;
            }
            b'}' | b']' | b')' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'_' | b'a'..=b'z' | b'A'..=b'Z' => {
                while i < bytes.len() && (bytes[i] == b'_' || bytes[i].is_ascii_alphanumeric()) {
                    i += 1;
                }
            }
            b'-' | b'0'..=b'9' => i = check_number(bytes, i, "GraphQL document")?,
            _ => i += 1,
        }
    }
    Ok(())
}

/// Longest number token serde_json writes (`-1.7976931348623157e308` is 23).
const LONGEST_WRITTEN_NUMBER: usize = 24;

/// JSON text as kvql writes it: PostgreSQL's JSONB prints numbers in plain
/// notation (`1e300` comes back as 301 digits, `5e-324` as 324 decimals),
/// which is the same double but not the text the client wrote, and an
/// integer literal beyond 64 bits that a client could not send back. Such
/// text is parsed and written again (shortest round-trip form); any other
/// text, which is nearly all of it, is returned as it is after one scan.
pub fn canonical_numbers(text: String) -> String {
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut long = false;
    while i < bytes.len() && !long {
        match bytes[i] {
            b'"' => i = skip_json_string(bytes, i + 1),
            b'-' | b'0'..=b'9' => {
                let (end, _) = scan_number(bytes, i);
                long = end - i > LONGEST_WRITTEN_NUMBER;
                i = end.max(i + 1);
            }
            _ => i += 1,
        }
    }
    if !long {
        return text;
    }
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(value) => value.to_string(),
        Err(_) => text,
    }
}

fn too_deep(what: &str, max_depth: usize) -> ApiError {
    ApiError::InvalidInput {
        field: None,
        message: format!(
            "the {what} is nested more than {max_depth} levels deep (the nesting limit)"
        ),
    }
}

/// Whether the quoted string `quoted` (quotes included) is serde_json's
/// raw-value token, written plainly or with escapes. serde_json (with its
/// `raw_value` feature, which sqlx turns on) does not read it as a key: an
/// object whose first key it is becomes the JSON text of its value, so
/// `{"<token>": "[1]"}` would be stored as `[1]`.
fn is_raw_value_token(quoted: &[u8]) -> bool {
    let inner = quoted.get(1..quoted.len().saturating_sub(1)).unwrap_or(&[]);
    if inner == RAW_VALUE_TOKEN.as_bytes() {
        return true;
    }
    // Escapes make it longer; at most six bytes per character (`\u0024`).
    inner.len() <= RAW_VALUE_TOKEN.len() * 6
        && inner.contains(&b'\\')
        && serde_json::from_slice::<String>(quoted).is_ok_and(|s| s == RAW_VALUE_TOKEN)
}

/// Whether the string ending before `end` is an object key: a colon follows.
fn is_key(bytes: &[u8], end: usize) -> bool {
    bytes
        .get(end..)
        .and_then(|rest| rest.iter().find(|b| !b.is_ascii_whitespace()))
        == Some(&b':')
}

/// The index after the string whose content starts at `i` (after its quote).
fn skip_json_string(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// The index after the block string whose content starts at `i`.
fn skip_block_string(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() {
        if bytes[i..].starts_with(b"\\\"\"\"") {
            i += 4;
        } else if bytes[i..].starts_with(b"\"\"\"") {
            return i + 3;
        } else {
            i += 1;
        }
    }
    i
}

/// The end of the number token starting at `start`, and whether it is an
/// integer (no fraction, no exponent).
fn scan_number(bytes: &[u8], start: usize) -> (usize, bool) {
    let mut i = start;
    let mut integer = true;
    while i < bytes.len() {
        match bytes[i] {
            b'0'..=b'9' => {}
            b'-' | b'+' if i == start || matches!(bytes[i - 1], b'e' | b'E') => {}
            b'.' | b'e' | b'E' => integer = false,
            _ => break,
        }
        i += 1;
    }
    (i, integer)
}

/// Reads the number starting at `start`; refuses an integer (no fraction,
/// no exponent) outside i64 and u64. Returns the index after the number.
fn check_number(bytes: &[u8], start: usize, what: &str) -> Result<usize, ApiError> {
    let (i, integer) = scan_number(bytes, start);
    if integer {
        let digits = &bytes[start..i];
        let text = std::str::from_utf8(digits).unwrap_or_default();
        let fits = if text.starts_with('-') {
            text.parse::<i64>().is_ok()
        } else {
            text.parse::<u64>().is_ok()
        };
        // A lone `-` or malformed text is left to the parser.
        if !fits && digits.iter().filter(|b| b.is_ascii_digit()).count() > 18 {
            let shown: String = text.chars().take(40).collect();
            return Err(ApiError::InvalidInput {
                field: None,
                message: format!(
                    "the {what} holds the integer {shown}{} which does not fit in 64 bits; \
                     numbers are kept exactly, so send larger integers as strings",
                    if text.len() > 40 { "…" } else { "" }
                ),
            });
        }
    }
    Ok(i.max(start + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(open: &str, close: &str, n: usize) -> String {
        format!("{}1{}", open.repeat(n), close.repeat(n))
    }

    #[test]
    fn json_nesting_is_bounded() {
        assert!(check_json(nested("[", "]", 64).as_bytes(), 64, "body").is_ok());
        let err = check_json(nested("[", "]", 65).as_bytes(), 64, "body").unwrap_err();
        assert_eq!(err.code(), "INVALID_INPUT");
        assert!(err.to_string().contains("64 levels"), "{err}");
        let objects = format!("{}1{}", "{\"a\":".repeat(65), "}".repeat(65));
        assert!(check_json(objects.as_bytes(), 64, "body").is_err());
        // Brackets inside strings do not count, escaped quotes do not end them.
        let s = format!("[\"{}\\\"{}\"]", "[".repeat(500), "{".repeat(500));
        assert!(check_json(s.as_bytes(), 2, "body").is_ok());
        // A million brackets: refused without recursion.
        let huge = "[".repeat(1_000_000);
        assert!(check_json(huge.as_bytes(), 64, "body").is_err());
    }

    #[test]
    fn the_raw_value_token_is_refused_as_a_key_in_any_spelling() {
        for bad in [
            r#"{"$serde_json::private::RawValue": "[1]"}"#,
            r#"[{"a": 1, "$serde_json::private::RawValue" : 2}]"#,
            r#"{"\u0024serde_json::private::RawValue":"1"}"#,
            r#"{"$serde_json::private::RawValu\u0065":"1"}"#,
        ] {
            let err = check_json(bad.as_bytes(), 64, "body").unwrap_err();
            assert_eq!(err.code(), "INVALID_INPUT", "{bad}");
            assert!(err.to_string().contains("RawValue"), "{err}");
        }
        for ok in [
            r#"{"v": "$serde_json::private::RawValue"}"#,
            r#"["$serde_json::private::RawValue", 1]"#,
            r#"{"$serde_json::private::RawValue2": 1, "x\"": 2}"#,
            r#"{"\u0024serde_json": 1}"#,
        ] {
            assert!(check_json(ok.as_bytes(), 64, "body").is_ok(), "{ok}");
        }
    }

    #[test]
    fn json_integers_beyond_64_bits_are_refused() {
        for ok in [
            "9223372036854775807",
            "-9223372036854775808",
            "18446744073709551615",
            "1e400",
            "0.97735852233959430000000001",
            "[1, -2, 3.5e-7]",
            "\"123456789012345678901234567890\"",
        ] {
            assert!(check_json(ok.as_bytes(), 64, "body").is_ok(), "{ok}");
        }
        for bad in [
            "18446744073709551616",
            "-9223372036854775809",
            "{\"a\": [123456789012345678901234567890]}",
        ] {
            let err = check_json(bad.as_bytes(), 64, "body").unwrap_err();
            assert!(err.to_string().contains("64 bits"), "{bad}: {err}");
        }
    }

    #[test]
    fn numbers_printed_in_plain_notation_are_written_back_as_kvql_writes_them() {
        let plain = format!(
            "[1{}, 0.{}5, \"{}\"]",
            "0".repeat(300),
            "0".repeat(323),
            "9".repeat(40)
        );
        let canonical = canonical_numbers(plain);
        assert_eq!(canonical, format!("[1e+300,5e-324,\"{}\"]", "9".repeat(40)));
        let usual = r#"{"a": [1, -2.5, 18446744073709551615, 0.9773585223395943]}"#.to_owned();
        assert_eq!(canonical_numbers(usual.clone()), usual);
    }

    #[test]
    fn graphql_nesting_counts_selections_literals_and_arguments() {
        let q = format!("{{object(key:{}){{key}}}}", nested("[", "]", 1600));
        let err = check_graphql(&q, 64).unwrap_err();
        assert!(err.to_string().contains("nested more than 64"), "{err}");
        let ok = format!("{{object(key:{}){{key}}}}", nested("[", "]", 60));
        assert!(check_graphql(&ok, 64).is_ok());
        let objects = format!("{{a(data:{}1{})}}", "{a:".repeat(70), "}".repeat(70));
        assert!(check_graphql(&objects, 64).is_err());
        let selections = format!("{}{}", "{a".repeat(70), "}".repeat(70));
        assert!(check_graphql(&selections, 64).is_err());
        let defaults = format!("query($v: [Int] = {}) {{a}}", nested("[", "]", 70));
        assert!(check_graphql(&defaults, 64).is_err());
    }

    #[test]
    fn graphql_strings_comments_and_names_are_skipped() {
        let q = format!(
            "# {{{{{{[[[[ 123456789012345678901234567890\n{{a(s: \"{}\", b: \"\"\"{} \\\"\"\" ]]]\"\"\") {{ field12345678901234567890123 }}}}",
            "[".repeat(200),
            "{".repeat(200)
        );
        assert!(check_graphql(&q, 4).is_ok(), "{q}");
    }

    #[test]
    fn graphql_integers_beyond_64_bits_are_refused() {
        assert!(check_graphql("{a(n: 9223372036854775807)}", 64).is_ok());
        assert!(check_graphql("{a(n: 1.5e300)}", 64).is_ok());
        let err = check_graphql("{a(n: 123456789012345678901234567890)}", 64).unwrap_err();
        assert!(err.to_string().contains("64 bits"), "{err}");
    }
}
