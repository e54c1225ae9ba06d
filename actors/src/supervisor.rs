//! The root Supervisor actor: starts one Pool actor per pool, one Listener actor per listener
//! and the HealthChecker, watches them, and restarts any that fails (a panic included: the
//! runtime drops the failed actor's task, and its exit signal reaches the watcher).
//!
//! xactor's own `Supervisor` restarts at once, forever, and sees no panic; this one adds
//! what operators need: restarts are logged and counted (`wsgate_actor_restarts_total`),
//! and their intensity is limited by exponential backoff — 100 ms after a first failure,
//! doubling with each failure in the last 60 s, capped at 30 s — so a child that keeps
//! crashing cannot spin the CPU, while one that failed once is back almost at once.
//!
//! It owns the listening sockets (so a listener restart refuses no connection) and applies
//! reloads: a new config generation for new sessions, live sessions left where they are.

use crate::health_checker::HealthChecker;
use crate::listener::Listener;
use crate::messages::{
    trace, BackendLost, ChildExited, DrainExpired, Reload, RestartChild, SessionName, StopAccepting,
};
use crate::pool::{BackendState, Pool};
use crate::rt::{self, TcpListener};
use crate::shared::Shared;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};
use xactor::{Actor, Addr, Context, Handler};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const WINDOW: Duration = Duration::from_secs(60);

/// A child of the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChildId {
    Pool(String),
    Listener(String),
    HealthChecker,
}

impl fmt::Display for ChildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChildId::Pool(n) => write!(f, "pool:{n}"),
            ChildId::Listener(n) => write!(f, "listener:{n}"),
            ChildId::HealthChecker => f.write_str("health_checker"),
        }
    }
}

/// The config generation new sessions use; replaced by a reload.
#[derive(Default)]
pub struct Current(RwLock<Option<Arc<Shared>>>);

impl Current {
    pub fn get(&self) -> Option<Arc<Shared>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
    fn set(&self, s: Arc<Shared>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some(s);
    }
}

struct ChildState {
    generation: u64,
    failures: VecDeque<Instant>,
}

pub struct Supervisor {
    shared: Arc<Shared>,
    current: Arc<Current>,
    sockets: HashMap<String, Arc<TcpListener>>,
    children: HashMap<ChildId, ChildState>,
    /// Shutting down: listeners that stop are not restarted.
    stopping: bool,
}

impl Supervisor {
    pub fn new(
        shared: Arc<Shared>,
        sockets: HashMap<String, Arc<TcpListener>>,
        current: Arc<Current>,
    ) -> Supervisor {
        current.set(Arc::clone(&shared));
        Supervisor {
            shared,
            current,
            sockets,
            children: HashMap::new(),
            stopping: false,
        }
    }

    /// Starts (or restarts) a child and a watcher that reports its exit.
    async fn start_child(&mut self, ctx: &mut Context<Self>, id: ChildId) -> xactor::Result<()> {
        let state = self.children.entry(id.clone()).or_insert(ChildState {
            generation: 0,
            failures: VecDeque::new(),
        });
        state.generation += 1;
        let generation = state.generation;
        let sup = ctx.address();
        match &id {
            ChildId::Pool(name) => {
                let Some(handle) = self.shared.pools.get(name) else {
                    return Ok(());
                };
                let addr = Pool::new(Arc::clone(&handle.shared), Arc::clone(&self.shared.metrics))
                    .start()
                    .await?;
                handle.addr.set(Some(addr.clone()));
                watch(addr, sup, id, generation);
            }
            ChildId::Listener(name) => {
                let (Some(i), Some(socket)) =
                    (self.shared.listener_index(name), self.sockets.get(name))
                else {
                    return Ok(());
                };
                let addr = Listener::new(i, Arc::clone(socket), Arc::clone(&self.shared))
                    .start()
                    .await?;
                self.shared.listeners[i].addr.set(Some(addr.clone()));
                watch(addr, sup, id, generation);
            }
            ChildId::HealthChecker => {
                let addr = HealthChecker::new(Arc::clone(&self.shared)).start().await?;
                self.shared.health_checker.set(Some(addr.clone()));
                watch(addr, sup, id, generation);
            }
        }
        Ok(())
    }

    /// Stops a child on purpose: its exit is not a failure (the generation moves on first).
    fn stop_child(&mut self, id: &ChildId) {
        if let Some(state) = self.children.get_mut(id) {
            state.generation += 1;
        }
        match id {
            ChildId::Pool(name) => {
                if let Some(h) = self.shared.pools.get(name) {
                    stop(&h.addr);
                }
            }
            ChildId::Listener(name) => {
                if let Some(i) = self.shared.listener_index(name) {
                    stop(&self.shared.listeners[i].addr);
                }
            }
            ChildId::HealthChecker => stop(&self.shared.health_checker),
        }
    }

    /// Clears the address slot of a child that exited.
    fn clear_slot(&self, id: &ChildId) {
        match id {
            ChildId::Pool(n) => {
                if let Some(h) = self.shared.pools.get(n) {
                    h.addr.set(None);
                }
            }
            ChildId::Listener(n) => {
                if let Some(i) = self.shared.listener_index(n) {
                    self.shared.listeners[i].addr.set(None);
                }
            }
            ChildId::HealthChecker => self.shared.health_checker.set(None),
        }
    }
}

fn stop<A: Actor>(slot: &crate::shared::Slot<A>) {
    if let Some(mut addr) = slot.get() {
        let _ = addr.stop(None);
    }
    slot.set(None);
}

fn watch<A: Actor>(addr: Addr<A>, sup: Addr<Supervisor>, child: ChildId, generation: u64) {
    rt::spawn(async move {
        addr.wait_for_stop().await;
        let msg = ChildExited { child, generation };
        trace(&"watcher", &"supervisor", &msg);
        let _ = sup.send(msg);
    });
}

#[async_trait::async_trait]
impl Actor for Supervisor {
    async fn started(&mut self, ctx: &mut Context<Self>) -> xactor::Result<()> {
        let pools: Vec<String> = self.shared.pools.keys().cloned().collect();
        for name in pools {
            self.start_child(ctx, ChildId::Pool(name)).await?;
        }
        if HealthChecker::needed(&self.shared) {
            self.start_child(ctx, ChildId::HealthChecker).await?;
        }
        let listeners: Vec<String> = self
            .shared
            .listeners
            .iter()
            .map(|l| l.name.clone())
            .collect();
        for name in listeners {
            self.start_child(ctx, ChildId::Listener(name)).await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Handler<ChildExited> for Supervisor {
    async fn handle(&mut self, ctx: &mut Context<Self>, msg: ChildExited) {
        let Some(state) = self.children.get_mut(&msg.child) else {
            return;
        };
        if state.generation != msg.generation
            || (self.stopping && matches!(msg.child, ChildId::Listener(_)))
        {
            return; // an older incarnation, already replaced, or a child we stopped
        }
        let now = Instant::now();
        state.failures.retain(|t| now.duration_since(*t) < WINDOW);
        state.failures.push_back(now);
        let n = state.failures.len() as u32;
        self.clear_slot(&msg.child);
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (n - 1).min(16))
            .min(MAX_BACKOFF);
        let name = &msg.child;
        if backoff == MAX_BACKOFF {
            log::error!(
                "supervisor: {name} failed {n} times in {WINDOW:?}; restarting in {backoff:?}"
            );
        } else {
            log::warn!(
                "supervisor: {name} failed ({n} in the last {WINDOW:?}); restarting in {backoff:?}"
            );
        }
        let restart = RestartChild { child: msg.child };
        trace(&"supervisor", &"supervisor", &restart);
        ctx.send_later(restart, backoff);
    }
}

#[async_trait::async_trait]
impl Handler<RestartChild> for Supervisor {
    async fn handle(&mut self, ctx: &mut Context<Self>, msg: RestartChild) {
        let name = msg.child.to_string();
        match self.start_child(ctx, msg.child.clone()).await {
            Ok(()) => {
                self.shared
                    .metrics
                    .actor_restarts_total
                    .fetch_add(1, Relaxed);
                log::info!("supervisor: {name} restarted");
            }
            Err(e) => {
                log::error!("supervisor: {name} did not restart: {e}; trying again");
                ctx.send_later(RestartChild { child: msg.child }, MAX_BACKOFF);
            }
        }
    }
}

#[async_trait::async_trait]
impl Handler<StopAccepting> for Supervisor {
    async fn handle(&mut self, _ctx: &mut Context<Self>, _msg: StopAccepting) {
        self.stopping = true;
        let names: Vec<String> = self
            .shared
            .listeners
            .iter()
            .map(|l| l.name.clone())
            .collect();
        for name in names {
            self.stop_child(&ChildId::Listener(name));
        }
        // The listeners' own references go with them: the sockets close, new connects are refused.
        self.sockets.clear();
        log::info!("supervisor: stopped accepting");
    }
}

#[async_trait::async_trait]
impl Handler<Reload> for Supervisor {
    async fn handle(&mut self, ctx: &mut Context<Self>, msg: Reload) {
        if self.stopping {
            log::warn!("reload ignored: shutting down");
            return;
        }
        let old = std::mem::replace(&mut self.shared, msg.shared);
        // The old generation's actors: their exits from here on are not failures.
        let mut retiring: Vec<Box<dyn FnOnce() + Send>> = Vec::new();
        for p in old.pools.values() {
            if let Some(a) = p.addr.get() {
                retiring.push(Box::new(move || drop(a.clone().stop(None))));
            }
        }
        for l in &old.listeners {
            if let Some(a) = l.addr.get() {
                retiring.push(Box::new(move || drop(a.clone().stop(None))));
            }
        }
        if let Some(a) = old.health_checker.get() {
            retiring.push(Box::new(move || drop(a.clone().stop(None))));
        }
        for state in self.children.values_mut() {
            state.generation += 1;
        }
        // Listener sockets whose bind is unchanged are kept: no connection is refused.
        self.sockets
            .retain(|name, _| self.shared.listener_index(name).is_some());
        self.sockets.extend(msg.sockets);
        self.current.set(Arc::clone(&self.shared));

        // Start the new generation first (each start replaces its slot), then stop the old.
        let mut children: Vec<ChildId> = self
            .shared
            .pools
            .keys()
            .map(|n| ChildId::Pool(n.clone()))
            .collect();
        if HealthChecker::needed(&self.shared) {
            children.push(ChildId::HealthChecker);
        }
        children.extend(
            self.shared
                .listeners
                .iter()
                .map(|l| ChildId::Listener(l.name.clone())),
        );
        for id in children {
            if let Err(e) = self.start_child(ctx, id.clone()).await {
                log::error!("reload: {id} did not start: {e}; retrying");
                ctx.send_later(RestartChild { child: id }, FIRST_BACKOFF);
            }
        }
        for stop_old in retiring {
            stop_old();
        }
        // Slots of pools, listeners or a checker that no longer exist.
        for p in old
            .pools
            .keys()
            .filter(|n| !self.shared.pools.contains_key(*n))
        {
            if let Some(h) = old.pools.get(p) {
                h.addr.set(None);
            }
        }
        if !HealthChecker::needed(&self.shared) {
            self.shared.health_checker.set(None);
        }

        // Backends no pool lists any more drain: no new sessions; the live ones keep running
        // until they end or drain_ms passes, then go through on_backend_loss.
        let kept: Vec<*const BackendState> = self
            .shared
            .pools
            .values()
            .flat_map(|p| p.shared.backends.iter().map(Arc::as_ptr))
            .collect();
        let removed: Vec<Arc<BackendState>> = old
            .pools
            .values()
            .flat_map(|p| p.shared.backends.iter())
            .filter(|b| !kept.contains(&Arc::as_ptr(b)))
            .cloned()
            .collect();
        let draining: usize = removed.iter().map(|b| b.active()).sum();
        log::info!(
            "reload applied: {} pools, {} listeners; {} backends removed ({draining} live sessions draining for {} ms)",
            self.shared.pools.len(),
            self.shared.listeners.len(),
            removed.len(),
            self.shared.config.timeouts.drain_ms
        );
        if !removed.is_empty() {
            let msg = DrainExpired { backends: removed };
            trace(&"supervisor", &"supervisor", &msg);
            ctx.send_later(msg, self.shared.config.timeouts.drain());
        }
    }
}

#[async_trait::async_trait]
impl Handler<DrainExpired> for Supervisor {
    async fn handle(&mut self, _ctx: &mut Context<Self>, msg: DrainExpired) {
        for b in &msg.backends {
            for (id, weak) in b.sessions_snapshot() {
                if let Some(addr) = weak.upgrade() {
                    let lost = BackendLost {
                        backend: b.addr,
                        reason: "removed by reload; drain_ms passed".into(),
                    };
                    trace(&"supervisor", &SessionName(id), &lost);
                    let _ = addr.send(lost);
                }
            }
        }
    }
}
