//! The `Allow` header of a 405: the methods a path accepts, read from the
//! REST API's own route table (the one OpenAPI documents), so that a new
//! route or method is listed without anyone remembering to.

use std::sync::LazyLock;

use poem::http::Method;
use poem_openapi::OpenApi;

use super::Apis;

/// One route: its path split into segments (`None` for a `{param}`) and
/// the methods it accepts, HEAD included wherever GET is (poem answers HEAD
/// with the GET route). A route ending in `*` takes any longer path.
struct Route {
    segments: Vec<Option<String>>,
    rest: bool,
    methods: Vec<Method>,
}

const GET_HEAD: &[Method] = &[Method::GET, Method::HEAD];

/// The routes `app` mounts outside the OpenAPI document (GraphQL, the pages
/// and their files, the spec), which poem cannot list: keep this in step
/// with `App::endpoint`, `graphql::routes` and `pages::docs_routes`.
const OTHER_ROUTES: &[(&str, &[Method])] = &[
    ("/graphql", &[Method::GET, Method::HEAD, Method::POST]),
    ("/graphql/ws", GET_HEAD),
    ("/graphql/assets/*", GET_HEAD),
    ("/docs", GET_HEAD),
    ("/docs/", GET_HEAD),
    ("/docs/assets/*", GET_HEAD),
    ("/openapi.json", GET_HEAD),
    ("/favicon.svg", GET_HEAD),
    ("/favicon.ico", GET_HEAD),
];

static ROUTES: LazyLock<Vec<Route>> = LazyLock::new(|| {
    let mut routes: Vec<Route> = OTHER_ROUTES
        .iter()
        .map(|(path, methods)| {
            let (path, rest) = match path.strip_suffix("/*") {
                Some(prefix) => (prefix, true),
                None => (*path, false),
            };
            Route {
                segments: path.split('/').map(|s| Some(s.to_owned())).collect(),
                rest,
                methods: methods.to_vec(),
            }
        })
        .collect();
    for path in <Apis as OpenApi>::meta()
        .into_iter()
        .flat_map(|api| api.paths)
    {
        let segments = path
            .path
            .split('/')
            .map(|s| (!(s.starts_with('{') && s.ends_with('}'))).then(|| s.to_owned()))
            .collect();
        let mut methods: Vec<Method> = path.operations.iter().map(|o| o.method.clone()).collect();
        if methods.contains(&Method::GET) {
            methods.push(Method::HEAD);
        }
        routes.push(Route {
            segments,
            rest: false,
            methods,
        });
    }
    routes
});

/// The value of `Allow` for `path` (as requested, still percent-encoded),
/// e.g. `GET, PUT, DELETE, HEAD`; `None` if no route has this path.
pub fn allowed_methods(path: &str) -> Option<String> {
    let requested: Vec<&str> = path.split('/').collect();
    ROUTES
        .iter()
        .find(|route| {
            let length_fits = if route.rest {
                requested.len() > route.segments.len()
                    && requested[route.segments.len()..]
                        .iter()
                        .all(|s| !s.is_empty())
            } else {
                route.segments.len() == requested.len()
            };
            length_fits
                && route
                    .segments
                    .iter()
                    .zip(&requested)
                    .all(|(want, got)| match want {
                        Some(literal) => literal == got,
                        // A parameter takes one non-empty segment.
                        None => !got.is_empty(),
                    })
        })
        .map(|route| {
            route
                .methods
                .iter()
                .map(Method::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
}

/// Every method some route accepts, e.g. `GET, HEAD, POST, PUT, DELETE`:
/// what a CORS preflight answers in `Access-Control-Allow-Methods`.
pub fn all_methods() -> String {
    let mut all: Vec<&Method> = Vec::new();
    for method in ROUTES.iter().flat_map(|r| &r.methods) {
        if !all.contains(&method) {
            all.push(method);
        }
    }
    let order = |m: &Method| {
        [
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ]
        .iter()
        .position(|o| o == m)
        .unwrap_or(usize::MAX)
    };
    all.sort_by_key(|m| order(m));
    all.iter()
        .map(|m| m.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rest_path_lists_its_methods() {
        assert_eq!(allowed_methods("/login").as_deref(), Some("POST"));
        assert_eq!(
            allowed_methods("/api/object/a%2Fb").as_deref(),
            Some("GET, PUT, DELETE, HEAD")
        );
        assert_eq!(
            allowed_methods("/api/batch/object").as_deref(),
            Some("POST, PUT")
        );
        assert_eq!(allowed_methods("/healthz").as_deref(), Some("GET, HEAD"));
        assert_eq!(
            allowed_methods("/graphql").as_deref(),
            Some("GET, HEAD, POST")
        );
        assert_eq!(
            allowed_methods("/graphql/assets/graphiql-4.1.2/graphiql.min.js").as_deref(),
            Some("GET, HEAD")
        );
        assert_eq!(
            allowed_methods("/favicon.svg").as_deref(),
            Some("GET, HEAD")
        );
        assert_eq!(
            allowed_methods("/openapi.json").as_deref(),
            Some("GET, HEAD")
        );
        assert_eq!(
            allowed_methods("/docs/assets/x/y.css").as_deref(),
            Some("GET, HEAD")
        );
        assert_eq!(allowed_methods("/docs/assets"), None);
        assert_eq!(allowed_methods("/api/object/"), None);
        assert_eq!(allowed_methods("/nope"), None);
    }

    #[test]
    fn all_methods_lists_each_method_once() {
        assert_eq!(all_methods(), "GET, HEAD, POST, PUT, PATCH, DELETE");
    }
}
