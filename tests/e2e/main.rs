//! kvql end to end: a real server on 127.0.0.1:0, real HTTP, a fresh migrated
//! database per test (a temp SQLite file, or a fresh PostgreSQL database when
//! `KVQL_TEST_DATABASE_URL` is set).

mod support;

mod admin;
mod api_keys;
mod auth;
mod batch;
mod changes;
mod cli;
mod concurrency;
mod cors;
mod errors;
mod graphql;
mod graphql_http;
mod graphql_limits;
mod hostile;
mod keys;
mod limits;
mod listing;
mod logs;
mod metrics;
mod nodes;
mod objects;
mod openapi;
mod pages;
mod quotas;
mod readme_flow;
mod subscriptions;
mod tenancy;
mod ttl;
