//! Every message exchanged between actors, in one place, and the tracing of them.
//!
//! Tracing (`RUST_LOG=wsgate::trace=trace`) prints one line per message:
//! `sender -> receiver: MessageName {fields}`, with `session#ID`, `pool:NAME`,
//! `listener:NAME`, `supervisor`, `health_checker` as actor names.

use crate::pool::{BackendState, Lease};
use crate::relay::Control;
use std::fmt::{self, Debug};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use xactor::message;

/// Log target of actor message tracing.
pub const TRACE_TARGET: &str = "wsgate::trace";

pub type SessionId = u64;

/// Traces one message if `wsgate::trace` is on; the check is one atomic load when it is off.
pub fn trace(from: &dyn fmt::Display, to: &dyn fmt::Display, msg: &dyn Debug) {
    if log::log_enabled!(target: TRACE_TARGET, log::Level::Trace) {
        log::trace!(target: TRACE_TARGET, "{from} -> {to}: {msg:?}");
    }
}

/// Actor names as they appear in traces and logs.
pub struct SessionName(pub SessionId);
impl fmt::Display for SessionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "session#{}", self.0)
    }
}
pub struct PoolName<'a>(pub &'a str);
impl fmt::Display for PoolName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pool:{}", self.0)
    }
}
pub struct ListenerName<'a>(pub &'a str);
impl fmt::Display for ListenerName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "listener:{}", self.0)
    }
}

// ---- session -> pool ----

/// A new session asks its pool for backends to try, best first.
#[message(result = "Picked")]
#[derive(Debug)]
pub struct PickBackends {
    pub session: SessionId,
    pub client_ip: IpAddr,
    /// Backends already tried and failed by this session (failover skips them).
    pub exclude: Vec<SocketAddr>,
}

/// The pool's answer: candidates in order, and a lease on the first (counted as live so that
/// `least_conn` sees sessions still in their handshake).
pub struct Picked {
    pub candidates: Vec<Arc<BackendState>>,
    pub lease: Option<Lease>,
}

/// A connect or handshake to a backend failed (passive health).
#[message]
#[derive(Debug)]
pub struct BackendFailed {
    pub session: SessionId,
    pub backend: SocketAddr,
    pub reason: String,
}

// ---- pool -> session ----

/// The pool declared the session's backend down.
#[message]
#[derive(Debug)]
pub struct BackendLost {
    pub backend: SocketAddr,
    pub reason: String,
}

// ---- supervisor / listener -> session ----

/// Tell a running session to end (drain, shutdown) or that its backend is down.
#[message]
pub struct SessionControl(pub Control);
impl Debug for SessionControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionControl {{ {:?} }}", self.0)
    }
}

// ---- supervisor ----

/// A supervised child actor stopped; if the supervisor did not ask for it, it failed.
#[message]
#[derive(Debug)]
pub struct ChildExited {
    pub child: crate::supervisor::ChildId,
    pub generation: u64,
}

/// Restart a failed child after its backoff.
#[message]
#[derive(Debug)]
pub struct RestartChild {
    pub child: crate::supervisor::ChildId,
}

/// Test-only: make an actor panic inside a handler (feature `fault-injection`).
#[message]
#[derive(Debug)]
pub struct Fault;

/// Pool to itself: a passively ejected backend's `fail_timeout` has passed.
#[message]
#[derive(Debug)]
pub struct Revive {
    pub backend: usize,
    pub epoch: u64,
}

/// Stop accepting: the supervisor stops its listeners and closes their sockets.
#[message]
#[derive(Debug)]
pub struct StopAccepting;

// ---- health checker -> pool ----

/// An active-check transition of one backend (by index in the pool).
#[message]
#[derive(Debug)]
pub struct HealthReport {
    pub backend: usize,
    pub up: bool,
    pub cause: String,
}

/// Apply a validated config: a new shared generation and sockets bound for new or moved
/// listeners (bound beforehand, so a bind error leaves everything as it was).
#[message]
pub struct Reload {
    pub shared: Arc<crate::shared::Shared>,
    pub sockets: std::collections::HashMap<String, Arc<crate::rt::TcpListener>>,
}
impl Debug for Reload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&String> = self.sockets.keys().collect();
        write!(
            f,
            "Reload {{ pools: {:?}, new sockets: {names:?} }}",
            self.shared.pools.keys().collect::<Vec<_>>()
        )
    }
}

/// `drain_ms` after a reload removed backends: hand their remaining sessions to `on_backend_loss`.
#[message]
pub struct DrainExpired {
    pub backends: Vec<Arc<BackendState>>,
}
impl Debug for DrainExpired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let addrs: Vec<SocketAddr> = self.backends.iter().map(|b| b.addr).collect();
        write!(f, "DrainExpired {{ backends: {addrs:?} }}")
    }
}
