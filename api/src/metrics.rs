//! `GET /metrics`: what this node does, in the Prometheus text format, from
//! the `prometheus` crate's instruments in a registry of the node's own (so
//! that several apps in one process, as in the tests, count apart).
//!
//! Labels never carry a tenant, a user or a key: routes are templates
//! (`/api/object/*`), so the number of series stays bounded whatever
//! clients send.
//!
//! One instrument is the process's, not the node's: the time spent waiting
//! for a database connection, which sqlx reports as tracing events that name
//! no pool (see [`pool_wait_layer`]). A server is one node per process.

use std::time::Duration;

use poem::http::{Method, StatusCode};
use poem::web::Data;
use poem::{IntoResponse, Request, Response, handler};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::app::AppState;
use crate::error::ApiError;

/// Latency buckets, seconds: from a cached read to a long-poll.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// How a login ended, as counted by `kvql_logins_total`.
#[derive(Clone, Copy, Debug)]
pub enum Login {
    Succeeded,
    Failed,
    Throttled,
}

/// What the store was asked to do, for `kvql_store_operations_total`.
#[derive(Clone, Copy, Debug)]
pub enum StoreOp {
    Get,
    GetMany,
    List,
    Changes,
    Feed,
    History,
    Create,
    Put,
    Delete,
    BatchCreate,
    BatchPut,
    BatchDelete,
}

impl StoreOp {
    const ALL: [StoreOp; 12] = [
        StoreOp::Get,
        StoreOp::GetMany,
        StoreOp::List,
        StoreOp::Changes,
        StoreOp::Feed,
        StoreOp::History,
        StoreOp::Create,
        StoreOp::Put,
        StoreOp::Delete,
        StoreOp::BatchCreate,
        StoreOp::BatchPut,
        StoreOp::BatchDelete,
    ];

    /// Its label; `self as usize` is its index in [`StoreOp::ALL`].
    fn label(self) -> &'static str {
        match self {
            StoreOp::Get => "get",
            StoreOp::GetMany => "get_many",
            StoreOp::List => "list",
            StoreOp::Changes => "changes",
            StoreOp::Feed => "feed",
            StoreOp::History => "history",
            StoreOp::Create => "create",
            StoreOp::Put => "put",
            StoreOp::Delete => "delete",
            StoreOp::BatchCreate => "batch_create",
            StoreOp::BatchPut => "batch_put",
            StoreOp::BatchDelete => "batch_delete",
        }
    }
}

/// The node's instruments.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    http: HistogramVec,
    logins: IntCounterVec,
    /// `kvql_graphql_operations_total`'s series, resolved once, in the
    /// order of [`Metrics::graphql_operation`]'s match.
    graphql_operations: [IntCounter; 4],
    graphql_errors: IntCounterVec,
    /// `kvql_cache_lookups_total`'s two series, resolved once: the cache is
    /// on the hottest path.
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    /// `kvql_store_operations_total`'s series, resolved once, in
    /// [`StoreOp::ALL`]'s order.
    store_ops: [IntCounter; 12],
    tenant_rate_refused: IntCounter,
    graphql_fast: IntCounter,
    group_writes: Histogram,
    expired: IntCounter,
    sweep_lag: prometheus::Gauge,
    feed_delivered: IntCounter,
    feed_lost: IntCounter,
    websockets_open: IntGauge,
    feeds_open: IntGauge,
    pool: IntGaugeVec,
}

/// The target of the event sqlx's pools emit for each connection handed
/// out (at the level set by `PoolOptions::acquire_time_level`, see `db`).
const SQLX_ACQUIRE_TARGET: &str = "sqlx::pool::acquire";

static POOL_WAITS: std::sync::LazyLock<Histogram> = std::sync::LazyLock::new(|| {
    Histogram::with_opts(
        HistogramOpts::new(
            "kvql_db_pool_acquire_seconds",
            "Time each database statement or transaction waited for a connection from the \
             pool (PostgreSQL: the node's pool; SQLite: the pool for listings and \
             administration), for every server of this process. A `_sum` that grows \
             faster than `_count` by more than milliseconds means the pool is too small \
             for the load (KVQL_DATABASE_MAX_CONNECTIONS).",
        )
        .buckets(vec![
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5,
            10.0, 30.0,
        ]),
    )
    .unwrap_or_else(|e| panic!("the pool wait histogram's options are valid: {e}"))
});

static POOL_TIMEOUTS: std::sync::LazyLock<IntCounter> = std::sync::LazyLock::new(|| {
    IntCounter::new(
        "kvql_db_pool_acquire_timeouts_total",
        "Statements or transactions that gave up waiting for a pooled database \
         connection (after 10 s on PostgreSQL, 30 s on SQLite) and failed with INTERNAL, \
         for every server of this process. Not in kvql_db_pool_acquire_seconds, which \
         counts connections handed out.",
    )
    .unwrap_or_else(|e| panic!("the pool timeout counter's options are valid: {e}"))
});

/// Counts a database error if it is a wait for a pooled connection that
/// timed out (sqlx's `PoolTimedOut`, as sea-orm or sqlx reports it).
pub fn db_error(err: &sea_orm::DbErr) {
    use sea_orm::{ConnAcquireErr, DbErr, RuntimeErr};
    let timed_out = match err {
        DbErr::ConnectionAcquire(ConnAcquireErr::Timeout) => true,
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            matches!(**e, sea_orm::sqlx::Error::PoolTimedOut)
        }
        _ => false,
    };
    if timed_out {
        POOL_TIMEOUTS.inc();
    }
}

/// A tracing layer that observes sqlx's connection acquisitions into
/// `kvql_db_pool_acquire_seconds`, whatever the log filter lets through:
/// the server installs it beside the log layer (see `cli`).
pub fn pool_wait_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    PoolWaits.with_filter(tracing_subscriber::filter::filter_fn(|m| {
        m.target() == SQLX_ACQUIRE_TARGET
    }))
}

struct PoolWaits;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PoolWaits {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Waited(Option<f64>);
        impl tracing::field::Visit for Waited {
            fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
                if field.name() == "acquired_after_secs" {
                    self.0 = Some(value);
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut waited = Waited(None);
        event.record(&mut waited);
        if let Some(secs) = waited.0.filter(|s| s.is_finite() && *s >= 0.0) {
            POOL_WAITS.observe(secs);
        }
    }
}

fn registered<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: prometheus::Result<C>,
) -> anyhow::Result<C> {
    let collector = collector?;
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

impl Metrics {
    pub fn new() -> anyhow::Result<Metrics> {
        let registry = Registry::new();
        let r = &registry;
        let cache: IntCounterVec = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "kvql_cache_lookups_total",
                    "Point reads looked up in the SQLite read cache, by result: hit \
                         (answered from the cache, a value or its absence), miss (read from \
                         the database).",
                ),
                &["result"],
            ),
        )?;
        let graphql_operations: IntCounterVec = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "kvql_graphql_operations_total",
                    "GraphQL operations parsed, over HTTP and WebSockets, by type: query, \
                         mutation, subscription (unknown: a document of several operations \
                         without operationName).",
                ),
                &["type"],
            ),
        )?;
        let store_ops: IntCounterVec = registered(
            r,
            IntCounterVec::new(
                Opts::new(
                    "kvql_store_operations_total",
                    "Operations asked of the store (both doors), by op: get, get_many, list, \
                         changes (a page of /api/changes, waiting or not), feed (a feed opened: \
                         /api/watch, objectEvents), history, create, put, delete, batch_create, \
                         batch_put, batch_delete (a batch counts once), whatever their outcome.",
                ),
                &["op"],
            ),
        )?;
        registered(r, Ok(POOL_WAITS.clone()))?;
        registered(r, Ok(POOL_TIMEOUTS.clone()))?;
        Ok(Metrics {
            store_ops: StoreOp::ALL.map(|op| store_ops.with_label_values(&[op.label()])),
            graphql_fast: registered(
                r,
                IntCounter::new(
                    "kvql_graphql_fast_path_total",
                    "GraphQL operations answered by the fast path for a lone object(key:) \
                     query, without the executor (also counted in \
                     kvql_graphql_operations_total).",
                ),
            )?,
            tenant_rate_refused: registered(
                r,
                IntCounter::new(
                    "kvql_tenant_rate_limited_total",
                    "Requests and WebSocket operations refused because their tenant was \
                     over its request rate on this node (KVQL_TENANT_RATE).",
                ),
            )?,
            http: registered(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "kvql_http_request_duration_seconds",
                        "HTTP requests answered, by route template, method and status, and the \
                         time from each one's arrival to its answer's head (`_count` counts \
                         the requests).",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                    &["route", "method", "status"],
                ),
            )?,
            logins: registered(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "kvql_logins_total",
                        "Logins (REST and GraphQL) by outcome: succeeded, failed (wrong \
                         credentials), throttled (refused with RATE_LIMITED).",
                    ),
                    &["outcome"],
                ),
            )?,
            cache_hits: cache.with_label_values(&["hit"]),
            cache_misses: cache.with_label_values(&["miss"]),
            group_writes: registered(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "kvql_group_commit_writes",
                        "Writes (requests, or batch requests) committed together in one \
                         transaction by group commit; `_count` counts the transactions.",
                    )
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
                ),
            )?,
            expired: registered(
                r,
                IntCounter::new(
                    "kvql_sweeper_expired_total",
                    "Expired values the sweeper deleted.",
                ),
            )?,
            graphql_operations: ["query", "mutation", "subscription", "unknown"]
                .map(|ty| graphql_operations.with_label_values(&[ty])),
            graphql_errors: registered(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "kvql_graphql_errors_total",
                        "Errors in GraphQL answers and subscription events, by \
                         extensions.code (INVALID_INPUT for documents that do not parse or \
                         validate).",
                    ),
                    &["code"],
                ),
            )?,
            sweep_lag: registered(
                r,
                prometheus::Gauge::new(
                    "kvql_sweeper_lag_seconds",
                    "How long ago the longest-expired value not yet deleted by the sweeper \
                     expired (0: none waits). Expired values are never served; this is \
                     storage not yet reclaimed.",
                ),
            )?,
            feed_delivered: registered(
                r,
                IntCounter::new(
                    "kvql_feed_changes_delivered_total",
                    "Changes delivered by change feeds: /api/watch events and objectEvents \
                     subscription events.",
                ),
            )?,
            feed_lost: registered(
                r,
                IntCounter::new(
                    "kvql_feeds_lost_total",
                    "Feeds ended because the change log was compacted past what they still \
                     had to deliver (EVENTS_LOST, or event: error with COMPACTED).",
                ),
            )?,
            websockets_open: registered(
                r,
                IntGauge::new(
                    "kvql_websockets_open",
                    "GraphQL WebSockets open on this node.",
                ),
            )?,
            feeds_open: registered(
                r,
                IntGauge::new(
                    "kvql_change_feeds_open",
                    "Change feeds open on this node: /api/watch streams, waiting \
                     /api/changes requests and objectEvents subscriptions.",
                ),
            )?,
            pool: registered(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "kvql_db_pool_connections",
                        "Connections of the node's database pool (PostgreSQL: the whole \
                         pool; SQLite: the pool for listings and administration), by state: \
                         in_use, idle.",
                    ),
                    &["state"],
                ),
            )?,
            registry,
        })
    }

    /// Counts one answered HTTP request. Methods outside the standard ones
    /// count as `other`: a client chooses the method, and each label value
    /// is a series kept forever.
    pub fn http_request(
        &self,
        route: &str,
        method: &Method,
        status: StatusCode,
        elapsed: Duration,
    ) {
        let method = match *method {
            Method::GET => "GET",
            Method::HEAD => "HEAD",
            Method::POST => "POST",
            Method::PUT => "PUT",
            Method::PATCH => "PATCH",
            Method::DELETE => "DELETE",
            Method::OPTIONS => "OPTIONS",
            _ => "other",
        };
        self.http
            .with_label_values(&[route, method, status.as_str()])
            .observe(elapsed.as_secs_f64());
    }

    pub fn graphql_operation(&self, ty: Option<async_graphql::parser::types::OperationType>) {
        use async_graphql::parser::types::OperationType;
        let series = match ty {
            Some(OperationType::Query) => 0,
            Some(OperationType::Mutation) => 1,
            Some(OperationType::Subscription) => 2,
            None => 3,
        };
        self.graphql_operations[series].inc();
    }

    /// One error of a GraphQL answer. Codes are ours (kvql's error codes),
    /// but anything unlike one counts as `other`, so that no answer can
    /// add series.
    pub fn graphql_error(&self, code: Option<&str>) {
        let code = match code {
            Some(c) if c.len() <= 40 && c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') => c,
            Some(_) => "other",
            None => "none",
        };
        self.graphql_errors.with_label_values(&[code]).inc();
    }

    /// One point read's lookup in the read cache.
    pub fn cache(&self, hit: bool) {
        if hit {
            self.cache_hits.inc();
        } else {
            self.cache_misses.inc();
        }
    }

    pub fn store_op(&self, op: StoreOp) {
        self.store_ops[op as usize].inc();
    }

    /// A query answered by the GraphQL fast path (counted as a query too).
    pub fn graphql_fast_path(&self) {
        self.graphql_fast.inc();
        self.graphql_operation(Some(async_graphql::parser::types::OperationType::Query));
    }

    pub fn tenant_rate_refused(&self) {
        self.tenant_rate_refused.inc();
    }

    pub fn group_commit(&self, writes: usize) {
        self.group_writes.observe(writes as f64);
    }

    pub fn expired(&self, values: usize) {
        self.expired.inc_by(values as u64);
    }

    pub fn feed_delivered(&self) {
        self.feed_delivered.inc();
    }

    pub fn feed_lost(&self) {
        self.feed_lost.inc();
    }

    pub fn login(&self, outcome: Login) {
        let label = match outcome {
            Login::Succeeded => "succeeded",
            Login::Failed => "failed",
            Login::Throttled => "throttled",
        };
        self.logins.with_label_values(&[label]).inc();
    }

    /// The text exposition, with the gauges read from `state` now.
    async fn render(&self, state: &AppState) -> Result<String, ApiError> {
        // A scrape answers even when the database does not: the lag is
        // then NaN (no sample) rather than the whole scrape an error.
        let lag = tokio::time::timeout(Duration::from_secs(1), state.store().sweep_lag()).await;
        self.sweep_lag.set(match lag {
            Ok(Ok(lag)) => lag.as_secs_f64(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "metrics: cannot read the sweeper's lag");
                f64::NAN
            }
            Err(_) => {
                tracing::warn!("metrics: reading the sweeper's lag took over 1 s");
                f64::NAN
            }
        });
        self.websockets_open
            .set(gauge(state.sockets().open_count()));
        self.feeds_open.set(gauge(state.store().open_feeds()));
        let (in_use, idle) = state.db().pool_connections();
        self.pool.with_label_values(&["in_use"]).set(gauge(in_use));
        self.pool.with_label_values(&["idle"]).set(gauge(idle));
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .map_err(ApiError::internal)?;
        String::from_utf8(text).map_err(ApiError::internal)
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `GET /metrics`; with `KVQL_METRICS_TOKEN` set, only for
/// `Authorization: Bearer <that token>` (else 401).
#[handler]
pub async fn endpoint(req: &Request, state: Data<&AppState>) -> Response {
    if let Some(expected) = &state.config().metrics_token {
        let given = req
            .headers()
            .get(poem::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::bearer_token)
            .unwrap_or_default();
        if given.is_empty() || !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            return ApiError::Unauthenticated(
                "/metrics needs `Authorization: Bearer <KVQL_METRICS_TOKEN>`".into(),
            )
            .into_response();
        }
    }
    match state.metrics().render(&state).await {
        Ok(text) => text
            .with_content_type("text/plain; version=0.0.4; charset=utf-8")
            .with_status(StatusCode::OK)
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Equal bytes, in a time that depends on the lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_ops_index_their_series_in_declaration_order() {
        for (i, op) in StoreOp::ALL.into_iter().enumerate() {
            assert_eq!(op as usize, i, "{op:?}");
        }
    }

    #[test]
    fn tokens_compare_equal_only_when_equal() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
