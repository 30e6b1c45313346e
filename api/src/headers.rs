//! Header values read one way everywhere: the weighted lists of `Accept`
//! and `Accept-Encoding` (RFC 9110 §12.4) and media types.

use poem::http::HeaderMap;
use poem::http::header::HeaderName;

/// Most items read from one header's lists: negotiation needs a handful.
const MAX_ITEMS: usize = 64;

/// Each item of every `name` header as (lower-cased value without its
/// parameters, q). A missing q is 1; a q that is not a number from 0 to 1
/// is 0, so a malformed preference never wins.
pub fn weighted<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = (String, f32)> + 'a {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .take(MAX_ITEMS)
        .filter_map(|item| {
            let mut parts = item.split(';');
            let value = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            if value.is_empty() {
                return None;
            }
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, v)| v.trim().parse::<f32>().ok())
                .filter(|q| (0.0..=1.0).contains(q))
                .unwrap_or(0.0);
            Some((value, q))
        })
}

/// The media type of a `Content-Type` value without its parameters,
/// lower-cased: `Application/JSON; charset=utf-8` is `application/json`.
pub fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether a `Content-Type` is JSON: `application/json` or any
/// `application/*+json`.
pub fn is_json(content_type: &str) -> bool {
    let essence = essence(content_type);
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use poem::http::{HeaderValue, header};

    fn items(values: &[&str]) -> Vec<(String, f32)> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        }
        weighted(&headers, &header::ACCEPT).collect()
    }

    #[test]
    fn items_and_weights_are_read_from_every_header() {
        assert_eq!(
            items(&["Text/HTML, application/json;q=0.9", "*/*; Q = 0.1"]),
            vec![
                ("text/html".into(), 1.0),
                ("application/json".into(), 0.9),
                ("*/*".into(), 0.1)
            ]
        );
        assert_eq!(
            items(&["br;q=0.5x, gzip;q=2, ,identity;charset=x"]),
            vec![
                ("br".into(), 0.0),
                ("gzip".into(), 0.0),
                ("identity".into(), 1.0)
            ]
        );
        assert_eq!(items(&[&"a,".repeat(1000)]).len(), MAX_ITEMS);
    }

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("application/json; charset=utf-8"));
        assert!(is_json("Application/JSON"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json("application/x-www-form-urlencoded"));
    }
}
