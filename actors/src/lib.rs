//! The wsgate engine. Control plane in actors — supervisor, listener, session, pool (one file
//! each, their messages in `messages`) — and data plane in tight loops (`relay`). Pure logic
//! (config validation, routing, balancing, header rewriting) is plain functions.

pub mod balance;
pub mod config;
pub mod handshake;
pub mod health_checker;
pub mod listener;
pub mod messages;
pub mod metrics;
pub mod pool;
pub mod proxy_header;
pub mod relay;
pub mod route;
pub mod rt;
pub mod session;
pub mod shared;
pub mod supervisor;
pub mod transport;
pub mod tunnel;

use config::Config;
use metrics::Metrics;
use shared::Shared;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use supervisor::Supervisor;
use xactor::{Actor, Addr};

/// A running gateway.
pub struct Gateway {
    pub supervisor: Addr<Supervisor>,
    pub shared: Arc<Shared>,
    /// The bound address of each listener, in config order.
    pub listen_addrs: Vec<SocketAddr>,
}

/// Binds every listener (a bind failure is a start-up error) and starts the actor tree.
pub async fn start(config: Config) -> Result<Gateway, String> {
    let config = Arc::new(config);
    let shared = Shared::new(Arc::clone(&config), Arc::new(Metrics::default()))
        .map_err(|e| e.to_string())?;
    let mut sockets = Vec::new();
    let mut listen_addrs = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let name = config.listener_name(i);
        let socket = rt::TcpListener::bind(l.bind)
            .await
            .map_err(|e| format!("listener {name}: cannot bind {}: {e}", l.bind))?;
        let local = socket
            .local_addr()
            .map_err(|e| format!("listener {name}: {e}"))?;
        log::info!("listener {name} listening on {local}");
        listen_addrs.push(local);
        sockets.push(Arc::new(socket));
    }
    let supervisor = Supervisor::new(Arc::clone(&shared), sockets)
        .start()
        .await
        .map_err(|e| format!("supervisor did not start: {e}"))?;
    Ok(Gateway {
        supervisor,
        shared,
        listen_addrs,
    })
}

impl Gateway {
    /// Graceful stop (SIGTERM/SIGINT): stop accepting, close every client with 1001, and wait
    /// up to `drain` for the closing handshakes. Returns the sessions still open at the end.
    pub async fn shutdown(&self, drain: Duration) -> u64 {
        let _ = self.supervisor.call(messages::StopAccepting).await;
        self.shared.draining.store(true, Relaxed);
        let going_away = || relay::Control::Close {
            code: 1001,
            reason: "going away",
        };
        let n = self.shared.broadcast(going_away);
        log::info!(
            "shutdown: closing {n} sessions with 1001 (drain_ms {})",
            drain.as_millis()
        );
        let deadline = Instant::now() + drain;
        loop {
            let live = self.shared.metrics.sessions_active.load(Relaxed);
            if live == 0 || Instant::now() >= deadline {
                return live;
            }
            // Sessions that were mid-handshake at the broadcast see `draining` and close too.
            rt::sleep(Duration::from_millis(20)).await;
        }
    }
}
