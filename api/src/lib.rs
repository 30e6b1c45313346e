//! kvql as a library: the server and its command line. `src/main.rs` only
//! calls [`cli::main`]; the tests build an [`app::App`] directly.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod compression;
pub mod config;
pub mod cors;
pub mod db;
pub mod error;
pub mod graphql;
mod headers;
pub mod input;
mod listener;
pub mod metrics;
mod middleware;
pub mod pages;
pub mod ratelimit;
pub mod rest;
pub mod slots;
pub mod store;
pub mod sweeper;
pub mod throttle;
pub mod users;
