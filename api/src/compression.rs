//! gzip and brotli for answers that gain from it: HTML, CSS, JavaScript,
//! JSON and SVG bodies of at least [`MIN_BYTES`] whose length is known (no
//! streams, no WebSocket upgrades), chosen by the request's `Accept-Encoding`
//! (q-values honoured, brotli preferred on a tie). Every answer of such a type
//! carries `Vary: Accept-Encoding`. Headers such as `ETag` are kept as they are.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use poem::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use poem::{Body, Endpoint, IntoResponse, Request, Response};

/// Bodies smaller than this are sent as they are: the saving would not pay
/// for the work or the headers.
pub const MIN_BYTES: u64 = 1024;

/// Bodies larger than this are compressed off the async workers.
const BLOCKING_BYTES: usize = 64 * 1024;

/// A content coding kvql can send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Brotli,
}

impl Encoding {
    fn header_value(self) -> Option<HeaderValue> {
        match self {
            Encoding::Identity => None,
            Encoding::Gzip => Some(HeaderValue::from_static("gzip")),
            Encoding::Brotli => Some(HeaderValue::from_static("br")),
        }
    }
}

/// How hard to try: once-only work on static files may take its time.
#[derive(Clone, Copy)]
pub enum Effort {
    Fast,
    Best,
}

/// The coding to answer with, from every `Accept-Encoding` header of the
/// request. Without the header (or with only `identity`), none.
pub fn negotiate(headers: &HeaderMap) -> Encoding {
    let (mut br, mut gzip, mut star) = (None::<f32>, None::<f32>, None::<f32>);
    for (coding, q) in crate::headers::weighted(headers, &header::ACCEPT_ENCODING) {
        match coding.as_str() {
            "br" => br = Some(q),
            "gzip" | "x-gzip" => gzip = Some(q),
            "*" => star = Some(q),
            _ => {}
        }
    }
    let br = br.or(star).unwrap_or(0.0);
    let gzip = gzip.or(star).unwrap_or(0.0);
    if br > 0.0 && br >= gzip {
        Encoding::Brotli
    } else if gzip > 0.0 {
        Encoding::Gzip
    } else {
        Encoding::Identity
    }
}

/// Whether a body of this `Content-Type` shrinks when compressed.
pub fn compressible(content_type: &str) -> bool {
    let essence = crate::headers::essence(content_type);
    crate::headers::is_json(content_type)
        || matches!(
            essence.as_str(),
            "text/html"
                | "text/css"
                | "text/javascript"
                | "text/plain"
                | "application/javascript"
                | "image/svg+xml"
        )
}

/// `bytes` in `encoding` (`Identity`: unchanged), or `None` if the encoder
/// failed.
pub fn compress(bytes: &[u8], encoding: Encoding, effort: Effort) -> Option<Bytes> {
    match encoding {
        Encoding::Identity => Some(Bytes::copy_from_slice(bytes)),
        Encoding::Gzip => {
            let level = match effort {
                Effort::Fast => flate2::Compression::new(5),
                Effort::Best => flate2::Compression::best(),
            };
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::with_capacity(bytes.len() / 3), level);
            encoder.write_all(bytes).ok()?;
            encoder.finish().ok().map(Bytes::from)
        }
        Encoding::Brotli => {
            let params = brotli::enc::BrotliEncoderParams {
                quality: match effort {
                    Effort::Fast => 4,
                    Effort::Best => 9,
                },
                lgwin: 22,
                size_hint: bytes.len(),
                ..Default::default()
            };
            let mut out = Vec::with_capacity(bytes.len() / 4);
            let mut input = bytes;
            brotli::BrotliCompress(&mut input, &mut out, &params).ok()?;
            Some(out.into())
        }
    }
}

/// Appends `Accept-Encoding` to the answer's `Vary`, unless it is there.
pub fn add_vary(headers: &mut HeaderMap) {
    let present = headers.get_all(header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("accept-encoding") || t.trim() == "*")
        })
    });
    if !present {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// Wraps the whole app, outside the JSON-error middleware.
pub async fn around<E: Endpoint>(ep: Arc<E>, req: Request) -> poem::Result<Response> {
    let encoding = negotiate(req.headers());
    let head = req.method() == Method::HEAD;
    let resp = ep.call(req).await?.into_response();
    Ok(compress_response(resp, encoding, head).await)
}

async fn compress_response(resp: Response, encoding: Encoding, head: bool) -> Response {
    let status = resp.status();
    let compressible_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(compressible);
    if !compressible_type
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    add_vary(&mut parts.headers);
    let body: BoxBody<Bytes, std::io::Error> = body.into();
    let length = http_body::Body::size_hint(&body).exact();
    let body = Body::from(body);
    let worth_it = length.is_some_and(|n| n >= MIN_BYTES);
    if head
        || encoding == Encoding::Identity
        || !worth_it
        || parts.headers.contains_key(header::CONTENT_ENCODING)
    {
        return Response::from_parts(parts, body);
    }
    let Ok(bytes) = body.into_bytes().await else {
        return Response::from_parts(parts, Body::empty());
    };
    let compressed = if bytes.len() > BLOCKING_BYTES {
        let input = bytes.clone();
        tokio::task::spawn_blocking(move || compress(&input, encoding, Effort::Fast))
            .await
            .ok()
            .flatten()
    } else {
        compress(&bytes, encoding, Effort::Fast)
    };
    match (compressed, encoding.header_value()) {
        (Some(compressed), Some(coding)) if compressed.len() < bytes.len() => {
            parts.headers.insert(header::CONTENT_ENCODING, coding);
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(compressed))
        }
        _ => Response::from_parts(parts, Body::from(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> Encoding {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("")),
        );
        negotiate(&headers)
    }

    #[test]
    fn accept_encoding_is_read_with_its_q_values() {
        assert_eq!(negotiate(&HeaderMap::new()), Encoding::Identity);
        assert_eq!(accept("identity"), Encoding::Identity);
        assert_eq!(accept("gzip"), Encoding::Gzip);
        assert_eq!(accept("gzip, deflate, br"), Encoding::Brotli);
        assert_eq!(accept("br;q=0.5, gzip"), Encoding::Gzip);
        assert_eq!(accept("br;q=0, gzip;q=0"), Encoding::Identity);
        assert_eq!(accept("*"), Encoding::Brotli);
        assert_eq!(accept("*;q=0.1, br;q=0"), Encoding::Gzip);
        assert_eq!(accept("GZIP;Q=0.8"), Encoding::Gzip);
        assert_eq!(accept("deflate"), Encoding::Identity);
    }

    #[test]
    fn only_text_like_types_are_compressed() {
        assert!(compressible("text/html; charset=utf-8"));
        assert!(compressible("application/json"));
        assert!(compressible(
            "application/graphql-response+json; charset=utf-8"
        ));
        assert!(compressible("image/svg+xml"));
        assert!(!compressible("text/event-stream"));
        assert!(!compressible("image/png"));
    }
}
