//! Shared helpers for integration tests: in-process fakes of the upstreams (`mod common;` from a test file).

// Each test file compiles this module on its own and uses only part of it.
#![allow(dead_code)]

pub mod fake_ews;
pub mod fake_graph;
pub mod fake_oauth;
pub mod fake_smtp;
pub mod real;
