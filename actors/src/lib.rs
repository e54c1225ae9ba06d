//! The wsgate engine. Control plane in actors — supervisor, listener, session, pool (one file
//! each, their messages in `messages`) — and data plane in tight loops (`relay`). Pure logic
//! (config validation, routing, balancing, header rewriting) is plain functions.

pub mod balance;
pub mod config;
pub mod handshake;
pub mod listener;
pub mod messages;
pub mod metrics;
pub mod pool;
pub mod relay;
pub mod route;
pub mod rt;
pub mod session;
pub mod shared;
pub mod supervisor;
pub mod transport;

use config::Config;
use metrics::Metrics;
use shared::Shared;
use std::net::SocketAddr;
use std::sync::Arc;
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
    let shared = Shared::new(Arc::clone(&config), Arc::new(Metrics::default()));
    let mut sockets = Vec::new();
    let mut listen_addrs = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let name = config.listener_name(i);
        let socket = rt::TcpListener::bind(l.bind)
            .await
            .map_err(|e| format!("listener {name}: cannot bind {}: {e}", l.bind))?;
        let local = socket.local_addr().map_err(|e| format!("listener {name}: {e}"))?;
        log::info!("listener {name} listening on {local}");
        listen_addrs.push(local);
        sockets.push(Arc::new(socket));
    }
    let supervisor = Supervisor::new(Arc::clone(&shared), sockets)
        .start()
        .await
        .map_err(|e| format!("supervisor did not start: {e}"))?;
    Ok(Gateway { supervisor, shared, listen_addrs })
}
