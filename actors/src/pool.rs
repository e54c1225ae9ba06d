//! The Pool actor: one per upstream pool. It picks backends for new sessions (through the
//! pure [`Balancer`]), tracks their liveness (passive failures reported by sessions, active
//! verdicts from the health checker) and tells live sessions when their backend goes down.
//!
//! The per-backend facts that must survive a restart of this actor (live-session counts,
//! up/down, which sessions sit on it) live in [`PoolShared`], owned by the supervisor, the way
//! an Erlang supervisor keeps an ETS table alive across child restarts. Sessions hold a
//! [`Lease`] whose drop releases their count: a crashed session or pool cannot leak one.

use crate::balance::{BackendView, Balancer};
use crate::config::PoolConfig;
use crate::messages::{
    trace, BackendFailed, BackendLost, Fault, HealthReport, PickBackends, Picked, PoolName, Revive,
    SessionId,
};
use crate::metrics::Metrics;
use crate::session::Session;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use xactor::{Actor, Context, Handler, WeakAddr};

/// One backend of a pool, shared by the pool actor and the sessions on it.
pub struct BackendState {
    pub addr: SocketAddr,
    pub weight: u32,
    /// Set for `wss://` backends.
    pub tls: Option<crate::transport::BackendTls>,
    active: AtomicUsize,
    up: AtomicBool,
    sessions: Mutex<HashMap<SessionId, WeakAddr<Session>>>,
}

impl std::fmt::Debug for BackendState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (weight {}, {} live, {})",
            self.addr,
            self.weight,
            self.active(),
            if self.is_up() { "up" } else { "down" }
        )
    }
}

impl BackendState {
    fn new(addr: SocketAddr, weight: u32, tls: Option<crate::transport::BackendTls>) -> Self {
        BackendState {
            addr,
            weight,
            tls,
            active: AtomicUsize::new(0),
            up: AtomicBool::new(true),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Live sessions (including those in their handshake) on this backend.
    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// The sessions on this backend now.
    pub fn sessions_snapshot(&self) -> Vec<(SessionId, WeakAddr<Session>)> {
        self.sessions()
            .iter()
            .map(|(id, a)| (*id, a.clone()))
            .collect()
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, WeakAddr<Session>>> {
        // A panic while holding this lock leaves a plain map: still consistent.
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A session's claim on a backend: counted in `active` until dropped.
#[derive(Debug)]
pub struct Lease {
    backend: Arc<BackendState>,
    attached: Option<SessionId>,
}

impl Lease {
    fn new(backend: Arc<BackendState>) -> Lease {
        backend.active.fetch_add(1, Relaxed);
        Lease {
            backend,
            attached: None,
        }
    }

    pub fn backend(&self) -> &Arc<BackendState> {
        &self.backend
    }

    /// Moves the claim to another backend (a failed connect attempt, or a failover).
    pub fn switch_to(&mut self, backend: Arc<BackendState>) {
        let attached = self.detach();
        *self = Lease::new(backend);
        self.attached = attached.and(None);
    }

    /// Registers the session so the pool can tell it when this backend goes down.
    pub fn attach(&mut self, session: SessionId, addr: WeakAddr<Session>) {
        self.backend.sessions().insert(session, addr);
        self.attached = Some(session);
    }

    fn detach(&mut self) -> Option<SessionId> {
        let id = self.attached.take();
        if let Some(id) = id {
            self.backend.sessions().remove(&id);
        }
        id
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.detach();
        self.backend.active.fetch_sub(1, Relaxed);
    }
}

/// A pool's backends and config, kept by the supervisor across restarts of the Pool actor.
#[derive(Debug)]
pub struct PoolShared {
    pub name: String,
    pub config: PoolConfig,
    pub backends: Vec<Arc<BackendState>>,
}

impl PoolShared {
    /// Builds the pool's backends; `base` resolves `ca` paths. Errors name the field. With
    /// `prev` (a reload), a backend whose entry is unchanged keeps its state.
    pub fn new(
        name: &str,
        config: &PoolConfig,
        base: &crate::config::Config,
        prev: Option<&PoolShared>,
    ) -> Result<Arc<PoolShared>, crate::config::ConfigError> {
        let mut backends = Vec::with_capacity(config.backends.len());
        for (i, b) in config.backends.iter().enumerate() {
            let same = prev.and_then(|p| {
                p.config
                    .backends
                    .iter()
                    .position(|o| o == b)
                    .and_then(|j| p.backends.get(j))
            });
            if let Some(same) = same {
                backends.push(Arc::clone(same));
                continue;
            }
            let tls = if b.tls {
                let ca = b.ca.as_ref().map(|p| base.resolve(p));
                let t = crate::transport::client_tls(
                    b.address,
                    ca.as_deref(),
                    b.server_name.as_deref(),
                )
                .map_err(|e| {
                    crate::config::ConfigError::new(format!("pools.{name}.backends[{i}].tls"), e)
                })?;
                Some(t)
            } else {
                None
            };
            backends.push(Arc::new(BackendState::new(b.address, b.weight, tls)));
        }
        Ok(Arc::new(PoolShared {
            name: name.to_string(),
            config: config.clone(),
            backends,
        }))
    }
}

/// The Pool actor.
pub struct Pool {
    shared: Arc<PoolShared>,
    balancer: Balancer,
    /// Recent passive failures per backend (their times), for `max_fails` within the window.
    failures: Vec<Vec<Instant>>,
    /// Bumped when a backend changes state, so a stale `Revive` is ignored.
    epochs: Vec<u64>,
    /// What the balancer sees of each backend, refilled at every pick (kept: no allocation
    /// per session).
    views: Vec<BackendView>,
    #[allow(dead_code)]
    metrics: Arc<Metrics>,
}

impl Pool {
    pub fn new(shared: Arc<PoolShared>, metrics: Arc<Metrics>) -> Pool {
        let list: Vec<(SocketAddr, u32)> =
            shared.backends.iter().map(|b| (b.addr, b.weight)).collect();
        let n = list.len();
        Pool {
            balancer: Balancer::new(shared.config.balance, &list),
            shared,
            failures: vec![Vec::new(); n],
            epochs: vec![0; n],
            views: Vec::with_capacity(n),
            metrics,
        }
    }

    fn name(&self) -> PoolName<'_> {
        PoolName(&self.shared.name)
    }

    fn fail_timeout(&self) -> Duration {
        Duration::from_millis(self.shared.config.passive.fail_timeout_ms)
    }

    /// Marks a backend down; with `notify`, tells every session on it.
    fn mark_down(&mut self, ctx: &mut Context<Self>, i: usize, cause: &str, notify: bool) {
        let b = &self.shared.backends[i];
        if !b.up.swap(false, Relaxed) {
            return;
        }
        self.epochs[i] += 1;
        log::warn!(
            "backend {} in pool {} is DOWN: {cause}",
            b.addr,
            self.shared.name
        );
        if notify {
            for (id, weak) in b.sessions_snapshot() {
                if let Some(addr) = weak.upgrade() {
                    let msg = BackendLost {
                        backend: b.addr,
                        reason: cause.to_string(),
                    };
                    trace(&self.name(), &crate::messages::SessionName(id), &msg);
                    let _ = addr.send(msg);
                }
            }
        }
        if self.shared.config.health_check.is_none() {
            // Passive only: try it again after fail_timeout (nginx semantics).
            let revive = Revive {
                backend: i,
                epoch: self.epochs[i],
            };
            trace(&self.name(), &self.name(), &revive);
            ctx.send_later(revive, self.fail_timeout());
        }
    }

    fn mark_up(&mut self, i: usize, cause: &str) {
        let b = &self.shared.backends[i];
        if b.up.swap(true, Relaxed) {
            return;
        }
        self.epochs[i] += 1;
        self.failures[i].clear();
        log::info!(
            "backend {} in pool {} is UP: {cause}",
            b.addr,
            self.shared.name
        );
    }
}

#[async_trait::async_trait]
impl Actor for Pool {
    async fn started(&mut self, ctx: &mut Context<Self>) -> xactor::Result<()> {
        // After a restart, passively ejected backends still need their retry timer.
        if self.shared.config.health_check.is_none() {
            for (i, b) in self.shared.backends.iter().enumerate() {
                if !b.is_up() {
                    ctx.send_later(
                        Revive {
                            backend: i,
                            epoch: self.epochs[i],
                        },
                        self.fail_timeout(),
                    );
                }
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Handler<PickBackends> for Pool {
    async fn handle(&mut self, _ctx: &mut Context<Self>, msg: PickBackends) -> Picked {
        self.views.clear();
        self.views
            .extend(self.shared.backends.iter().map(|b| BackendView {
                addr: b.addr,
                weight: b.weight,
                active: b.active(),
                up: b.is_up() && !msg.exclude.contains(&b.addr),
            }));
        let max = (self.shared.config.connect_attempts as usize).min(self.views.len());
        let order = self.balancer.order(&self.views, msg.client_ip, max);
        let candidates: Vec<Arc<BackendState>> = order
            .iter()
            .map(|&i| Arc::clone(&self.shared.backends[i]))
            .collect();
        let lease = candidates.first().map(|b| Lease::new(Arc::clone(b)));
        Picked { candidates, lease }
    }
}

#[async_trait::async_trait]
impl Handler<BackendFailed> for Pool {
    async fn handle(&mut self, ctx: &mut Context<Self>, msg: BackendFailed) {
        let passive = self.shared.config.passive;
        let Some(i) = self
            .shared
            .backends
            .iter()
            .position(|b| b.addr == msg.backend)
        else {
            return;
        };
        if passive.max_fails == 0 {
            return;
        }
        let now = Instant::now();
        let window = self.fail_timeout();
        let f = &mut self.failures[i];
        f.retain(|t| now.duration_since(*t) < window);
        f.push(now);
        if f.len() >= passive.max_fails as usize {
            f.clear();
            let cause = format!("{} failed connects: {}", passive.max_fails, msg.reason);
            // Passive failures are about new connects: sessions already on it are left alone.
            self.mark_down(ctx, i, &cause, false);
        }
    }
}

#[async_trait::async_trait]
impl Handler<Revive> for Pool {
    async fn handle(&mut self, _ctx: &mut Context<Self>, msg: Revive) {
        if self.epochs.get(msg.backend) == Some(&msg.epoch) {
            self.mark_up(msg.backend, "fail_timeout passed, trying it again");
        }
    }
}

#[async_trait::async_trait]
impl Handler<Fault> for Pool {
    async fn handle(&mut self, _ctx: &mut Context<Self>, _msg: Fault) {
        panic!("fault injection: pool {} crashes", self.shared.name);
    }
}

#[async_trait::async_trait]
impl Handler<HealthReport> for Pool {
    async fn handle(&mut self, ctx: &mut Context<Self>, msg: HealthReport) {
        if msg.backend >= self.shared.backends.len() {
            return;
        }
        if msg.up {
            self.mark_up(msg.backend, &msg.cause);
        } else {
            // An active verdict: sessions whose socket may hang silently are told at once.
            self.mark_down(ctx, msg.backend, &msg.cause, true);
        }
    }
}
