//! Builds the server from a [`Config`]: database, migrations, bootstrap user,
//! signing keys, sweeper and routes. Used by `kvql serve` and by the tests.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{Endpoint, EndpointExt, Route, get};

use crate::auth::Auth;
use crate::clock::Clock;
use crate::config::Config;
use crate::cors::Cors;
use crate::db::Db;
use crate::graphql::ws::Sockets;
use crate::metrics::Metrics;
use crate::store::events::Events;
use crate::store::{Limits, Store};
use crate::sweeper::Sweeper;
use crate::{compression, graphql, middleware, pages, rest, users};

/// What every request handler may use.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    db: Db,
    store: Store,
    auth: Auth,
    config: Config,
    metrics: Metrics,
    sockets: Arc<Sockets>,
    limiter: crate::ratelimit::TenantLimiter,
}

impl AppState {
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn auth(&self) -> &Auth {
        &self.inner.auth
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Tenant administration (see `admin`).
    pub fn admin(&self) -> crate::admin::Admin<'_> {
        crate::admin::Admin::new(
            &self.inner.db,
            self.inner.store.clock(),
            &self.inner.auth,
            self.inner.config.max_users_per_tenant,
        )
    }

    /// Per-tenant request rates on this node.
    pub fn limiter(&self) -> &crate::ratelimit::TenantLimiter {
        &self.inner.limiter
    }

    /// The GraphQL WebSockets open on this node.
    pub fn sockets(&self) -> &Arc<Sockets> {
        &self.inner.sockets
    }
}

/// A ready server: state, sweeper and routes, not yet listening.
pub struct App {
    pub state: AppState,
    pub sweeper: Sweeper,
    pub config: Config,
    /// The bootstrap admin's password, when this start generated one.
    pub generated_admin_password: Option<String>,
    /// Held while serving: on SQLite, one server per database file.
    _server_lock: Option<std::fs::File>,
    _checkpointer: Option<AbortOnDrop>,
}

/// A background task that stops with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl App {
    /// Connects, migrates, bootstraps and starts the sweeper.
    pub async fn build(config: Config, clock: Clock) -> anyhow::Result<App> {
        let server_lock = crate::db::lock_for_server(&config.database)?;
        let db = Db::connect(&config.database).await?;
        db.migrate().await?;
        let generated_admin_password =
            users::bootstrap_admin(&db, &clock, config.bootstrap_admin_password.as_deref()).await?;
        let metrics = Metrics::new()?;
        let auth = Auth::init(db.clone(), &config, clock.clone(), metrics.clone()).await?;
        let events = Events::start(&db, config.event_buffer as usize).await?;
        let clock_for_limits = clock.clone();
        let store = Store::new(
            db.clone(),
            clock,
            Limits {
                max_value_bytes: config.max_value_bytes,
                max_batch_items: config.max_batch_items,
                changes_retention: config.changes_retention,
                changes_max_per_tenant: config.changes_max_per_tenant,
                max_feeds: config.max_feeds,
                max_feeds_per_user: config.max_feeds_per_user,
                default_quota: crate::store::quota::Quota {
                    max_keys: config.default_max_keys,
                    max_bytes: config.default_max_bytes,
                },
            },
            events,
            config.cache_bytes,
            metrics.clone(),
        )?;
        let sweeper = Sweeper::spawn(store.clone(), config.sweep_interval, config.sweep_batch);
        let checkpointer = db
            .start_checkpointer(std::time::Duration::from_millis(200))
            .map(AbortOnDrop);
        let state = AppState {
            inner: Arc::new(StateInner {
                db,
                store,
                auth,
                config: config.clone(),
                metrics: metrics.clone(),
                sockets: Arc::default(),
                limiter: crate::ratelimit::TenantLimiter::new(
                    config.tenant_rate,
                    config.tenant_burst,
                    clock_for_limits,
                    metrics.clone(),
                ),
            }),
        };
        Ok(App {
            state,
            sweeper,
            config,
            generated_admin_password,
            _server_lock: server_lock,
            _checkpointer: checkpointer,
        })
    }

    /// The HTTP endpoint: REST, GraphQL, OpenAPI, Swagger UI, health probes,
    /// inside the request middleware, compressed where it pays and,
    /// outermost, CORS.
    pub fn endpoint(&self) -> impl Endpoint + 'static {
        let api = rest::service();
        let spec = api.spec_endpoint();
        let state = self.state.clone();
        Route::new()
            .at("/openapi.json", get(spec))
            .at("/metrics", get(crate::metrics::endpoint))
            .nest("/docs", pages::docs_routes())
            .at("/favicon.svg", get(pages::favicon))
            .at("/favicon.ico", get(pages::favicon))
            .nest(
                "/graphql",
                graphql::routes(&self.config.graphql, self.state.clone()),
            )
            .nest("/", api)
            .data(self.state.clone())
            .around(move |ep, req| middleware::around(ep, req, state.clone()))
            .around(compression::around)
            .with(Cors::new(self.config.cors_origins.clone()))
    }

    /// Binds `config.listen` (port 0 picks a free port) and serves until
    /// `shutdown` resolves. Returns the bound address through `bound` first.
    pub async fn serve(
        self,
        bound: impl FnOnce(SocketAddr),
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let acceptor = TcpListener::bind(self.config.listen)
            .into_acceptor()
            .await
            .with_context(|| format!("cannot listen on {}", self.config.listen))?;
        let acceptor = crate::listener::GuardedAcceptor::new(
            acceptor,
            self.config.max_connections,
            self.config.max_connections_per_address,
            self.config.trusted_proxies.clone(),
            self.config.header_read_timeout,
            self.config.idle_timeout,
        );
        let addr = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .context("the listener has no address")?;
        bound(addr);
        let endpoint = self.endpoint();
        poem::Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(
                endpoint,
                shutdown,
                Some(std::time::Duration::from_secs(10)),
            )
            .await
            .context("server error")?;
        drop(self.sweeper);
        Ok(())
    }
}
