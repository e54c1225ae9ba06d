//! Black-box test harness for wsgate: the real binary as a child process, test WebSocket
//! backends in-process (async-std + async-tungstenite), clients over real loopback sockets.
//!
//! Every wait is bounded (`within`), every child process is killed on drop, every test
//! builds its own backends and gateway on ports the OS picks.
#![allow(dead_code, unused_imports)]

pub mod backend;
pub mod client;
pub mod gateway;
pub mod notify;

pub use async_tungstenite::tungstenite::{
    self,
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message,
};
pub use backend::*;
pub use client::*;
pub use gateway::*;
pub use notify::Notify;
pub use serde_json::{json, Value};

use std::future::Future;
use std::time::Duration;

/// The default bound on any single wait in the tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// Awaits `f`, panicking with `what` if it takes longer than `d`.
pub async fn within<F: Future>(what: &str, d: Duration, f: F) -> F::Output {
    match async_std::future::timeout(d, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {d:?} waiting for: {what}"),
    }
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A close frame's code as a number.
pub fn code_of(frame: &CloseFrame) -> u16 {
    u16::from(frame.code)
}

/// A config with one listener `public` on `127.0.0.1:0`, route `/` → pool `p`.
pub fn one_pool_config(backends: &[&Backend]) -> Value {
    json!({
        "listeners": [
            { "name": "public", "bind": "127.0.0.1:0", "routes": [ { "path": "/", "pool": "p" } ] }
        ],
        "pools": { "p": { "backends": backends_json(backends) } }
    })
}

/// `[{"address": "127.0.0.1:P"}, ...]`
pub fn backends_json(backends: &[&Backend]) -> Value {
    Value::Array(
        backends
            .iter()
            .map(|b| json!({ "address": b.addr.to_string() }))
            .collect(),
    )
}
