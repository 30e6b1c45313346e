//! The one configuration struct. Every setting is a flag with a `KVQL_*`
//! environment variable, so `kvql serve --help` is the configuration reference.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// Where the data lives.
#[derive(Clone, Args)]
pub struct DatabaseArgs {
    /// Database URL: `sqlite://PATH?mode=rwc` (the file is created if missing) or
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`.
    #[arg(
        long,
        env = "KVQL_DATABASE_URL",
        default_value = "sqlite://kvql.db?mode=rwc",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Size of this node's database pool. On SQLite it is the read pool
    /// (listings, administration); reads that miss the cache and writes have
    /// connections of their own (four readers, the committer, one for
    /// administrative writes). On PostgreSQL it is the whole pool.
    #[arg(long, env = "KVQL_DATABASE_MAX_CONNECTIONS", default_value_t = 8)]
    pub database_max_connections: u32,

    /// Write transactions a PostgreSQL node runs at once. Concurrent writes
    /// are grouped into one transaction per committer: one committer makes
    /// the largest groups and the least database work per write, best when
    /// the database is near (same host or data centre). More committers
    /// overlap round trips, which helps when the database is far and writes
    /// are conditional (`If-Match`, `expectedVersion`), deletes or atomic
    /// batches, which take a statement each. SQLite always has one.
    #[arg(long, env = "KVQL_DATABASE_COMMITTERS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub database_committers: u16,

    /// SQLite: bytes of the database file that connections reading values
    /// map into memory (`PRAGMA mmap_size`), so a read that misses SQLite's
    /// own page cache costs no system call and no copy. The mapped pages are
    /// the kernel's page cache, shared and reclaimable, but they count in the
    /// process's RSS. `0` turns it off. An I/O error while reading a mapped
    /// page (a failing disk) stops the process instead of failing the request.
    #[arg(long, env = "KVQL_SQLITE_MMAP_BYTES", default_value_t = 1 << 30)]
    pub sqlite_mmap_bytes: u64,

    /// SQLite: read a value that the read cache does not hold on the thread
    /// that serves the request, on that thread's own connection, instead of
    /// handing it to a reader thread and back. Faster (no thread hops) as
    /// long as the file's pages are in memory; a page that is not makes the
    /// read wait for the disk on that thread, holding up the other requests
    /// it serves meanwhile. Turn it off (`false`) for a database much larger
    /// than the machine's memory. Ignored on PostgreSQL.
    #[arg(long, env = "KVQL_SQLITE_READS_IN_PLACE", default_value_t = true, action = clap::ArgAction::Set)]
    pub sqlite_reads_in_place: bool,

    /// SQLite durability. `normal`: WAL with synchronous=NORMAL, an acknowledged
    /// write survives a crash of kvql but the last writes may be lost if the
    /// machine loses power. `full`: fsync on every commit. Ignored on PostgreSQL.
    #[arg(long, env = "KVQL_SQLITE_SYNCHRONOUS", value_enum, default_value_t = SqliteSync::Normal)]
    pub sqlite_synchronous: SqliteSync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SqliteSync {
    Normal,
    Full,
}

impl DatabaseArgs {
    /// The URL with any password replaced by `***`, for logs.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.database_url)
    }
}

fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Everything `kvql serve` needs.
#[derive(Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Address and port to listen on.
    #[arg(long, env = "KVQL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// How long an access token stays valid, e.g. `15m`, `1h`, `7d`.
    #[arg(long, env = "KVQL_TOKEN_TTL", default_value = "1h", value_parser = parse_duration)]
    pub token_ttl: Duration,

    /// Value of the tokens' `iss` claim; verification requires it.
    #[arg(long, env = "KVQL_TOKEN_ISSUER", default_value = "kvql")]
    pub token_issuer: String,

    /// Value of the tokens' `aud` claim; verification requires it.
    #[arg(long, env = "KVQL_TOKEN_AUDIENCE", default_value = "kvql")]
    pub token_audience: String,

    /// How long a verified token is trusted without checking again that its
    /// user still exists and keeps its role; `0s` checks on every request.
    /// Removing a user or changing a role takes effect within this time.
    #[arg(long, env = "KVQL_AUTH_CACHE_TTL", default_value = "1s", value_parser = parse_duration_or_zero)]
    pub auth_cache_ttl: Duration,

    // Login throttling and the password-hashing queue (counted per node).
    /// Failed logins allowed per username within `--login-failure-window`;
    /// further attempts, even with the right password, get 429 `RATE_LIMITED`
    /// with `Retry-After` until the window ends. Counted per node.
    #[arg(long, env = "KVQL_LOGIN_MAX_FAILURES", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub login_max_failures: u32,

    /// Failed logins allowed per client address (IPv6: per /64) within
    /// `--login-failure-window`, whatever the usernames. Counted per node.
    #[arg(long, env = "KVQL_LOGIN_MAX_FAILURES_PER_ADDRESS", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub login_max_failures_per_address: u32,

    /// Most users a tenant may have; `POST /api/users` (`addUser`) beyond it
    /// answers 403 `QUOTA_EXCEEDED`. The operator's `kvql user add` is not
    /// held to it.
    #[arg(long, env = "KVQL_MAX_USERS_PER_TENANT", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_users_per_tenant: u64,

    /// Requests per second each tenant may make on this node, counting
    /// every request that carries a valid token (REST, GraphQL over HTTP)
    /// and every operation started on a GraphQL WebSocket; beyond it 429
    /// `RATE_LIMITED` with `Retry-After`. Off unless set. `kvql tenant
    /// set-rate` gives a tenant its own rate (or none).
    #[arg(long, env = "KVQL_TENANT_RATE", value_parser = clap::value_parser!(u32).range(1..))]
    pub tenant_rate: Option<u32>,

    /// How many requests a tenant may make at once above its rate (the
    /// size of its token bucket); defaults to the rate, one second's worth.
    #[arg(long, env = "KVQL_TENANT_BURST", requires = "tenant_rate", value_parser = clap::value_parser!(u32).range(1..))]
    pub tenant_burst: Option<u32>,

    /// The window failed logins are counted in, from the first failure.
    #[arg(long, env = "KVQL_LOGIN_FAILURE_WINDOW", default_value = "5m", value_parser = parse_duration)]
    pub login_failure_window: Duration,

    /// Most logins waiting for a password-hashing slot (one runs per CPU);
    /// beyond it a login gets 429 `RATE_LIMITED` with `Retry-After: 1` at once.
    #[arg(long, env = "KVQL_LOGIN_MAX_QUEUED", default_value_t = 64)]
    pub login_max_queued: u32,

    /// Comma-separated IP addresses or CIDR blocks of reverse proxies whose
    /// `X-Forwarded-For` is believed: when the TCP peer is one of them, the
    /// client is the rightmost address in that header that is not one of
    /// them. Empty (the default): the TCP peer is the client.
    #[arg(long, env = "KVQL_TRUSTED_PROXIES", default_value = "", hide_default_value = true, value_parser = crate::throttle::parse_trusted_proxies)]
    pub trusted_proxies: crate::throttle::TrustedProxies,
    // End of login throttling.
    /// How often the sweeper deletes expired values, e.g. `500ms`, `1s`.
    #[arg(long, env = "KVQL_SWEEP_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub sweep_interval: Duration,

    /// Most expired rows the sweeper deletes in one transaction.
    #[arg(long, env = "KVQL_SWEEP_BATCH", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub sweep_batch: u32,

    /// How long the change log keeps a change (for `/api/changes`,
    /// `/api/watch`, key history and resumed subscriptions), e.g. `24h`,
    /// `30m`. The sweeper removes older entries in batches.
    #[arg(long, env = "KVQL_CHANGES_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub changes_retention: Duration,

    /// Most changes the log keeps per tenant; the oldest go first. Revisions
    /// that failed writes skipped count too, so a tenant may keep fewer.
    #[arg(long, env = "KVQL_CHANGES_MAX_PER_TENANT", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub changes_max_per_tenant: u64,

    /// Most change feeds one user holds open on this node at once:
    /// `/api/watch` streams, `/api/changes` requests waiting for a change
    /// (`wait`) and `objectEvents` subscriptions. One more is refused with
    /// 429 `RATE_LIMITED`.
    #[arg(long, env = "KVQL_MAX_FEEDS_PER_USER", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_feeds_per_user: u64,

    /// Most change feeds open on this node, all users together; one more is
    /// refused with 429 `RATE_LIMITED`. Each open feed reads the change log
    /// when a change it follows is committed, and at least once a second.
    #[arg(long, env = "KVQL_MAX_FEEDS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_feeds: u64,

    /// How often `/api/watch` sends a comment line while no change arrives,
    /// e.g. `15s`: it keeps proxies from closing an idle stream, and it is
    /// how the server notices a client that went away (at the second write
    /// after it left), which gives back the stream's feed place.
    #[arg(long, env = "KVQL_WATCH_HEARTBEAT", default_value = "15s", value_parser = parse_duration)]
    pub watch_heartbeat: Duration,

    /// Most keys a tenant may keep (live values), unless `kvql tenant
    /// set-quota` gives it its own limit; beyond it a write answers 403
    /// `QUOTA_EXCEEDED` and writes nothing. No limit unless set.
    #[arg(long, env = "KVQL_DEFAULT_MAX_KEYS")]
    pub default_max_keys: Option<u64>,

    /// Most bytes a tenant's live values may hold (each counts its key's
    /// UTF-8 bytes plus its value's compact JSON), unless `kvql tenant
    /// set-quota` gives it its own limit. No limit unless set.
    #[arg(long, env = "KVQL_DEFAULT_MAX_BYTES")]
    pub default_max_bytes: Option<u64>,

    /// Largest value accepted, in bytes of compact JSON.
    #[arg(long, env = "KVQL_MAX_VALUE_BYTES", default_value_t = 1_048_576, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_value_bytes: u64,

    /// Most items in one batch call.
    #[arg(long, env = "KVQL_MAX_BATCH_ITEMS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch_items: u64,

    /// Largest request body, in bytes. Default: max value bytes × max batch
    /// items, capped at 64 MiB but never below one full value.
    #[arg(long, env = "KVQL_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<u64>,

    /// Largest request body accepted without a valid access token (`/login`,
    /// the GraphQL `login` mutation, and any request whose token is missing
    /// or refused), in bytes; larger ones get 413 before they are read.
    #[arg(long, env = "KVQL_MAX_ANONYMOUS_BODY_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_anonymous_body_bytes: u64,

    /// Deepest nesting of arrays and objects in a JSON request body, GraphQL
    /// variables or a WebSocket message (1 to 100). Checked before parsing.
    #[arg(long, env = "KVQL_MAX_JSON_DEPTH", default_value_t = crate::input::DEFAULT_MAX_DEPTH, value_parser = parse_depth)]
    pub max_json_depth: usize,

    /// Time budget of one HTTP request; past it the request is stopped and
    /// answered 503 `TIMEOUT` (a write may or may not have been applied).
    #[arg(long, env = "KVQL_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Time a new connection has to send the head (request line and headers)
    /// of its first request; a connection still short of it is closed. Bounds
    /// what connections that never send a request can hold.
    #[arg(long, env = "KVQL_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Most TCP connections this node keeps open at once (HTTP, including
    /// each open watch and long-poll, and WebSocket); past it, new
    /// connections wait in the kernel's queue until one closes. Keep it below
    /// the process's open-file limit.
    #[arg(long, env = "KVQL_MAX_CONNECTIONS", default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Most of those connections one client address may hold (IPv6: one
    /// /64); a further connection from it is closed at once, so that one
    /// client cannot take every slot. Proxies in `KVQL_TRUSTED_PROXIES` are
    /// not limited (behind one, every client has its address); behind a NAT
    /// that hides clients' addresses, set `0`: no limit per address.
    #[arg(
        long,
        env = "KVQL_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 1_024
    )]
    pub max_connections_per_address: u32,

    /// A connection with no traffic either way for this long is closed: an
    /// idle keep-alive connection between requests, or a request stalled
    /// mid-way. Keep it above `KVQL_WATCH_HEARTBEAT`, `KVQL_WS_KEEPALIVE` and
    /// the longest long-poll (60 s), which all send something before it.
    #[arg(long, env = "KVQL_IDLE_TIMEOUT", default_value = "75s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Which browser origins may call kvql (CORS, for apps that send a bearer
    /// token; cookies are never allowed): `*` any origin, `none` CORS off, or
    /// a comma-separated list such as
    /// `https://app.example.com,http://localhost:3000`. A preflight from an
    /// origin not in the list is answered 403 `FORBIDDEN`.
    #[arg(long, env = "KVQL_CORS_ORIGINS", default_value = "*", value_parser = crate::cors::parse_origins)]
    pub cors_origins: crate::cors::CorsOrigins,

    #[command(flatten)]
    pub websocket: WebSocketConfig,

    /// Bytes of values kept in the SQLite read cache (0 turns it off). On
    /// PostgreSQL, which several nodes share, there is no cache.
    #[arg(long, env = "KVQL_CACHE_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub cache_bytes: u64,

    /// Change wake-ups buffered per node for feeds (subscriptions, `/api/watch`,
    /// long-polls); a feed that falls further behind reads the change log at
    /// once instead, and loses nothing.
    #[arg(long, env = "KVQL_EVENT_BUFFER", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub event_buffer: u64,

    /// Password for the `admin` user (tenant `default`, role `owner`) created on
    /// the first start, when there are no users. If unset, a random one is
    /// printed once to stderr.
    #[arg(long, env = "KVQL_BOOTSTRAP_ADMIN_PASSWORD", hide_env_values = true)]
    pub bootstrap_admin_password: Option<String>,

    #[command(flatten)]
    pub graphql: GraphqlConfig,

    /// Log filter in `tracing` syntax, e.g. `info`, `kvql=debug,api=debug`;
    /// `info,kvql::access=off` keeps everything but the access lines.
    #[arg(long, env = "KVQL_LOG", default_value = "info")]
    pub log: String,

    /// A bearer token `GET /metrics` requires (`Authorization: Bearer
    /// <token>`); unset, `/metrics` answers anyone who can reach it.
    #[arg(long, env = "KVQL_METRICS_TOKEN", hide_env_values = true, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub metrics_token: Option<String>,

    /// Log line format on standard error: `text` for people, `json` for one
    /// JSON object per line (for log collectors).
    #[arg(long, env = "KVQL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The lifecycle and limits of GraphQL WebSocket connections.
#[derive(Clone, Args)]
pub struct WebSocketConfig {
    /// Time a new WebSocket has to send `connection_init`; then it is closed
    /// with code 4408.
    #[arg(long, env = "KVQL_WS_INIT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub ws_init_timeout: Duration,

    /// How often the server pings an idle WebSocket; a peer that has sent
    /// nothing (not even a pong) for two intervals is dropped.
    #[arg(long, env = "KVQL_WS_KEEPALIVE", default_value = "15s", value_parser = parse_duration)]
    pub ws_keepalive: Duration,

    /// Most open GraphQL WebSockets on this node; more are refused with 429.
    #[arg(long, env = "KVQL_WS_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub ws_max_connections: u64,

    /// Most GraphQL WebSockets on this node without an accepted token (not
    /// yet initialised, or initialised without one); more are refused with
    /// 429. Each may hold up to one message of `KVQL_MAX_VALUE_BYTES` + 64 KiB
    /// in its buffer.
    #[arg(long, env = "KVQL_WS_MAX_ANONYMOUS_CONNECTIONS", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub ws_max_anonymous_connections: u64,

    /// Most open GraphQL WebSockets per user on this node; a connection_init
    /// beyond it is closed with code 4429.
    #[arg(long, env = "KVQL_WS_MAX_CONNECTIONS_PER_USER", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub ws_max_connections_per_user: u64,

    /// Most operations (subscriptions, queries, mutations) running at once on
    /// one WebSocket; one more gets an error for its id.
    #[arg(long, env = "KVQL_WS_MAX_OPERATIONS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub ws_max_operations: u64,
}

/// Limits on GraphQL operations, checked before any resolver runs.
#[derive(Clone, Args)]
pub struct GraphqlConfig {
    /// Deepest selection nesting accepted in a GraphQL operation.
    #[arg(long, env = "KVQL_GRAPHQL_MAX_DEPTH", default_value_t = 16)]
    pub graphql_max_depth: usize,

    /// Highest complexity (number of fields selected, lists counted once) of a GraphQL operation.
    #[arg(long, env = "KVQL_GRAPHQL_MAX_COMPLEXITY", default_value_t = 500)]
    pub graphql_max_complexity: usize,

    /// Most fields, fragment spreads and inline fragments in one GraphQL
    /// document (all its operations) once its fragments are expanded (counted
    /// without expanding them, before validation).
    #[arg(long, env = "KVQL_GRAPHQL_MAX_SELECTIONS", default_value_t = 2000)]
    pub graphql_max_selections: usize,

    /// Most aliased fields in one GraphQL document.
    #[arg(long, env = "KVQL_GRAPHQL_MAX_ALIASES", default_value_t = 30)]
    pub graphql_max_aliases: usize,

    /// Most top-level fields in one GraphQL operation.
    #[arg(long, env = "KVQL_GRAPHQL_MAX_ROOT_FIELDS", default_value_t = 20)]
    pub graphql_max_root_fields: usize,

    /// Largest GraphQL query text in bytes (variables are not counted; the
    /// request body limit applies to the whole request).
    #[arg(long, env = "KVQL_GRAPHQL_MAX_QUERY_BYTES", default_value_t = 32 * 1024)]
    pub graphql_max_query_bytes: usize,

    /// Deepest nesting of `{`, `[` and `(` in a GraphQL document (selections,
    /// list and object literals, arguments, variable defaults), 1 to 100.
    /// Checked on the text before it is parsed.
    #[arg(long, env = "KVQL_GRAPHQL_MAX_NESTING", default_value_t = crate::input::DEFAULT_MAX_DEPTH, value_parser = parse_depth)]
    pub graphql_max_nesting: usize,

    /// Most operations in one batched GraphQL request (a JSON array, as
    /// Apollo's BatchHttpLink sends). Each operation is checked against every
    /// other limit on its own.
    #[arg(long, env = "KVQL_GRAPHQL_MAX_BATCH", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub graphql_max_batch: u64,

    /// Bytes of query text this node remembers for Automatic Persisted
    /// Queries (clients then send a query's SHA-256 instead of its text);
    /// the least recently used are forgotten first. 0 turns persisted
    /// queries off.
    #[arg(long, env = "KVQL_GRAPHQL_PERSISTED_QUERIES_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub graphql_persisted_queries_bytes: u64,

    /// Whether GraphQL introspection (used by GraphiQL and code generators) is on.
    #[arg(long, env = "KVQL_GRAPHQL_INTROSPECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub graphql_introspection: bool,
}

/// Room for JSON punctuation, keys and TTLs around the values of a request.
const BODY_OVERHEAD: u64 = 64 * 1024;
const DEFAULT_BODY_CAP: u64 = 64 * 1024 * 1024;

impl Config {
    /// The defaults, with environment variables applied, as `kvql serve` would see them.
    pub fn from_env() -> Result<Self, clap::Error> {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: Config,
        }
        <Wrapper as clap::Parser>::try_parse_from(["kvql"]).map(|w| w.config)
    }

    /// The request body limit in bytes (see `--max-body-bytes`).
    pub fn body_limit(&self) -> u64 {
        self.max_body_bytes.unwrap_or_else(|| {
            self.max_value_bytes
                .saturating_mul(self.max_batch_items)
                .min(DEFAULT_BODY_CAP)
                .max(self.max_value_bytes)
                .saturating_add(BODY_OVERHEAD)
        })
    }
}

/// A nesting limit: 1 to [`crate::input::MAX_DEPTH_CEILING`].
fn parse_depth(s: &str) -> Result<usize, String> {
    let max = crate::input::MAX_DEPTH_CEILING;
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("must be a whole number from 1 to {max}")),
    }
}

/// Parses durations such as `500ms`, `1s`, `15m`, `1h`, `7d`; zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e} (expected e.g. 500ms, 1s, 1h)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// Like [`parse_duration`], but `0s` (or `0`) is allowed.
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (expected e.g. 0s, 500ms, 1s)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_the_documented_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_duration_or_zero("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn redacted_url_hides_only_the_password() {
        assert_eq!(
            redact_url("postgres://kv:secret@db:5432/kv"),
            "postgres://kv:***@db:5432/kv"
        );
        assert_eq!(redact_url("postgres://kv@db/kv"), "postgres://kv@db/kv");
        assert_eq!(
            redact_url("sqlite://kvql.db?mode=rwc"),
            "sqlite://kvql.db?mode=rwc"
        );
    }

    #[test]
    fn body_limit_follows_values_and_batches_with_a_cap() {
        let mut c = Config::from_env().unwrap();
        c.max_value_bytes = 1000;
        c.max_batch_items = 10;
        assert_eq!(c.body_limit(), 10_000 + BODY_OVERHEAD);
        c.max_value_bytes = 1 << 20;
        c.max_batch_items = 1000;
        assert_eq!(c.body_limit(), DEFAULT_BODY_CAP + BODY_OVERHEAD);
        c.max_value_bytes = 100 << 20;
        assert_eq!(c.body_limit(), (100 << 20) + BODY_OVERHEAD);
        c.max_body_bytes = Some(5);
        assert_eq!(c.body_limit(), 5);
    }
}
