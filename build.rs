//! Tells the end-to-end tests which backend they run on, so that a test made
//! for one backend is reported as ignored (with its reason) on the other
//! instead of passing without running.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kvql_test_postgres)");
    println!("cargo::rerun-if-env-changed=KVQL_TEST_DATABASE_URL");
    if std::env::var("KVQL_TEST_DATABASE_URL").is_ok_and(|u| !u.is_empty()) {
        println!("cargo::rustc-cfg=kvql_test_postgres");
    }
}
