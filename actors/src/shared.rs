//! What the supervisor keeps for the whole tree and hands to its children: the config, the
//! metrics, each pool's shared state and the current address of every restartable actor, and
//! the session limits. Read on the handshake path only; nothing here is touched per message.

use crate::config::Config;
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::pool::{Pool, PoolShared};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use xactor::Addr;

/// The current address of a supervised actor; replaced when the supervisor restarts it.
pub struct Slot<A: xactor::Actor>(RwLock<Option<Addr<A>>>);

impl<A: xactor::Actor> Default for Slot<A> {
    fn default() -> Self {
        Slot(RwLock::new(None))
    }
}

impl<A: xactor::Actor> Slot<A> {
    pub fn get(&self) -> Option<Addr<A>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
    pub fn set(&self, addr: Option<Addr<A>>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = addr;
    }
}

/// A pool in one config generation. The actor slot is shared by every generation that has a
/// pool of this name, so sessions from before a reload reach the current Pool actor.
pub struct PoolHandle {
    pub shared: Arc<PoolShared>,
    pub addr: Arc<Slot<Pool>>,
}

/// A listener in one config generation (actor slot shared by name across generations).
pub struct ListenerHandle {
    pub name: String,
    pub addr: Arc<Slot<Listener>>,
    /// Set for `wss://` listeners.
    pub tls: Option<futures_rustls::TlsAcceptor>,
}

pub struct Shared {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub pools: BTreeMap<String, PoolHandle>,
    pub listeners: Vec<ListenerHandle>,
    pub health_checker: Arc<Slot<crate::health_checker::HealthChecker>>,
    /// Per-IP session counts: one table for every generation (live sessions count across reloads).
    per_ip: Arc<Mutex<HashMap<IpAddr, u64>>>,
    /// Set at shutdown: sessions finishing their handshake close at once with 1001.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// The address each listener is really bound to (port 0 resolved), by name.
    bound: Arc<Mutex<HashMap<String, std::net::SocketAddr>>>,
    /// Every backend any generation had, so shutdown reaches sessions on removed ones too.
    all_backends: Arc<Mutex<Vec<std::sync::Weak<crate::pool::BackendState>>>>,
}

impl Shared {
    /// Builds the tree's shared state, loading TLS material; errors name the config field.
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Shared>, crate::config::ConfigError> {
        Shared::build(config, metrics, None)
    }

    /// The next generation for a reloaded config: backends whose entry is unchanged keep
    /// their state (live counts, health, sessions), actor slots and per-IP counts carry over.
    pub fn next(&self, config: Arc<Config>) -> Result<Arc<Shared>, crate::config::ConfigError> {
        Shared::build(config, Arc::clone(&self.metrics), Some(self))
    }

    fn build(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        prev: Option<&Shared>,
    ) -> Result<Arc<Shared>, crate::config::ConfigError> {
        let mut pools = BTreeMap::new();
        for (name, p) in &config.pools {
            let old = prev.and_then(|s| s.pools.get(name));
            let shared = PoolShared::new(name, p, &config, old.map(|h| &*h.shared))?;
            let addr = old.map(|h| Arc::clone(&h.addr)).unwrap_or_default();
            pools.insert(name.clone(), PoolHandle { shared, addr });
        }
        let mut listeners = Vec::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let tls = match &l.tls {
                Some(t) => Some(
                    crate::transport::server_tls(&config.resolve(&t.cert), &config.resolve(&t.key))
                        .map_err(|e| {
                            crate::config::ConfigError::new(format!("listeners[{i}].tls"), e)
                        })?,
                ),
                None => None,
            };
            let name = config.listener_name(i);
            let old = prev.and_then(|s| s.listeners.iter().find(|h| h.name == name));
            let addr = old.map(|h| Arc::clone(&h.addr)).unwrap_or_default();
            listeners.push(ListenerHandle { name, addr, tls });
        }
        let all_backends: Arc<Mutex<Vec<std::sync::Weak<crate::pool::BackendState>>>> = prev
            .map(|s| Arc::clone(&s.all_backends))
            .unwrap_or_default();
        {
            let mut all = all_backends.lock().unwrap_or_else(PoisonError::into_inner);
            all.retain(|w| w.strong_count() > 0);
            for b in pools.values().flat_map(|p| p.shared.backends.iter()) {
                if !all.iter().any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(b))) {
                    all.push(Arc::downgrade(b));
                }
            }
        }
        Ok(Arc::new(Shared {
            config,
            metrics,
            pools,
            listeners,
            health_checker: prev
                .map(|s| Arc::clone(&s.health_checker))
                .unwrap_or_default(),
            per_ip: prev.map(|s| Arc::clone(&s.per_ip)).unwrap_or_default(),
            draining: prev.map(|s| Arc::clone(&s.draining)).unwrap_or_default(),
            bound: prev.map(|s| Arc::clone(&s.bound)).unwrap_or_default(),
            all_backends,
        }))
    }

    /// Records where a listener's socket is bound (shown by `/status`).
    pub fn set_bound(&self, name: &str, addr: std::net::SocketAddr) {
        self.bound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), addr);
    }

    /// The listener's index in this generation.
    pub fn listener_index(&self, name: &str) -> Option<usize> {
        self.listeners.iter().position(|l| l.name == name)
    }

    /// Claims a session slot under `limits`, or `None` (→ 503).
    pub fn acquire_slot(self: &Arc<Self>, ip: IpAddr) -> Option<SessionSlot> {
        let limits = self.config.limits;
        let active = self.metrics.sessions_active.fetch_add(1, Relaxed);
        let mut slot = SessionSlot {
            shared: Arc::clone(self),
            ip: None,
        };
        if active >= limits.max_sessions {
            return None; // the drop gives the count back
        }
        if limits.max_sessions_per_ip > 0 {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= limits.max_sessions_per_ip {
                return None;
            }
            *n += 1;
            slot.ip = Some(ip);
        }
        Some(slot)
    }
}

/// A claimed session slot; dropping it gives the slot back.
pub struct SessionSlot {
    shared: Arc<Shared>,
    ip: Option<IpAddr>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.shared.metrics.sessions_active.fetch_sub(1, Relaxed);
        if let Some(ip) = self.ip {
            let mut per_ip = self
                .shared
                .per_ip
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

impl Shared {
    /// The Prometheus text exposition of every series (SPEC §6).
    pub fn prometheus(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(4096);
        self.metrics.render(&mut out);
        let _ = writeln!(out, "# HELP wsgate_backend_up Whether the backend takes new sessions.\n# TYPE wsgate_backend_up gauge");
        for (name, p) in &self.pools {
            for b in &p.shared.backends {
                let _ = writeln!(
                    out,
                    "wsgate_backend_up{{pool=\"{name}\",backend=\"{}\"}} {}",
                    b.addr,
                    u8::from(b.is_up())
                );
            }
        }
        let _ = writeln!(out, "# HELP wsgate_backend_sessions Live sessions on the backend.\n# TYPE wsgate_backend_sessions gauge");
        for (name, p) in &self.pools {
            for b in &p.shared.backends {
                let _ = writeln!(
                    out,
                    "wsgate_backend_sessions{{pool=\"{name}\",backend=\"{}\"}} {}",
                    b.addr,
                    b.active()
                );
            }
        }
        out
    }

    /// Pools, backends with health and live sessions, and listeners, as JSON.
    pub fn status(&self) -> serde_json::Value {
        let pools: serde_json::Map<String, serde_json::Value> = self
            .pools
            .iter()
            .map(|(name, p)| {
                let backends: Vec<serde_json::Value> = p
                    .shared
                    .backends
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "address": b.addr.to_string(),
                            "weight": b.weight,
                            "health": if b.is_up() { "up" } else { "down" },
                            "sessions": b.active(),
                        })
                    })
                    .collect();
                let v = serde_json::json!({
                    "balance": p.shared.config.balance,
                    "actor": if p.addr.get().is_some() { "running" } else { "restarting" },
                    "backends": backends,
                });
                (name.clone(), v)
            })
            .collect();
        let listeners: Vec<serde_json::Value> = self
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                serde_json::json!({
                    "name": l.name,
                    "bind": self.config.listeners[i].bind.to_string(),
                    "bound": self.bound.lock().unwrap_or_else(PoisonError::into_inner).get(&l.name).map(ToString::to_string),
                    "actor": if l.addr.get().is_some() { "running" } else { "restarting" },
                })
            })
            .collect();
        serde_json::json!({
            "sessions_active": self.metrics.sessions_active.load(Relaxed),
            "sessions_total": self.metrics.sessions_total.load(Relaxed),
            "pools": pools,
            "listeners": listeners,
        })
    }
}

impl Shared {
    /// Sends a control event to every established session (drain, shutdown).
    pub fn broadcast(&self, make: impl Fn() -> crate::relay::Control) -> usize {
        let mut n = 0;
        let backends: Vec<Arc<crate::pool::BackendState>> = {
            let all = self
                .all_backends
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            all.iter().filter_map(std::sync::Weak::upgrade).collect()
        };
        {
            for b in &backends {
                for (id, addr) in b.sessions_snapshot() {
                    if let Some(addr) = addr.upgrade() {
                        let msg = crate::messages::SessionControl(make());
                        crate::messages::trace(
                            &"supervisor",
                            &crate::messages::SessionName(id),
                            &msg,
                        );
                        if addr.send(msg).is_ok() {
                            n += 1;
                        }
                    }
                }
            }
        }
        n
    }
}
