//! The `kvql` command line.

use std::io::{BufRead, IsTerminal};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::app::App;
use crate::auth::Role;
use crate::clock::{Clock, rfc3339};
use crate::config::{Config, DatabaseArgs, LogFormat, parse_duration};
use crate::db::Db;
use crate::ratelimit::{Rate, TenantRate};
use crate::store::quota::QuotaLimit;
use crate::{auth, graphql, rest, users};

/// kvql: a multi-tenant JSON key-value store over GraphQL and REST.
///
/// With no command, runs the server (`kvql serve`).
#[derive(Parser)]
#[command(name = "kvql", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Config,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default command).
    Serve(Box<Config>),
    /// Apply pending database migrations and exit. `serve` also applies them.
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Manage users and tenants.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Look at tenants.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Manage the keys that sign access tokens.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Print the OpenAPI document of the REST API (as checked in at openapi.json).
    Openapi,
    /// Print the GraphQL schema in SDL (as checked in at schema.graphql).
    Schema,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user, and its tenant if it does not exist yet. The password is
    /// read from standard input.
    Add {
        /// Unique across all tenants: 1 to 64 letters, digits or `._@-`.
        username: String,
        /// The tenant the user belongs to (created if missing).
        #[arg(long)]
        tenant: String,
        /// `owner` and `writer` can read and write; `reader` can only read.
        #[arg(long, default_value = "writer", value_parser = parse_role)]
        role: Role,
        /// Read the password (at least 8 characters) from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// List users.
    List {
        /// Only the users of this tenant.
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Change a user's password, read from standard input. Tokens already
    /// issued to the user stop working within the auth cache TTL (1 s).
    Passwd {
        username: String,
        /// Read the password (at least 8 characters) from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Change a user's role (owner, writer or reader); it applies to tokens
    /// already issued within the auth cache TTL (1 s).
    Role {
        username: String,
        /// `owner` and `writer` can read and write; `reader` can only read.
        #[arg(value_parser = parse_role)]
        role: Role,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Remove a user; their tokens stop working within the auth cache TTL (1 s). The tenant's data stays.
    Remove {
        username: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// List tenants: users, live keys, latest revision. Counting live keys
    /// reads every key, so a tenant of millions of keys takes seconds.
    List {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Show one tenant: the same figures, its request rate, and its users.
    Show {
        tenant: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Give a tenant its own request rate per node, instead of the servers'
    /// `KVQL_TENANT_RATE`: a number of requests per second, `none` for no
    /// limit, or `default` for the servers' setting again. Running servers
    /// apply it within the auth cache TTL.
    SetRate {
        tenant: String,
        /// Requests per second, `none` or `default`.
        rate: String,
        /// Requests at once above the rate; defaults to the rate.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        burst: Option<u32>,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Give a tenant its own storage limits instead of the servers'
    /// `KVQL_DEFAULT_MAX_KEYS` / `KVQL_DEFAULT_MAX_BYTES`: a number, `none`
    /// for no limit, or `default` for the servers' setting again. A limit
    /// not named stays as it is. Running servers apply it within the auth
    /// cache TTL; a tenant already over a lowered limit keeps its data and
    /// may delete or shrink, but not grow.
    #[command(arg_required_else_help = true)]
    SetQuota {
        tenant: String,
        /// Most keys holding a live value: a number, `none` or `default`.
        #[arg(long, value_parser = QuotaLimit::parse, required_unless_present = "max_bytes")]
        max_keys: Option<QuotaLimit>,
        /// Most bytes of live values (keys' UTF-8 bytes plus values' compact
        /// JSON): a number, `none` or `default`.
        #[arg(long, value_parser = QuotaLimit::parse)]
        max_bytes: Option<QuotaLimit>,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a new key sign tokens. Older keys keep verifying the tokens they
    /// signed until those expire (token TTL plus a minute), unless
    /// `--revoke-old`. Running servers pick the change up within about a second.
    Rotate {
        /// The servers' token TTL (`KVQL_TOKEN_TTL`): how long older keys must
        /// keep verifying.
        #[arg(long, env = "KVQL_TOKEN_TTL", default_value = "1h", value_parser = parse_duration)]
        token_ttl: Duration,
        /// Stop older keys verifying at once: every token they signed is
        /// refused (for a key that may have leaked).
        #[arg(long)]
        revoke_old: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// List the signing keys: which one signs, and when the others stop verifying.
    List {
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s)
}

/// Runs the command line; the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvql: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvql: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(config)) => serve(*config).await,
        Some(Command::Migrate { database }) => {
            let db = Db::connect(&database).await?;
            db.migrate().await?;
            eprintln!("kvql: migrations applied to {}", database.redacted_url());
            Ok(())
        }
        Some(Command::User { command }) => user(command).await,
        Some(Command::Tenant { command }) => tenant(command).await,
        Some(Command::Key { command }) => key(command).await,
        Some(Command::Openapi) => {
            println!("{}", rest::openapi_json());
            Ok(())
        }
        Some(Command::Schema) => {
            print!("{}", graphql::sdl());
            Ok(())
        }
    }
}

/// Logs go to standard error from a thread of their own: a request only
/// queues its lines, so a slow or stuck reader of standard error never holds
/// up requests. Lines beyond a full queue (128,000 lines) are dropped, and
/// how many is logged every 10 seconds while it happens. Keep the guard
/// until exit: dropping it flushes what is queued.
fn init_logging(
    filter: &str,
    format: LogFormat,
) -> anyhow::Result<tracing_appender::non_blocking::WorkerGuard> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid log filter {filter:?}"))?;
    let log_level = filter.max_level_hint();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .thread_name("kvql-logs")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    tokio::spawn(async move {
        let mut reported = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let now = dropped.dropped_lines();
            if now > reported {
                tracing::warn!(
                    lost = now - reported,
                    "log lines dropped: standard error is not read as fast as lines are written"
                );
                reported = now;
            }
        }
    });
    use tracing_log::AsLog;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{Layer, fmt};
    // The log filter applies to the log layer only: the pool wait metric
    // sees sqlx's acquisitions whatever the filter.
    let logs = match format {
        // Colours only for a person at a terminal, not in files and collectors.
        LogFormat::Text => fmt::layer()
            .with_writer(writer)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter)
            .boxed(),
        // An event's fields at the top level; the request's (its id) under
        // `span`.
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(crate::metrics::pool_wait_layer())
        .try_init()
        .context("cannot install the log subscriber")?;
    // The pool wait layer lifts tracing's global level to `trace`, and the
    // bridge for the `log` crate follows it: keep `log` records (tungstenite
    // makes several per WebSocket frame) at the log filter's level, so that
    // the ones it would drop cost nothing.
    log::set_max_level(log_level.map_or(log::LevelFilter::Trace, |l| l.as_log()));
    Ok(guard)
}

async fn tenant(command: TenantCommand) -> anyhow::Result<()> {
    let clock = Clock::system();
    match command {
        TenantCommand::List { database } => {
            let db = open(&database).await?;
            println!(
                "{:<24} {:>6} {:>12} {:>12} CREATED",
                "TENANT", "USERS", "LIVE KEYS", "REVISION"
            );
            for t in users::list_tenants(&db, &clock, None).await? {
                println!(
                    "{:<24} {:>6} {:>12} {:>12} {}",
                    t.name,
                    t.users,
                    t.live_keys,
                    t.revision,
                    rfc3339(t.created_at)
                );
            }
        }
        TenantCommand::SetRate {
            tenant,
            rate,
            burst,
            database,
        } => {
            let rate = match (rate.as_str(), burst) {
                ("default", None) => TenantRate::NodeDefault,
                ("none", None) => TenantRate::Unlimited,
                ("default" | "none", Some(_)) => {
                    bail!("--burst goes with a number of requests per second")
                }
                (n, burst) => {
                    let per_second: u32 = n
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .with_context(|| format!("invalid rate {n:?}: use a number of requests per second (1 or more), none or default"))?;
                    TenantRate::Own(Rate {
                        per_second,
                        burst: burst.unwrap_or(per_second),
                    })
                }
            };
            let db = open(&database).await?;
            users::set_tenant_rate(&db, &tenant, rate).await?;
            println!("{tenant}: request rate {}", rate_text(rate));
        }
        TenantCommand::SetQuota {
            tenant,
            max_keys,
            max_bytes,
            database,
        } => {
            let db = open(&database).await?;
            users::set_tenant_quota(&db, &tenant, max_keys, max_bytes).await?;
            let t = one_tenant(&db, &clock, &tenant).await?;
            println!(
                "{tenant}: max keys {}, max bytes {}",
                limit_text(t.quota.max_keys, "KVQL_DEFAULT_MAX_KEYS"),
                limit_text(t.quota.max_bytes, "KVQL_DEFAULT_MAX_BYTES")
            );
        }
        TenantCommand::Show { tenant, database } => {
            let db = open(&database).await?;
            let t = one_tenant(&db, &clock, &tenant).await?;
            println!("tenant:             {}", t.name);
            println!("created:            {}", rfc3339(t.created_at));
            println!("live keys:          {}", t.live_keys);
            println!("latest revision:    {}", t.revision);
            println!("compacted through:  {}", t.compacted_revision);
            println!("request rate:       {}", rate_text(t.rate));
            println!("live bytes:         {}", t.live_bytes);
            println!(
                "max keys:           {}",
                limit_text(t.quota.max_keys, "KVQL_DEFAULT_MAX_KEYS")
            );
            println!(
                "max bytes:          {}",
                limit_text(t.quota.max_bytes, "KVQL_DEFAULT_MAX_BYTES")
            );
            println!("users:              {}", t.users);
            for u in users::list_users(&db, Some(&t.name)).await? {
                let status = if u.disabled { " (disabled)" } else { "" };
                println!("  {:<24} {}{status}", u.username, u.role);
            }
        }
    }
    Ok(())
}

/// The tenant named `name`, or an error saying there is none.
async fn one_tenant(db: &Db, clock: &Clock, name: &str) -> anyhow::Result<users::TenantInfo> {
    match users::list_tenants(db, clock, Some(name))
        .await?
        .into_iter()
        .next()
    {
        Some(t) => Ok(t),
        None => bail!("no tenant named {name:?} (see `kvql tenant list`)"),
    }
}

fn limit_text(limit: QuotaLimit, default: &str) -> String {
    match limit {
        QuotaLimit::Default => format!("the servers' {default}"),
        QuotaLimit::Unlimited => "none".into(),
        QuotaLimit::Max(n) => n.to_string(),
    }
}

fn rate_text(rate: TenantRate) -> String {
    match rate {
        TenantRate::NodeDefault => "the servers' KVQL_TENANT_RATE".into(),
        TenantRate::Unlimited => "none".into(),
        TenantRate::Own(r) => format!("{} per second, {} at once", r.per_second, r.burst),
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let _logs = init_logging(&config.log, config.log_format)?;
    let database = config.database.redacted_url();
    let app = App::build(config, Clock::system()).await?;
    if let Some(password) = &app.generated_admin_password {
        eprintln!(
            "kvql: created user `admin` (tenant `default`, role owner) with password: {password}\n\
             kvql: this password is shown only once; change it with: kvql user passwd admin --password-stdin"
        );
    }
    app.serve(
        |addr| tracing::info!(%addr, database, "kvql listening"),
        async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        },
    )
    .await
}

fn read_password(password_stdin: bool) -> anyhow::Result<String> {
    if !password_stdin {
        bail!(
            "pass --password-stdin and write the password on standard input, e.g. `echo \"$PW\" | kvql user add ...`"
        );
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("Password: ");
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        bail!("no password on standard input");
    }
    Ok(password)
}

async fn open(database: &DatabaseArgs) -> anyhow::Result<Db> {
    let db = Db::connect(database).await?;
    db.migrate().await?;
    Ok(db)
}

async fn user(command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Add {
            username,
            tenant,
            role,
            password_stdin,
            database,
        } => {
            let password = read_password(password_stdin)?;
            let db = open(&database).await?;
            users::add_user(&db, &Clock::system(), &username, &tenant, role, &password).await?;
            eprintln!("kvql: created user {username:?} in tenant {tenant:?} with role {role}");
        }
        UserCommand::List { tenant, database } => {
            let db = open(&database).await?;
            let list = users::list_users(&db, tenant.as_deref()).await?;
            println!(
                "{:<24} {:<24} {:<8} {:<9} CREATED",
                "USERNAME", "TENANT", "ROLE", "STATUS"
            );
            for u in list {
                println!(
                    "{:<24} {:<24} {:<8} {:<9} {}",
                    u.username,
                    u.tenant,
                    u.role,
                    if u.disabled { "disabled" } else { "active" },
                    rfc3339(u.created_at)
                );
            }
        }
        UserCommand::Passwd {
            username,
            password_stdin,
            database,
        } => {
            let password = read_password(password_stdin)?;
            let db = open(&database).await?;
            users::set_password(&db, &username, &password).await?;
            eprintln!("kvql: changed the password of {username:?}");
        }
        UserCommand::Role {
            username,
            role,
            database,
        } => {
            let db = open(&database).await?;
            users::set_role(&db, &username, role).await?;
            eprintln!("kvql: {username:?} now has role {role}");
        }
        UserCommand::Remove { username, database } => {
            let db = open(&database).await?;
            users::remove_user(&db, &username).await?;
            eprintln!("kvql: removed user {username:?}");
        }
    }
    Ok(())
}

async fn key(command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Rotate {
            token_ttl,
            revoke_old,
            database,
        } => {
            let db = open(&database).await?;
            let kid =
                auth::rotate_signing_key(&db, &Clock::system(), token_ttl, revoke_old).await?;
            if revoke_old {
                eprintln!("kvql: key {kid} now signs; every older key is revoked");
            } else {
                eprintln!(
                    "kvql: key {kid} now signs; older keys verify the tokens they signed until those expire"
                );
            }
        }
        KeyCommand::List { database } => {
            let db = open(&database).await?;
            let now = Clock::system().now_ms();
            println!("{:<32} {:<24} {:<24} STATUS", "KID", "CREATED", "RETIRES");
            for k in auth::list_signing_keys(&db).await? {
                let status = match k.retired_at {
                    _ if k.signing => "signing",
                    Some(at) if at <= now => "retired",
                    Some(_) => "verifying",
                    None => "verifying",
                };
                println!(
                    "{:<32} {:<24} {:<24} {status}",
                    k.kid,
                    rfc3339(k.created_at),
                    k.retired_at.map_or_else(|| "-".to_owned(), rfc3339),
                );
            }
        }
    }
    Ok(())
}
