//! The wsgate engine. Control plane in actors — supervisor, listener, session, pool (one file
//! each, their messages in `messages`) — and data plane in tight loops (`relay`). Pure logic
//! (config validation, routing, balancing, header rewriting) is plain functions.

pub mod balance;
pub mod config;
pub mod handshake;
pub mod health_checker;
pub mod http_forward;
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
pub mod wire;

use config::Config;
use metrics::Metrics;
use shared::Shared;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use supervisor::Supervisor;
use xactor::{Actor, Addr};

/// A running gateway.
pub struct Gateway {
    pub supervisor: Addr<Supervisor>,
    current: Arc<supervisor::Current>,
    /// The bound address of each listener at start, in config order.
    pub listen_addrs: Vec<SocketAddr>,
}

/// Binds a listener's socket; the error is a one-line message naming it.
async fn bind(
    name: &str,
    addr: SocketAddr,
    shared: &Shared,
) -> Result<Arc<rt::TcpListener>, String> {
    let socket = rt::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("listener {name}: cannot bind {addr}: {e}"))?;
    let local = socket
        .local_addr()
        .map_err(|e| format!("listener {name}: {e}"))?;
    shared.set_bound(name, local);
    log::info!("listener {name} listening on {local}");
    Ok(Arc::new(socket))
}

/// Binds every listener (a bind failure is a start-up error) and starts the actor tree.
pub async fn start(config: Config) -> Result<Gateway, String> {
    let config = Arc::new(config);
    let shared = Shared::new(Arc::clone(&config), Arc::new(Metrics::default()))
        .map_err(|e| e.to_string())?;
    let mut sockets = HashMap::new();
    let mut listen_addrs = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let name = config.listener_name(i);
        let socket = bind(&name, l.bind, &shared).await?;
        listen_addrs.push(socket.local_addr().map_err(|e| e.to_string())?);
        sockets.insert(name, socket);
    }
    let current = Arc::new(supervisor::Current::default());
    let supervisor = Supervisor::new(shared, sockets, Arc::clone(&current))
        .start()
        .await
        .map_err(|e| format!("supervisor did not start: {e}"))?;
    Ok(Gateway {
        supervisor,
        current,
        listen_addrs,
    })
}

impl Gateway {
    /// The config generation new sessions use.
    pub fn shared(&self) -> Option<Arc<Shared>> {
        self.current.get()
    }

    /// Applies a validated config (SIGHUP, `POST /reload`): new sessions use it at once, live
    /// sessions stay where they are, removed backends drain. Listeners whose `bind` changed
    /// (or that are new) are bound first: any error leaves the running config untouched.
    pub async fn reload(&self, config: Config) -> Result<(), String> {
        let cur = self.current.get().ok_or("gateway is not running")?;
        let next = cur.next(Arc::new(config)).map_err(|e| e.to_string())?;
        let mut sockets = HashMap::new();
        for (i, l) in next.config.listeners.iter().enumerate() {
            let name = next.config.listener_name(i);
            let unchanged = cur
                .listener_index(&name)
                .is_some_and(|j| cur.config.listeners[j].bind == l.bind);
            if !unchanged {
                sockets.insert(name.clone(), bind(&name, l.bind, &next).await?);
            }
        }
        let msg = messages::Reload {
            shared: next,
            sockets,
        };
        messages::trace(&"reload", &"supervisor", &msg);
        self.supervisor
            .call(msg)
            .await
            .map_err(|e| format!("supervisor did not answer: {e}"))
    }

    /// Graceful stop (SIGTERM/SIGINT): stop accepting, close every client with 1001, and wait
    /// up to `drain` for the closing handshakes. Returns the sessions still open at the end.
    pub async fn shutdown(&self, drain: Duration) -> u64 {
        messages::trace(&"shutdown", &"supervisor", &messages::StopAccepting);
        let _ = self.supervisor.call(messages::StopAccepting).await;
        let Some(shared) = self.current.get() else {
            return 0;
        };
        shared.draining.store(true, Relaxed);
        // The closing handshakes must end inside the drain, leaving time to log them.
        let within = relay::CLOSE_TIMEOUT.min(drain.mul_f64(0.75));
        let going_away = || relay::Control::Close {
            code: 1001,
            reason: "going away",
            within,
        };
        let n = shared.broadcast(going_away);
        log::info!(
            "shutdown: closing {n} sessions with 1001 (drain_ms {})",
            drain.as_millis()
        );
        let deadline = Instant::now() + drain;
        loop {
            let live = shared.metrics.sessions_active.load(Relaxed);
            if live == 0 || Instant::now() >= deadline {
                return live;
            }
            // Sessions that were mid-handshake at the broadcast see `draining` and close too.
            rt::sleep(Duration::from_millis(20)).await;
        }
    }
}
