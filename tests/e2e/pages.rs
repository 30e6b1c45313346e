//! The browser pages (GraphiQL on `/graphql`, Swagger UI on `/docs`), the
//! files they load, and compression of answers.

use std::io::Read;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

const PAGES: [&str; 2] = ["/graphql", "/docs"];

/// An answer with its body exactly as sent.
struct Raw {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn vary_mentions_accept_encoding(&self) -> bool {
        self.headers.get_all("vary").iter().any(|v| {
            v.to_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains("accept-encoding")
        })
    }

    /// The body with its `Content-Encoding` undone.
    fn decoded(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self.header("content-encoding") {
            None => out.clone_from(&self.body),
            Some("gzip") => {
                flate2::read::GzDecoder::new(&self.body[..])
                    .read_to_end(&mut out)
                    .expect("gzip body");
            }
            Some("br") => {
                brotli::Decompressor::new(&self.body[..], 4096)
                    .read_to_end(&mut out)
                    .expect("brotli body");
            }
            Some(other) => panic!("unexpected Content-Encoding {other}"),
        }
        out
    }
}

/// What a browser sends when it navigates to a page: `/graphql` answers
/// programs with GraphQL and browsers with GraphiQL.
const BROWSER_ACCEPT: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";

/// `GET path` as a browser navigating to it.
async fn page(app: &TestApp, path: &str) -> Resp {
    app.send(
        app.request(reqwest::Method::GET, path, None)
            .header("accept", BROWSER_ACCEPT),
    )
    .await
}

async fn raw(app: &TestApp, path: &str, token: Option<&str>, accept_encoding: Option<&str>) -> Raw {
    let mut req = app
        .request(reqwest::Method::GET, path, token)
        .header("accept", BROWSER_ACCEPT);
    if let Some(value) = accept_encoding {
        req = req.header("accept-encoding", value);
    }
    let resp = req.send().await.expect("request");
    Raw {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.bytes().await.expect("body").to_vec(),
    }
}

/// The values of every `src="…"` and `href="…"` in `html`.
fn references(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    for attribute in ["src=\"", "href=\""] {
        for part in html.split(attribute).skip(1) {
            found.push(part.split('"').next().unwrap().to_owned());
        }
    }
    found
}

#[tokio::test]
async fn both_pages_have_a_doctype_a_viewport_a_title_and_kvqls_favicon() {
    let app = TestApp::spawn().await;
    for path in PAGES {
        let r = page(&app, path).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type").unwrap().starts_with("text/html"),
            "{path}"
        );
        assert!(r.text.starts_with("<!DOCTYPE html>"), "{path}");
        assert!(
            r.text.contains(
                r#"<meta name="viewport" content="width=device-width, initial-scale=1">"#
            ),
            "{path}"
        );
        let title = r.text.split("<title>").nth(1).unwrap().split("</title>");
        assert!(
            title.clone().next().unwrap().contains("kvql"),
            "{path}: {title:?}"
        );
        assert!(
            r.text
                .contains(r#"<link rel="icon" href="/favicon.svg" type="image/svg+xml">"#),
            "{path}"
        );
    }
    for icon in ["/favicon.svg", "/favicon.ico"] {
        let r = raw(&app, icon, None, None).await;
        assert_eq!(r.status, 200, "{icon}");
        assert_eq!(r.header("content-type"), Some("image/svg+xml"), "{icon}");
        assert!(String::from_utf8(r.body).unwrap().starts_with("<svg"));
    }
}

#[tokio::test]
async fn pages_load_only_same_origin_files_that_are_versioned_and_cacheable_for_a_year() {
    let app = TestApp::spawn().await;
    for path in PAGES {
        let r = page(&app, path).await;
        assert!(
            !r.text.contains("http://") && !r.text.contains("https://"),
            "{path} names another origin"
        );
        let refs = references(&r.text);
        assert!(refs.len() >= 3, "{path}: {refs:?}");
        for reference in refs {
            assert!(
                reference.starts_with('/') && !reference.starts_with("//"),
                "{path} loads {reference}"
            );
            let asset = raw(&app, &reference, None, None).await;
            assert_eq!(asset.status, 200, "{reference}");
            let content_type = asset.header("content-type").unwrap();
            let expected = match reference.rsplit('.').next().unwrap() {
                "js" => "text/javascript",
                "css" => "text/css",
                "svg" => "image/svg+xml",
                other => panic!("{path} loads an unexpected kind of file: {other}"),
            };
            assert!(
                content_type.starts_with(expected),
                "{reference}: {content_type}"
            );
            if reference.contains("/assets/") {
                let version = reference.split('/').nth(3).unwrap();
                assert!(
                    version.rsplit('-').next().unwrap().contains('.'),
                    "{reference} names no version"
                );
                assert_eq!(
                    asset.header("cache-control"),
                    Some("public, max-age=31536000, immutable"),
                    "{reference}"
                );
                assert_eq!(asset.header("x-content-type-options"), Some("nosniff"));
            }
        }
    }
}

#[tokio::test]
async fn graphiql_opens_on_a_login_then_reads_a_key() {
    let app = TestApp::spawn().await;
    let r = page(&app, "/graphql").await;
    let login = r.text.find("login(username:").expect("a login mutation");
    let read = r.text.find("object(key:").expect("a read of a key");
    assert!(login < read);
    assert!(r.text.contains("/graphql/ws"));
    assert!(!r.text.contains("development"), "React's production build");
}

#[tokio::test]
async fn unknown_asset_paths_answer_404_in_json() {
    let app = TestApp::spawn().await;
    for path in [
        "/graphql/assets/graphiql-0.0.0/graphiql.min.js",
        "/docs/assets/nothing.js",
    ] {
        app.get(path, None).await.assert_error(404, "NOT_FOUND");
    }
}

#[tokio::test]
async fn large_answers_come_compressed_as_accepted_and_decompress_to_the_same_bytes() {
    let app = TestApp::spawn().await;
    let user = app.writer().await;
    let big = "x".repeat(4096);
    app.create(&user, "big", json!({ "text": big }), None).await;
    let graphiql_js = references(&page(&app, "/graphql").await.text)
        .into_iter()
        .find(|r| r.ends_with("graphiql.min.js"))
        .unwrap();
    let paths = [
        graphiql_js.as_str(),
        "/graphql",
        "/openapi.json",
        "/api/object/big",
    ];
    for path in paths {
        let plain = raw(&app, path, Some(&user.token), None).await;
        assert_eq!(plain.status, 200, "{path}");
        assert_eq!(plain.header("content-encoding"), None, "{path}");
        for (accept, coding) in [
            ("gzip", "gzip"),
            ("br", "br"),
            ("gzip, deflate, br, zstd", "br"),
            ("br;q=0.5, gzip;q=0.9", "gzip"),
            ("*", "br"),
        ] {
            let r = raw(&app, path, Some(&user.token), Some(accept)).await;
            assert_eq!(r.status, 200, "{path} {accept}");
            assert_eq!(
                r.header("content-encoding"),
                Some(coding),
                "{path} {accept}"
            );
            assert!(r.vary_mentions_accept_encoding(), "{path} {accept}");
            assert!(r.body.len() < plain.body.len(), "{path} {accept}");
            assert_eq!(
                r.header("content-length"),
                Some(r.body.len().to_string().as_str()),
                "{path} {accept}"
            );
            assert_eq!(r.header("content-type"), plain.header("content-type"));
            assert!(r.decoded() == plain.body, "{path} {accept}: other bytes");
        }
    }
}

#[tokio::test]
async fn identity_or_no_accept_encoding_gives_plain_bytes() {
    let app = TestApp::spawn().await;
    let plain = raw(&app, "/openapi.json", None, None).await;
    assert!(plain.body.len() > 1024);
    assert!(plain.vary_mentions_accept_encoding());
    for accept in ["identity", "gzip;q=0, br;q=0", "deflate", "br;q=0, *;q=0"] {
        let r = raw(&app, "/openapi.json", None, Some(accept)).await;
        assert_eq!(r.header("content-encoding"), None, "{accept}");
        assert_eq!(r.body, plain.body, "{accept}");
    }
}

#[tokio::test]
async fn small_answers_and_error_answers_stay_readable() {
    let app = TestApp::spawn().await;
    let user = app.writer().await;
    app.create(&user, "small", json!({"a": 1}), None).await;
    for path in ["/healthz", "/api/object/small", "/no-such-route"] {
        let r = raw(&app, path, Some(&user.token), Some("gzip, br")).await;
        assert_eq!(r.header("content-encoding"), None, "{path}");
        serde_json::from_slice::<serde_json::Value>(&r.body).expect("plain JSON");
    }
    let missing = raw(&app, "/api/object/missing", Some(&user.token), Some("br")).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("content-encoding"), None);
}

#[tokio::test]
async fn etags_and_conditional_reads_work_on_compressed_answers() {
    let app = TestApp::spawn().await;
    let user = app.writer().await;
    app.create(&user, "big", json!("y".repeat(2048)), None)
        .await;
    let r = raw(&app, "/api/object/big", Some(&user.token), Some("br")).await;
    assert_eq!(r.header("content-encoding"), Some("br"));
    assert_eq!(r.header("etag"), Some("\"1\""));
    let again = app
        .send(
            app.request(reqwest::Method::GET, "/api/object/big", Some(&user.token))
                .header("accept-encoding", "br")
                .header("if-none-match", "\"1\""),
        )
        .await;
    assert_eq!(again.status, 304);
    assert_eq!(again.header("content-encoding"), None);
    assert!(again.text.is_empty());
}

#[tokio::test]
async fn websocket_upgrades_work_when_the_client_accepts_compression() {
    let app = TestApp::spawn().await;
    let user = app.writer().await;
    for path in ["/graphql/ws", "/graphql"] {
        let url = app.url(path).replacen("http://", "ws://", 1);
        let mut request = url.into_client_request().unwrap();
        let headers = request.headers_mut();
        headers.insert(
            "sec-websocket-protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        headers.insert("accept-encoding", "gzip, br".parse().unwrap());
        let (mut ws, resp) = tokio_tungstenite::connect_async(request)
            .await
            .expect("upgrade");
        assert_eq!(resp.status(), 101, "{path}");
        assert!(resp.headers().get("content-encoding").is_none(), "{path}");
        let init = json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {}", user.token)}});
        ws.send(Message::Text(init.to_string().into()))
            .await
            .unwrap();
        let subscribe =
            json!({"id": "1", "type": "subscribe", "payload": {"query": "{ me { username } }"}});
        ws.send(Message::Text(subscribe.to_string().into()))
            .await
            .unwrap();
        let mut seen = Vec::new();
        while let Some(message) = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer within 10 s after {seen:?}"))
        {
            let Message::Text(text) = message.expect("message") else {
                continue;
            };
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            seen.push(value["type"].as_str().unwrap_or_default().to_owned());
            if value["type"] == "next" {
                assert_eq!(
                    value["payload"]["data"]["me"]["username"],
                    user.username.as_str()
                );
                break;
            }
            assert!(seen.len() < 5, "{path}: {seen:?}");
        }
        assert_eq!(seen, ["connection_ack", "next"], "{path}");
    }
}
