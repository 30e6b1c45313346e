//! The GraphQL door: queries, mutations and subscriptions over the same
//! `store` functions as REST. The HTTP handler reads the bearer token once
//! per request (WebSocket: from `connection_init`) and puts a [`Caller`] in
//! the context; resolvers never parse tokens.

mod fast;
mod http;
mod mutation;
mod observe;
mod policy;
mod query;
mod subscription;
pub mod types;
pub mod ws;

use std::sync::Arc;

use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql::{BatchRequest, BatchResponse, Context, Schema};
use async_graphql_poem::GraphQLProtocol;
use poem::web::websocket::{WebSocket, WebSocketConfig};
use poem::{Body, Endpoint, EndpointExt, IntoResponse, Request, Route, get, handler};

use crate::app::AppState;
use crate::auth::{ClientAddr, Principal};
use crate::config::GraphqlConfig;
use crate::error::ApiError;
use crate::middleware::Verified;
use fast::Fast;
pub use mutation::Mutation;
use policy::Plans;
pub use query::Query;
pub use subscription::Subscription;

pub type KvSchema = Schema<Query, Mutation, Subscription>;

/// Who is calling, as established once per request or connection.
#[derive(Clone)]
pub enum Caller {
    /// No token was sent.
    Anonymous,
    Authenticated(Arc<Principal>),
    /// A token was sent and refused; the message says why.
    Refused(String),
    /// Checking the token failed on the server side (already logged).
    Failed,
}

/// The bearer token a WebSocket connection was initialised with: every
/// operation on the socket verifies it again (see `policy`), so that revoking
/// it reaches open sockets too.
pub(crate) struct SocketAuth(pub String);

/// In the data of a request that came by GET: only queries may run.
pub(crate) struct HttpGet;

impl Caller {
    async fn from_authorization(state: &AppState, header: Option<&str>) -> Caller {
        let Some(header) = header.map(str::trim).filter(|h| !h.is_empty()) else {
            return Caller::Anonymous;
        };
        match crate::auth::bearer_token(header) {
            Some(token) => Caller::from_token(state, token).await,
            None => {
                Caller::Refused("the Authorization header must be `Bearer <access_token>`".into())
            }
        }
    }

    pub(crate) async fn from_token(state: &AppState, token: &str) -> Caller {
        match state.auth().authenticate(token).await {
            Ok(p) => Caller::Authenticated(p),
            Err(ApiError::Unauthenticated(m)) => Caller::Refused(m),
            Err(e) => {
                e.body();
                Caller::Failed
            }
        }
    }
}

pub(crate) trait ContextExt {
    /// The authenticated caller, or `UNAUTHENTICATED`.
    fn principal(&self) -> Result<&Arc<Principal>, ApiError>;
    fn state(&self) -> &AppState;
}

impl ContextExt for Context<'_> {
    fn principal(&self) -> Result<&Arc<Principal>, ApiError> {
        match self.data_opt::<Caller>() {
            Some(Caller::Authenticated(p)) => Ok(p),
            Some(Caller::Refused(m)) => Err(ApiError::Unauthenticated(m.clone())),
            Some(Caller::Failed) => Err(ApiError::internal(anyhow::anyhow!(
                "authentication failed earlier in this request"
            ))),
            Some(Caller::Anonymous) | None => Err(ApiError::Unauthenticated(
                "this field needs an access token: send `Authorization: Bearer <access_token>` \
                 (over WebSocket, in the connection_init payload)"
                    .into(),
            )),
        }
    }

    fn state(&self) -> &AppState {
        self.data_unchecked::<AppState>()
    }
}

/// The schema with its limits; `state` is `None` only to print the SDL.
pub fn schema(config: &GraphqlConfig, state: Option<AppState>) -> KvSchema {
    schema_and_plans(config, state).0
}

/// [`schema`], and the fast-path plans of the documents it runs.
fn schema_and_plans(config: &GraphqlConfig, state: Option<AppState>) -> (KvSchema, Plans) {
    let mut builder = Schema::build(Query, Mutation, Subscription)
        .limit_depth(config.graphql_max_depth)
        .limit_complexity(config.graphql_max_complexity);
    // Outermost first: the counting sees what the policy lets through.
    if let Some(state) = &state {
        builder = builder.extension(observe::Observe(state.metrics().clone()));
    }
    let policy = policy::Policy::new(config);
    let plans = policy.plans();
    builder = builder.extension(policy);
    if !config.graphql_introspection {
        builder = builder.disable_introspection();
    }
    if let Some(state) = state {
        builder = builder.data(state);
    }
    (builder.finish(), plans)
}

/// The schema in SDL, as checked in at `schema.graphql`.
pub fn sdl() -> String {
    let config = crate::config::Config::from_env()
        .map(|c| c.graphql)
        .unwrap_or_else(|_| panic!("default configuration"));
    schema(&config, None).sdl()
}

/// `POST /graphql`: one operation or a batch, as JSON.
#[handler]
async fn execute(
    req: &Request,
    body: Body,
    state: poem::web::Data<&AppState>,
    schema: poem::web::Data<&KvSchema>,
    plans: poem::web::Data<&Plans>,
) -> poem::Result<poem::Response> {
    let config = state.config();
    let batch = http::read_post(
        req,
        body,
        config.max_json_depth,
        usize::try_from(config.graphql.graphql_max_batch).unwrap_or(usize::MAX),
    )
    .await?;
    Ok(run(req, &state, &schema, &plans, batch, false).await)
}

/// Runs a request's operations in order, each with the caller's identity,
/// and answers in the media type the client accepts.
async fn run(
    req: &Request,
    state: &AppState,
    schema: &KvSchema,
    plans: &Plans,
    batch: BatchRequest,
    get: bool,
) -> poem::Response {
    let caller = match req.extensions().get::<Verified>() {
        // The middleware verified the token and counted the request.
        Some(Verified(principal)) => Caller::Authenticated(principal.clone()),
        // It could not (a transient failure): verified and counted here.
        None => {
            let caller = Caller::from_authorization(state, req.header("authorization")).await;
            if let Caller::Authenticated(principal) = &caller
                && let Err(refused) = state.limiter().admit(principal)
            {
                return refused.into_response();
            }
            caller
        }
    };
    // Each further operation of a batch counts against the tenant's rate.
    if let (Caller::Authenticated(principal), BatchRequest::Batch(requests)) = (&caller, &batch) {
        let more = u32::try_from(requests.len().saturating_sub(1)).unwrap_or(u32::MAX);
        state.limiter().charge(principal, more);
    }
    let client = ClientAddr(state.auth().client_addr(req));
    let prepare = |r: async_graphql::Request| {
        let r = r.data(caller.clone()).data(client);
        if get { r.data(HttpGet) } else { r }
    };
    let resp = match batch {
        BatchRequest::Single(r) => {
            BatchResponse::Single(match fast(state, plans, &caller, &r).await {
                Fast::Answer(answer) => answer,
                Fast::Executor(None) => schema.execute(prepare(r)).await,
                Fast::Executor(Some(failed)) => schema.execute(prepare(r).data(failed)).await,
            })
        }
        BatchRequest::Batch(requests) => {
            let mut answers = Vec::with_capacity(requests.len());
            for r in requests {
                answers.push(schema.execute(prepare(r)).await);
            }
            BatchResponse::Batch(answers)
        }
    };
    http::answer(resp, http::media(req), get)
}

/// What the fast path (see `fast`) makes of a lone request.
async fn fast(
    state: &AppState,
    plans: &Plans,
    caller: &Caller,
    request: &async_graphql::Request,
) -> Fast {
    let Caller::Authenticated(principal) = caller else {
        return Fast::Executor(None);
    };
    let Some(plan) = plans.get(&request.query, request.operation_name.as_deref()) else {
        return Fast::Executor(None);
    };
    plan.run(state, principal, request)
        .await
        .unwrap_or(Fast::Executor(None))
}

/// The token in a `connection_init` payload: `{"Authorization": "Bearer …"}`
/// (any case), also accepted nested under `headers`.
pub(crate) fn init_authorization(payload: &serde_json::Value) -> Option<String> {
    let find = |v: &serde_json::Value| {
        v.as_object().and_then(|m| {
            m.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                .and_then(|(_, v)| v.as_str().map(str::to_owned))
        })
    };
    find(payload).or_else(|| payload.get("headers").and_then(find))
}

#[handler]
async fn get_or_websocket(
    req: &Request,
    ws: Option<WebSocket>,
    protocol: Option<GraphQLProtocol>,
    state: poem::web::Data<&AppState>,
    schema: poem::web::Data<&KvSchema>,
    plans: poem::web::Data<&Plans>,
) -> poem::Result<poem::Response> {
    let Some(socket) = ws else {
        // The page, a GraphQL answer or an error, all by `Accept`: a cache
        // must not hand one to a client that asked for another.
        let mut resp = if http::wants_html(req) {
            crate::pages::graphiql().into_response()
        } else {
            match http::read_get(req, state.config()) {
                Ok(batch) => run(req, &state, &schema, &plans, batch, true).await,
                Err(e) => e.into_response(),
            }
        };
        http::vary_for_get(resp.headers_mut());
        return Ok(resp);
    };
    let protocol = protocol.ok_or_else(|| {
        ApiError::invalid(
            "Sec-WebSocket-Protocol",
            "use graphql-transport-ws (or the legacy graphql-ws)",
        )
    })?;
    let config = state.config();
    let ws_config = &config.websocket;
    let slot = state
        .sockets()
        .open(
            ws_config.ws_max_connections,
            ws_config.ws_max_anonymous_connections,
        )
        .ok_or_else(|| ApiError::RateLimited {
            message: "this node has as many WebSocket connections open as it accepts".into(),
            retry_after: 1,
        })?;
    // A message carries at most one value plus its envelope.
    let max_message =
        usize::try_from(config.max_value_bytes.saturating_add(64 * 1024)).unwrap_or(usize::MAX);
    let schema = (*schema).clone();
    let state = (*state).clone();
    let upgrade_authorization = req.header("authorization").map(str::to_owned);
    let client = ClientAddr(state.auth().client_addr(req));
    Ok(socket
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .config(
            WebSocketConfig::default()
                .max_message_size(Some(max_message))
                .max_frame_size(Some(max_message)),
        )
        .on_upgrade(move |stream| {
            ws::serve(
                stream,
                schema,
                protocol.0,
                state,
                slot,
                upgrade_authorization,
                client,
            )
        })
        .into_response())
}

/// `/graphql` (POST operations and batches; GET queries, GraphiQL for a
/// browser, or a WebSocket), `/graphql/ws` (the same for GET) and the
/// playground's files.
pub fn routes(config: &GraphqlConfig, state: AppState) -> impl Endpoint + use<> {
    let (schema, plans) = schema_and_plans(config, Some(state));
    Route::new()
        .at("/", get(get_or_websocket).post(execute))
        .at("/ws", get(get_or_websocket))
        .at("/assets/*path", get(crate::pages::asset))
        .data(schema)
        .data(plans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn connection_init_tokens_are_found_in_the_usual_places() {
        assert_eq!(
            init_authorization(&json!({"Authorization": "Bearer t"})).as_deref(),
            Some("Bearer t")
        );
        assert_eq!(
            init_authorization(&json!({"authorization": "Bearer t"})).as_deref(),
            Some("Bearer t")
        );
        assert_eq!(
            init_authorization(&json!({"headers": {"Authorization": "Bearer t"}})).as_deref(),
            Some("Bearer t")
        );
        assert_eq!(init_authorization(&json!({})), None);
        assert_eq!(init_authorization(&json!(null)), None);
    }
}
