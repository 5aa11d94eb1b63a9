//! TEMPORARY: compiles http.rs/metrics.rs (with their unit tests) until main.rs declares them.
#![allow(dead_code)]
#[path = "../src/http.rs"]
mod http;
#[path = "../src/metrics.rs"]
mod metrics;
