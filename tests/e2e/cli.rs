//! The `kvql user` commands, run as the real binary against the test database.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::json;

use api::auth::Role;

use crate::support::{PASSWORD, TestApp, object_path};

fn kvql(app: &TestApp, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvql"))
        .args(args)
        .env("KVQL_DATABASE_URL", &app.db.url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kvql");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        // The process may exit before reading (e.g. on a usage error).
        let _ = input.write_all(s.as_bytes());
    }
    drop(input);
    child.wait_with_output().expect("kvql output")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn user_add_creates_a_user_who_can_log_in_and_write() {
    let app = TestApp::spawn().await;
    let out = kvql(
        &app,
        &[
            "user",
            "add",
            "carol",
            "--tenant",
            "newco",
            "--role",
            "writer",
            "--password-stdin",
        ],
        Some("carols password\n"),
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("carol"));
    let token = app.login("carol", "carols password").await;
    let r = app
        .post("/api/object", Some(&token), &json!({"key": "k", "data": 1}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
}

#[tokio::test]
async fn user_add_refuses_a_duplicate_username_clearly() {
    let app = TestApp::spawn().await;
    let args = ["user", "add", "dave", "--tenant", "one", "--password-stdin"];
    assert!(kvql(&app, &args, Some("first password\n")).status.success());
    let again = kvql(
        &app,
        &["user", "add", "dave", "--tenant", "two", "--password-stdin"],
        Some("second password\n"),
    );
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already exists"),
        "stderr: {}",
        text(&again.stderr)
    );
    // The first user is untouched.
    app.login("dave", "first password").await;
}

#[tokio::test]
async fn user_add_refuses_bad_input_clearly() {
    let app = TestApp::spawn().await;
    let cases: [(&[&str], Option<&str>, &str); 4] = [
        (
            &["user", "add", "erin", "--tenant", "t", "--password-stdin"],
            Some("short\n"),
            "at least 8",
        ),
        (
            &["user", "add", "erin", "--tenant", "t"],
            Some("long enough pw\n"),
            "--password-stdin",
        ),
        (
            &[
                "user",
                "add",
                "erin",
                "--tenant",
                "t",
                "--role",
                "god",
                "--password-stdin",
            ],
            Some("long enough pw\n"),
            "god",
        ),
        (
            &[
                "user",
                "add",
                "bad name",
                "--tenant",
                "t",
                "--password-stdin",
            ],
            Some("long enough pw\n"),
            "invalid username",
        ),
    ];
    for (args, stdin, expected) in cases {
        let out = kvql(&app, args, stdin);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            text(&out.stderr).contains(expected),
            "{args:?}: stderr {}",
            text(&out.stderr)
        );
    }
    let list = kvql(&app, &["user", "list"], None);
    assert!(!text(&list.stdout).contains("erin"));
}

#[tokio::test]
async fn user_list_shows_users_and_filters_by_tenant() {
    let app = TestApp::spawn().await;
    for (name, tenant, role) in [("frank", "red", "reader"), ("gina", "blue", "owner")] {
        let out = kvql(
            &app,
            &[
                "user",
                "add",
                name,
                "--tenant",
                tenant,
                "--role",
                role,
                "--password-stdin",
            ],
            Some("a fine password\n"),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let all = text(&kvql(&app, &["user", "list"], None).stdout);
    for expected in [
        "USERNAME", "admin", "frank", "red", "reader", "gina", "blue", "owner",
    ] {
        assert!(all.contains(expected), "{expected} missing from:\n{all}");
    }
    let red = text(&kvql(&app, &["user", "list", "--tenant", "red"], None).stdout);
    assert!(red.contains("frank"));
    assert!(!red.contains("gina"));
    assert!(!red.contains("admin"));
}

#[tokio::test]
async fn user_passwd_changes_the_password() {
    let app = TestApp::spawn().await;
    kvql(
        &app,
        &["user", "add", "hank", "--tenant", "t", "--password-stdin"],
        Some("old password\n"),
    );
    let out = kvql(
        &app,
        &["user", "passwd", "hank", "--password-stdin"],
        Some("new password\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    app.login("hank", "new password").await;
    app.post(
        "/login",
        None,
        &json!({"username": "hank", "password": "old password"}),
    )
    .await
    .assert_error(401, "UNAUTHENTICATED");
    let missing = kvql(
        &app,
        &["user", "passwd", "nobody", "--password-stdin"],
        Some("whatever123\n"),
    );
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("no user named"));
}

#[tokio::test]
async fn user_remove_revokes_the_users_tokens_and_keeps_the_data() {
    let app = TestApp::spawn().await;
    kvql(
        &app,
        &["user", "add", "ivy", "--tenant", "keep", "--password-stdin"],
        Some(&format!("{PASSWORD}\n")),
    );
    let token = app.login("ivy", PASSWORD).await;
    app.post(
        "/api/object",
        Some(&token),
        &json!({"key": "k", "data": "kept"}),
    )
    .await;
    let out = kvql(&app, &["user", "remove", "ivy"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    app.clock.advance(app.config.auth_cache_ttl);
    app.get("/api/objects", Some(&token))
        .await
        .assert_error(401, "UNAUTHENTICATED");
    app.post(
        "/login",
        None,
        &json!({"username": "ivy", "password": PASSWORD}),
    )
    .await
    .assert_error(401, "UNAUTHENTICATED");
    assert_eq!(app.row_count().await, 1);
    let again = kvql(&app, &["user", "remove", "ivy"], None);
    assert!(!again.status.success());
}

#[tokio::test]
async fn migrate_applies_migrations_to_an_empty_database() {
    let db = crate::support::TestDb::new().await;
    let out = Command::new(env!("CARGO_BIN_EXE_kvql"))
        .args(["migrate"])
        .env("KVQL_DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("migrations applied"));
    let again = Command::new(env!("CARGO_BIN_EXE_kvql"))
        .args(["migrate"])
        .env("KVQL_DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(again.status.success(), "migrate is idempotent");
}

#[test]
fn an_in_memory_sqlite_url_is_refused_with_a_clear_error() {
    for url in [
        "sqlite::memory:",
        "sqlite://file.db?mode=memory",
        "sqlite://x.db?vfs=memdb",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kvql"))
            .arg("migrate")
            .env("KVQL_DATABASE_URL", url)
            .output()
            .expect("run kvql");
        assert!(!out.status.success(), "{url} was accepted");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("in-memory SQLite") && stderr.contains("use a file"),
            "{url}: {stderr}"
        );
    }
}

#[tokio::test]
async fn user_passwd_revokes_tokens_already_issued() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    assert_eq!(app.get("/api/objects", Some(&u.token)).await.status, 200);
    let out = kvql(
        &app,
        &["user", "passwd", &u.username, "--password-stdin"],
        Some("another password\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    app.clock.advance(app.config.auth_cache_ttl);
    app.get("/api/objects", Some(&u.token))
        .await
        .assert_error(401, "UNAUTHENTICATED");
    let fresh = app.login(&u.username, "another password").await;
    assert_eq!(app.get("/api/objects", Some(&fresh)).await.status, 200);
}

#[tokio::test]
async fn user_role_demotes_and_promotes_within_the_auth_cache_window() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    assert_eq!(app.create(&u, "one", json!(1), None).await.status, 201);
    let out = kvql(&app, &["user", "role", &u.username, "reader"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    app.clock.advance(app.config.auth_cache_ttl);
    app.create(&u, "two", json!(2), None)
        .await
        .assert_error(403, "FORBIDDEN");
    assert_eq!(app.read(&u, "one").await.status, 200);
    let list = text(&kvql(&app, &["user", "list"], None).stdout);
    assert!(
        list.lines()
            .any(|l| l.contains(&u.username) && l.contains("reader")),
        "{list}"
    );
    let out = kvql(&app, &["user", "role", &u.username, "owner"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    app.clock.advance(app.config.auth_cache_ttl);
    assert_eq!(app.create(&u, "two", json!(2), None).await.status, 201);
    for (args, expected) in [
        (["user", "role", "nobody", "reader"], "no user named"),
        (["user", "role", u.username.as_str(), "god"], "god"),
    ] {
        let out = kvql(&app, &args, None);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains(expected),
            "{}",
            text(&out.stderr)
        );
    }
}

fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

#[tokio::test]
async fn key_rotate_makes_a_new_key_sign_and_old_tokens_keep_working() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let first = kid(&u.token);
    let out = kvql(&app, &["key", "rotate", "--token-ttl", "2h"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The running server picks the rotation up within a second.
    app.clock.advance(std::time::Duration::from_secs(1));
    assert_eq!(app.get("/api/objects", Some(&u.token)).await.status, 200);
    let fresh = app.login(&u.username, PASSWORD).await;
    let second = kid(&fresh);
    assert_ne!(first, second);
    assert_eq!(app.get("/api/objects", Some(&fresh)).await.status, 200);
    let list = text(&kvql(&app, &["key", "list"], None).stdout);
    let line = |kid: &str| {
        list.lines()
            .find(|l| l.starts_with(kid))
            .unwrap_or_else(|| panic!("{kid} missing from:\n{list}"))
            .to_owned()
    };
    assert!(line(&second).ends_with("signing"), "{list}");
    assert!(line(&first).ends_with("verifying"), "{list}");
    assert!(list.starts_with("KID"), "{list}");
}

#[tokio::test]
async fn key_rotate_with_revoke_old_refuses_older_tokens() {
    let app = TestApp::spawn().await;
    let u = app.writer().await;
    let first = kid(&u.token);
    let out = kvql(&app, &["key", "rotate", "--revoke-old"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("revoked"),
        "{}",
        text(&out.stderr)
    );
    // The command used the real clock, which has run ahead of the test's.
    app.clock.advance(std::time::Duration::from_secs(60));
    app.get("/api/objects", Some(&u.token))
        .await
        .assert_error(401, "UNAUTHENTICATED");
    let fresh = app.login(&u.username, PASSWORD).await;
    assert_ne!(kid(&fresh), first);
    assert_eq!(app.get("/api/objects", Some(&fresh)).await.status, 200);
    let list = text(&kvql(&app, &["key", "list"], None).stdout);
    assert!(
        list.lines()
            .any(|l| l.starts_with(&first) && l.ends_with("retired")),
        "{list}"
    );
}

#[tokio::test]
async fn tenant_list_and_show_count_users_and_live_keys() {
    let app = TestApp::spawn().await;
    let u = app.user("tenant-cli", Role::Writer).await;
    let _second = app.user("tenant-cli", Role::Reader).await;
    for key in ["a", "b", "gone"] {
        assert_eq!(app.create(&u, key, json!(1), None).await.status, 201);
    }
    let deleted = app.delete(&object_path("gone"), Some(&u.token)).await;
    assert_eq!(deleted.status, 200);
    let list = kvql(&app, &["tenant", "list"], None);
    assert!(list.status.success(), "{}", text(&list.stderr));
    let list = text(&list.stdout);
    let row = list
        .lines()
        .find(|l| l.starts_with("tenant-cli "))
        .unwrap_or_else(|| panic!("no row for tenant-cli in:\n{list}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "2", "users: {row}");
    assert_eq!(cells[2], "2", "live keys: {row}");
    assert_eq!(cells[3], "4", "revision: {row}");
    assert!(list.lines().any(|l| l.starts_with("default ")), "{list}");

    let show = kvql(&app, &["tenant", "show", "tenant-cli"], None);
    assert!(show.status.success(), "{}", text(&show.stderr));
    let show = text(&show.stdout);
    assert!(show.contains("live keys:          2"), "{show}");
    assert!(show.contains("latest revision:    4"), "{show}");
    assert!(show.contains("users:              2"), "{show}");
    assert!(show.contains(&u.username), "{show}");

    assert!(
        show.contains("request rate:       the servers' KVQL_TENANT_RATE"),
        "{show}"
    );
    for (args, shown) in [
        (&["5", "--burst", "9"][..], "5 per second, 9 at once"),
        (&["7"][..], "7 per second, 7 at once"),
        (&["none"][..], "none"),
        (&["default"][..], "the servers' KVQL_TENANT_RATE"),
    ] {
        let mut command = vec!["tenant", "set-rate", "tenant-cli"];
        command.extend_from_slice(args);
        let set = kvql(&app, &command, None);
        assert!(set.status.success(), "{}", text(&set.stderr));
        let show = text(&kvql(&app, &["tenant", "show", "tenant-cli"], None).stdout);
        assert!(
            show.contains(&format!("request rate:       {shown}")),
            "{args:?}: {show}"
        );
    }
    for bad in [&["0"][..], &["fast"][..], &["none", "--burst", "3"][..]] {
        let mut command = vec!["tenant", "set-rate", "tenant-cli"];
        command.extend_from_slice(bad);
        let refused = kvql(&app, &command, None);
        assert!(!refused.status.success(), "{bad:?} was accepted");
    }
    let refused = kvql(&app, &["tenant", "set-rate", "no-such-tenant", "5"], None);
    assert!(!refused.status.success());

    assert!(show.contains("live bytes:         4"), "{show}");
    for (args, keys, bytes) in [
        (
            &["--max-keys", "10", "--max-bytes", "1000"][..],
            "10",
            "1000",
        ),
        (&["--max-keys", "none"][..], "none", "1000"),
        (
            &["--max-bytes", "default"][..],
            "none",
            "the servers' KVQL_DEFAULT_MAX_BYTES",
        ),
        (
            &["--max-keys", "0"][..],
            "0",
            "the servers' KVQL_DEFAULT_MAX_BYTES",
        ),
    ] {
        let mut command = vec!["tenant", "set-quota", "tenant-cli"];
        command.extend_from_slice(args);
        let set = kvql(&app, &command, None);
        assert!(set.status.success(), "{}", text(&set.stderr));
        let show = text(&kvql(&app, &["tenant", "show", "tenant-cli"], None).stdout);
        assert!(
            show.contains(&format!("max keys:           {keys}")),
            "{args:?}: {show}"
        );
        assert!(
            show.contains(&format!("max bytes:          {bytes}")),
            "{args:?}: {show}"
        );
    }
    for bad in [
        &[][..],
        &["--max-keys", "-1"][..],
        &["--max-bytes", "lots"][..],
    ] {
        let mut command = vec!["tenant", "set-quota", "tenant-cli"];
        command.extend_from_slice(bad);
        let refused = kvql(&app, &command, None);
        assert!(!refused.status.success(), "{bad:?} was accepted");
    }
    let refused = kvql(
        &app,
        &["tenant", "set-quota", "no-such-tenant", "--max-keys", "5"],
        None,
    );
    assert!(!refused.status.success());

    let missing = kvql(&app, &["tenant", "show", "no-such-tenant"], None);
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("no tenant named \"no-such-tenant\""),
        "{}",
        text(&missing.stderr)
    );
}

/// `kvql user add` reads before it writes. In a deferred SQLite transaction,
/// a commit of the server's committer between the read and the write made
/// SQLite refuse the write at once ("database is locked"), whatever the
/// busy timeout; the transaction now takes the write lock when it begins.
/// A race, so a regression fails most runs, not every one (3 of 3 before
/// the fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_add_succeeds_while_the_server_commits_writes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let app = Arc::new(TestApp::spawn().await);
    let u = app.writer().await;
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (app, token, stop, written) =
                (app.clone(), u.token.clone(), stop.clone(), written.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let path = object_path(&format!("w{w}-{}", n % 50));
                    let r = app.put(&path, Some(&token), &json!({"data": n})).await;
                    assert!(r.status == 200 || r.status == 201, "{r:?}");
                    written.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            })
        })
        .collect();
    // Every command below runs while the writers are committing.
    let began = loop {
        let n = written.load(Ordering::Relaxed);
        if n > 0 {
            break n;
        }
        tokio::task::yield_now().await;
    };
    for i in 0..6 {
        let app = app.clone();
        let out = tokio::task::spawn_blocking(move || {
            let name = format!("busy-{i}");
            kvql(
                &app,
                &["user", "add", &name, "--tenant", &name, "--password-stdin"],
                Some("a long enough password\n"),
            )
        })
        .await
        .expect("the command ran");
        assert!(
            out.status.success(),
            "user add {i} failed beside writes: {}",
            text(&out.stderr)
        );
    }
    let ended = written.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("a writer");
    }
    assert!(ended > began, "the server wrote while the commands ran");
    for i in 0..6 {
        let login = app
            .post(
                "/login",
                None,
                &json!({"username": format!("busy-{i}"), "password": "a long enough password"}),
            )
            .await;
        assert_eq!(login.status, 200, "busy-{i} can log in");
    }
}
