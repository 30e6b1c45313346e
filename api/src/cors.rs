//! Cross-origin requests from browser apps (CORS), for clients that send a
//! bearer token: kvql never asks a browser to send cookies, so it never sends
//! `Access-Control-Allow-Credentials`.
//!
//! This layer wraps the whole app, so every answer, errors included, carries
//! the CORS headers, and a preflight is answered here: it needs no token,
//! reaches no route and counts as no login attempt.

use poem::http::{HeaderValue, Method, StatusCode, header};
use poem::{Endpoint, IntoResponse, Middleware, Request, Response};

use crate::error::ApiError;

/// Which browser origins may call kvql (`KVQL_CORS_ORIGINS`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CorsOrigins {
    /// `*`: any origin.
    Any,
    /// Only these origins, as browsers serialise them (`https://app.example.com`).
    List(Vec<String>),
    /// `none`: no CORS headers at all; browsers refuse cross-origin calls.
    Off,
}

/// The request headers a browser app may send: kvql's own, and those that
/// Apollo Client and OpenTelemetry's fetch instrumentation add.
const ALLOW_HEADERS: &str = "Authorization, Content-Type, Accept, If-Match, If-None-Match, \
     X-Request-Id, Apollo-Require-Preflight, X-Apollo-Operation-Name, \
     ApolloGraphQL-Client-Name, ApolloGraphQL-Client-Version, traceparent, tracestate";

/// The answer headers a browser app may read besides the safelisted ones.
const EXPOSE_HEADERS: &str = "ETag, X-Request-Id, Retry-After, WWW-Authenticate, Allow";

/// How long a browser may cache a preflight answer, in seconds (browsers cap
/// it lower: Chrome at 2 hours).
const MAX_AGE: &str = "86400";

/// Parses `KVQL_CORS_ORIGINS`: `*`, `none`, or comma-separated origins.
pub fn parse_origins(s: &str) -> Result<CorsOrigins, String> {
    let s = s.trim();
    if s == "*" {
        return Ok(CorsOrigins::Any);
    }
    if s.eq_ignore_ascii_case("none") {
        return Ok(CorsOrigins::Off);
    }
    if s.is_empty() {
        return Err("empty: give `*` (any origin), `none` (CORS off) or a comma-separated list of origins such as https://app.example.com".into());
    }
    let mut origins = Vec::new();
    for part in s.split(',').map(str::trim) {
        if part == "*" || part.eq_ignore_ascii_case("none") {
            return Err(format!(
                "`{part}` must stand alone, not in a list of origins"
            ));
        }
        let origin = parse_origin(part)?;
        if !origins.contains(&origin) {
            origins.push(origin);
        }
    }
    Ok(CorsOrigins::List(origins))
}

/// One origin, `scheme://host[:port]`, in the form browsers send in `Origin`:
/// lower case, without the scheme's default port.
fn parse_origin(s: &str) -> Result<String, String> {
    let malformed = |why: &str| {
        format!(
            "{s:?} is not an origin ({why}): expected scheme://host[:port], \
             e.g. https://app.example.com or http://localhost:3000"
        )
    };
    let (scheme, authority) = s.split_once("://").ok_or_else(|| malformed("no `://`"))?;
    let scheme = scheme.to_ascii_lowercase();
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok {
        return Err(malformed("bad scheme"));
    }
    if authority.contains(['/', '?', '#']) {
        return Err(malformed("an origin has no path, not even a trailing `/`"));
    }
    if authority.contains('@') {
        return Err(malformed("an origin has no user name"));
    }
    let authority = authority.to_ascii_lowercase();
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (addr, rest) = v6
                .split_once(']')
                .ok_or_else(|| malformed("unclosed `[`"))?;
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(malformed("bad IPv6 address"));
            }
            let port = match rest {
                "" => None,
                _ => Some(
                    rest.strip_prefix(':')
                        .ok_or_else(|| malformed("bad port"))?,
                ),
            };
            (format!("[{addr}]"), port)
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (authority.clone(), None),
        },
    };
    let host_ok = !host.is_empty()
        && (host.starts_with('[')
            || host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c)));
    if !host_ok {
        return Err(malformed("bad host"));
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
            _ => return Err(malformed("bad port")),
        },
    };
    let default_port = match scheme.as_str() {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    };
    Ok(match port {
        Some(p) if Some(p) != default_port => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// The CORS layer for `origins`.
pub struct Cors {
    origins: CorsOrigins,
}

impl Cors {
    pub fn new(origins: CorsOrigins) -> Self {
        Cors { origins }
    }
}

impl<E: Endpoint> Middleware<E> for Cors {
    type Output = CorsEndpoint<E>;

    fn transform(&self, inner: E) -> CorsEndpoint<E> {
        CorsEndpoint {
            inner,
            origins: self.origins.clone(),
            allow_methods: HeaderValue::from_str(&crate::rest::all_methods())
                .unwrap_or_else(|_| HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE")),
        }
    }
}

pub struct CorsEndpoint<E> {
    inner: E,
    origins: CorsOrigins,
    allow_methods: HeaderValue,
}

impl<E: Endpoint> CorsEndpoint<E> {
    /// The `Access-Control-Allow-Origin` for a request from `origin`, if allowed.
    fn allowed(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        match &self.origins {
            CorsOrigins::Any => Some(HeaderValue::from_static("*")),
            CorsOrigins::List(list) => {
                let origin = origin?;
                let text = origin.to_str().ok()?;
                list.iter()
                    .any(|o| o.eq_ignore_ascii_case(text))
                    .then(|| origin.clone())
            }
            CorsOrigins::Off => None,
        }
    }
}

impl<E: Endpoint> Endpoint for CorsEndpoint<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if self.origins == CorsOrigins::Off {
            return Ok(self.inner.get_response(req).await);
        }
        let origin = req.headers().get(header::ORIGIN).cloned();
        let allowed = self.allowed(origin.as_ref());
        let preflight = origin.is_some()
            && req.method() == Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        let mut resp = if !preflight {
            let mut resp = self.inner.get_response(req).await;
            if allowed.is_some() {
                resp.headers_mut().insert(
                    header::ACCESS_CONTROL_EXPOSE_HEADERS,
                    HeaderValue::from_static(EXPOSE_HEADERS),
                );
            }
            resp
        } else if allowed.is_some() {
            Response::builder()
                .status(StatusCode::NO_CONTENT)
                .header(
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    self.allow_methods.clone(),
                )
                .header(
                    header::ACCESS_CONTROL_ALLOW_HEADERS,
                    HeaderValue::from_static(ALLOW_HEADERS),
                )
                .header(
                    header::ACCESS_CONTROL_MAX_AGE,
                    HeaderValue::from_static(MAX_AGE),
                )
                .finish()
        } else {
            ApiError::Forbidden(
                "this origin may not call this server from a browser (see KVQL_CORS_ORIGINS)"
                    .into(),
            )
            .into_response()
        };
        let headers = resp.headers_mut();
        if let Some(allowed) = allowed {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        }
        // With a list, the answer depends on the origin: caches must key on it.
        if matches!(self.origins, CorsOrigins::List(_)) {
            headers.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_in_the_documented_forms() {
        assert_eq!(parse_origins("*"), Ok(CorsOrigins::Any));
        assert_eq!(parse_origins("none"), Ok(CorsOrigins::Off));
        assert_eq!(parse_origins(" NONE "), Ok(CorsOrigins::Off));
        assert_eq!(
            parse_origins("https://App.Example.com, http://localhost:3000,https://a.io:443"),
            Ok(CorsOrigins::List(vec![
                "https://app.example.com".into(),
                "http://localhost:3000".into(),
                "https://a.io".into(),
            ]))
        );
        assert_eq!(
            parse_origins("http://[::1]:8080"),
            Ok(CorsOrigins::List(vec!["http://[::1]:8080".into()]))
        );
    }

    #[test]
    fn malformed_origins_are_refused_with_the_reason() {
        for (bad, why) in [
            ("", "empty"),
            ("app.example.com", "no `://`"),
            ("https://app.example.com/", "no path"),
            ("https://app.example.com/x", "no path"),
            ("https://user@app.example.com", "user name"),
            ("https://", "bad host"),
            ("https://app example.com", "bad host"),
            ("https://app.example.com:0", "bad port"),
            ("https://app.example.com:99999", "bad port"),
            ("https://app.example.com:+80", "bad port"),
            ("1http://a.com", "bad scheme"),
            ("http://[::1", "unclosed"),
            ("https://a.com,*", "stand alone"),
        ] {
            let err = parse_origins(bad).expect_err(bad);
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
