//! The pages a person opens in a browser: GraphiQL on `GET /graphql` and
//! Swagger UI on `/docs`, with the favicon. Every script and style they load
//! is compiled into the binary from `vendor/` (see `vendor/refresh.sh`) and
//! served under a path that names its version, cacheable for a year, so the
//! pages work on a network that reaches nothing but kvql.

use std::sync::{LazyLock, OnceLock};

use bytes::Bytes;
use poem::http::{HeaderValue, StatusCode, header};
use poem::web::Html;
use poem::{Body, Endpoint, Request, Response, Route, get, handler};

use crate::compression::{self, Effort, Encoding};

/// The GraphiQL release served (`vendor/graphiql/graphiql.min.*`).
pub const GRAPHIQL_VERSION: &str = "4.1.2";
/// The React release GraphiQL runs on (`vendor/graphiql/react*.production.min.js`).
pub const REACT_VERSION: &str = "18.3.1";
/// The Swagger UI release served (`vendor/swagger-ui/`).
pub const SWAGGER_UI_VERSION: &str = "5.35.0";

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

const FAVICON: &[u8] = include_bytes!("favicon.svg");

/// A vendored file, with its compressed forms made on first use (`None`
/// if compressing failed: the plain bytes are sent).
struct Asset {
    path: String,
    content_type: &'static str,
    bytes: &'static [u8],
    gzip: OnceLock<Option<Bytes>>,
    brotli: OnceLock<Option<Bytes>>,
}

impl Asset {
    fn new(path: String, content_type: &'static str, bytes: &'static [u8]) -> Asset {
        Asset {
            path,
            content_type,
            bytes,
            gzip: OnceLock::new(),
            brotli: OnceLock::new(),
        }
    }

    fn cell(&self, encoding: Encoding) -> Option<&OnceLock<Option<Bytes>>> {
        match encoding {
            Encoding::Identity => None,
            Encoding::Gzip => Some(&self.gzip),
            Encoding::Brotli => Some(&self.brotli),
        }
    }

    /// The file in `encoding`, compressing it on first use.
    fn encoded(&self, encoding: Encoding) -> Option<&Bytes> {
        self.cell(encoding)?
            .get_or_init(|| compression::compress(self.bytes, encoding, Effort::Best))
            .as_ref()
    }

    /// The file in `encoding` if it was compressed already (`Some(None)`:
    /// the encoder failed, send it plain).
    fn cached(&self, encoding: Encoding) -> Option<Option<&Bytes>> {
        self.cell(encoding)?.get().map(Option::as_ref)
    }
}

static ASSETS: LazyLock<Vec<Asset>> = LazyLock::new(|| {
    let graphiql = format!("/graphql/assets/graphiql-{GRAPHIQL_VERSION}");
    let react = format!("/graphql/assets/react-{REACT_VERSION}");
    let swagger = format!("/docs/assets/swagger-ui-{SWAGGER_UI_VERSION}");
    vec![
        Asset::new(
            format!("{graphiql}/graphiql.min.js"),
            JAVASCRIPT,
            include_bytes!("../../../vendor/graphiql/graphiql.min.js"),
        ),
        Asset::new(
            format!("{graphiql}/graphiql.min.css"),
            CSS,
            include_bytes!("../../../vendor/graphiql/graphiql.min.css"),
        ),
        Asset::new(
            format!("{react}/react.production.min.js"),
            JAVASCRIPT,
            include_bytes!("../../../vendor/graphiql/react.production.min.js"),
        ),
        Asset::new(
            format!("{react}/react-dom.production.min.js"),
            JAVASCRIPT,
            include_bytes!("../../../vendor/graphiql/react-dom.production.min.js"),
        ),
        Asset::new(
            format!("{swagger}/swagger-ui-bundle.js"),
            JAVASCRIPT,
            include_bytes!("../../../vendor/swagger-ui/swagger-ui-bundle.js"),
        ),
        Asset::new(
            format!("{swagger}/swagger-ui.css"),
            CSS,
            include_bytes!("../../../vendor/swagger-ui/swagger-ui.css"),
        ),
    ]
});

static GRAPHIQL_PAGE: LazyLock<String> = LazyLock::new(|| {
    let default_query = serde_json::to_string(include_str!("default.graphql")).unwrap_or_default();
    include_str!("graphiql.html")
        .replace("{graphiql}", GRAPHIQL_VERSION)
        .replace("{react}", REACT_VERSION)
        .replace("{default_query}", &default_query)
});

static DOCS_PAGE: LazyLock<String> =
    LazyLock::new(|| include_str!("docs.html").replace("{swagger_ui}", SWAGGER_UI_VERSION));

/// GraphiQL, talking to `/graphql` and subscribing over `/graphql/ws`; the
/// headers typed into its Headers tab also go into `connection_init`.
pub fn graphiql() -> Html<&'static str> {
    Html(GRAPHIQL_PAGE.as_str())
}

#[handler]
fn docs() -> Html<&'static str> {
    Html(DOCS_PAGE.as_str())
}

/// `/docs`: Swagger UI for `/openapi.json`, and its files.
pub fn docs_routes() -> impl Endpoint {
    Route::new()
        .at("/", get(docs))
        .at("/assets/*path", get(asset))
}

/// kvql's icon, for `/favicon.svg` and `/favicon.ico`.
#[handler]
pub fn favicon() -> Response {
    Response::builder()
        .content_type(SVG)
        .header(header::CACHE_CONTROL, "public, max-age=86400")
        .body(FAVICON)
}

/// A vendored file by its full path (`/graphql/assets/…`, `/docs/assets/…`),
/// compressed as the client accepts, computed once per file and coding.
#[handler]
pub async fn asset(req: &Request) -> Response {
    let path = req.original_uri().path();
    let Some(asset) = ASSETS.iter().find(|a| a.path == path) else {
        return StatusCode::NOT_FOUND.into();
    };
    let encoding = compression::negotiate(req.headers());
    let encoded = match encoding {
        Encoding::Identity => None,
        // Compressed once per process; only that first time is slow work.
        _ => match asset.cached(encoding) {
            Some(done) => done.cloned(),
            None => tokio::task::spawn_blocking(move || asset.encoded(encoding).cloned())
                .await
                .ok()
                .flatten(),
        },
    };
    let mut resp = Response::builder()
        .content_type(asset.content_type)
        .header(header::CACHE_CONTROL, IMMUTABLE)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    let body = match encoded {
        Some(bytes) => {
            let coding = if encoding == Encoding::Brotli {
                "br"
            } else {
                "gzip"
            };
            resp = resp.header(header::CONTENT_ENCODING, HeaderValue::from_static(coding));
            Body::from(bytes)
        }
        None => Body::from(asset.bytes),
    };
    let mut resp = resp.body(body);
    compression::add_vary(resp.headers_mut());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graphiql_subscribes_through_its_fetcher_which_sends_the_headers_tab() {
        // createFetcher puts the Headers tab into connection_init only when it
        // makes the socket itself: from `subscriptionUrl`, not a `wsClient`.
        let page = graphiql().0;
        assert!(page.contains("subscriptionUrl: wsUrl.toString()"));
        assert!(!page.contains("wsClient:"));
    }

    #[test]
    fn every_page_reference_to_an_asset_is_served() {
        for page in [GRAPHIQL_PAGE.as_str(), DOCS_PAGE.as_str()] {
            for part in page.split("/assets/").skip(1) {
                let rest = part.split('"').next().unwrap_or_default();
                let prefix = if page.contains("swagger") {
                    "/docs/assets/"
                } else {
                    "/graphql/assets/"
                };
                let path = format!("{prefix}{rest}");
                assert!(
                    ASSETS.iter().any(|a| a.path == path),
                    "{path} is not served"
                );
            }
        }
    }
}
