//! Process-wide counters, rendered in Prometheus text format by the admin endpoint.
//! Relays add their message and byte counts in batches (on ticks and at session end), never
//! per message, so the data path touches no shared cache line.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default, Debug)]
pub struct Metrics {
    pub sessions_active: AtomicU64,
    pub sessions_total: AtomicU64,
    /// Session actors started and not yet stopped (each accepted connection has one).
    pub session_actors: AtomicU64,
    pub messages_c2b: AtomicU64,
    pub messages_b2c: AtomicU64,
    pub bytes_c2b: AtomicU64,
    pub bytes_b2c: AtomicU64,
    pub failovers_total: AtomicU64,
    pub actor_restarts_total: AtomicU64,
    pub session_panics_total: AtomicU64,
    pub http_requests_total: AtomicU64,
    handshake_failures: [AtomicU64; HandshakeFailure::ALL.len()],
}

/// Why a client's upgrade did not become a session (label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    BadRequest,
    Timeout,
    NoRoute,
    NotUpgrade,
    Origin,
    Limit,
    NoBackend,
    BackendRefused,
    Internal,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 9] = [
        HandshakeFailure::BadRequest,
        HandshakeFailure::Timeout,
        HandshakeFailure::NoRoute,
        HandshakeFailure::NotUpgrade,
        HandshakeFailure::Origin,
        HandshakeFailure::Limit,
        HandshakeFailure::NoBackend,
        HandshakeFailure::BackendRefused,
        HandshakeFailure::Internal,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::BadRequest => "bad_request",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::NoRoute => "no_route",
            HandshakeFailure::NotUpgrade => "not_upgrade",
            HandshakeFailure::Origin => "origin",
            HandshakeFailure::Limit => "limit",
            HandshakeFailure::NoBackend => "no_backend",
            HandshakeFailure::BackendRefused => "backend_refused",
            HandshakeFailure::Internal => "internal",
        }
    }
}

impl Metrics {
    pub fn handshake_failed(&self, why: HandshakeFailure) {
        self.handshake_failures[why as usize].fetch_add(1, Relaxed);
    }

    pub fn handshake_failures(&self, why: HandshakeFailure) -> u64 {
        self.handshake_failures[why as usize].load(Relaxed)
    }

    /// The process-wide series; per-backend series are appended by the caller.
    pub fn render(&self, out: &mut String) {
        let g = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        g(
            out,
            "wsgate_sessions_active",
            "Live client sessions.",
            "gauge",
            self.sessions_active.load(Relaxed),
        );
        g(
            out,
            "wsgate_session_actors",
            "Session actors alive: one per accepted connection, from accept until its \
             session task has ended (closing handshakes included).",
            "gauge",
            self.session_actors.load(Relaxed),
        );
        g(
            out,
            "wsgate_sessions_total",
            "Sessions established since start.",
            "counter",
            self.sessions_total.load(Relaxed),
        );
        let _ = writeln!(out, "# HELP wsgate_messages_total WebSocket messages relayed.\n# TYPE wsgate_messages_total counter");
        let _ = writeln!(
            out,
            "wsgate_messages_total{{direction=\"client_to_backend\"}} {}",
            self.messages_c2b.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "wsgate_messages_total{{direction=\"backend_to_client\"}} {}",
            self.messages_b2c.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP wsgate_bytes_total Payload bytes relayed.\n# TYPE wsgate_bytes_total counter"
        );
        let _ = writeln!(
            out,
            "wsgate_bytes_total{{direction=\"client_to_backend\"}} {}",
            self.bytes_c2b.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "wsgate_bytes_total{{direction=\"backend_to_client\"}} {}",
            self.bytes_b2c.load(Relaxed)
        );
        let _ = writeln!(out, "# HELP wsgate_handshake_failures_total Upgrades that did not become sessions.\n# TYPE wsgate_handshake_failures_total counter");
        for why in HandshakeFailure::ALL {
            let _ = writeln!(
                out,
                "wsgate_handshake_failures_total{{reason=\"{}\"}} {}",
                why.label(),
                self.handshake_failures(why)
            );
        }
        g(
            out,
            "wsgate_failovers_total",
            "Live sessions moved to another backend.",
            "counter",
            self.failovers_total.load(Relaxed),
        );
        g(
            out,
            "wsgate_actor_restarts_total",
            "Actors restarted by the supervisor.",
            "counter",
            self.actor_restarts_total.load(Relaxed),
        );
        g(
            out,
            "wsgate_session_panics_total",
            "Sessions ended by a caught panic (close 1011).",
            "counter",
            self.session_panics_total.load(Relaxed),
        );
        g(
            out,
            "wsgate_http_requests_total",
            "Plain HTTP requests passed through (pools with \"http\": true).",
            "counter",
            self.http_requests_total.load(Relaxed),
        );
    }
}
