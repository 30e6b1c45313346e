//! Hostile input, one test per finding of the hardening issue: each asserts
//! the status and code, that the server still answers, and where it applies
//! that nothing was written. Runs on both backends.

mod bodies;
mod graphql;
mod http;
mod login;
mod numbers;
mod openapi_contract;
mod sockets;
