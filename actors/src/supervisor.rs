//! The root Supervisor actor: starts one Pool actor per pool and one Listener actor per
//! listener, watches them, and restarts any that fails (a panic included: the runtime drops
//! the failed actor's task, and its exit signal reaches the watcher).
//!
//! xactor's own `Supervisor` restarts at once, forever, and sees no panic; this one adds
//! what operators need: restarts are logged and counted (`wsgate_actor_restarts_total`),
//! and their intensity is limited by exponential backoff — 100 ms after a first failure,
//! doubling with each failure in the last 60 s, capped at 30 s — so a child that keeps
//! crashing cannot spin the CPU, while one that failed once is back almost at once.

use crate::health_checker::HealthChecker;
use crate::listener::Listener;
use crate::messages::{trace, ChildExited, RestartChild, StopAccepting};
use crate::pool::Pool;
use crate::rt::{self, TcpListener};
use crate::shared::Shared;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use xactor::{Actor, Addr, Context, Handler};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const WINDOW: Duration = Duration::from_secs(60);

/// A child of the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChildId {
    Pool(String),
    Listener(usize),
    HealthChecker,
}

struct ChildState {
    generation: u64,
    failures: VecDeque<Instant>,
}

pub struct Supervisor {
    shared: Arc<Shared>,
    sockets: Vec<Arc<TcpListener>>,
    children: HashMap<ChildId, ChildState>,
    /// Shutting down: listeners that stop are not restarted.
    stopping: bool,
}

impl Supervisor {
    pub fn new(shared: Arc<Shared>, sockets: Vec<Arc<TcpListener>>) -> Supervisor {
        Supervisor {
            shared,
            sockets,
            children: HashMap::new(),
            stopping: false,
        }
    }

    fn child_name(&self, id: &ChildId) -> String {
        match id {
            ChildId::Pool(name) => format!("pool:{name}"),
            ChildId::Listener(i) => format!("listener:{}", self.shared.listeners[*i].name),
            ChildId::HealthChecker => "health_checker".into(),
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
            ChildId::Listener(i) => {
                let socket = Arc::clone(&self.sockets[*i]);
                let addr = Listener::new(*i, socket, Arc::clone(&self.shared))
                    .start()
                    .await?;
                self.shared.listeners[*i].addr.set(Some(addr.clone()));
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
}

fn watch<A: Actor>(addr: Addr<A>, sup: Addr<Supervisor>, child: ChildId, generation: u64) {
    rt::spawn(async move {
        addr.wait_for_stop().await;
        let msg = ChildExited { child, generation };
        trace(&"watcher", &"supervisor", &msg);
        let _ = sup.send(msg);
    });
}

impl fmt::Display for ChildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChildId::Pool(n) => write!(f, "pool:{n}"),
            ChildId::Listener(i) => write!(f, "listener#{i}"),
            ChildId::HealthChecker => f.write_str("health_checker"),
        }
    }
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
        for i in 0..self.sockets.len() {
            self.start_child(ctx, ChildId::Listener(i)).await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Handler<ChildExited> for Supervisor {
    async fn handle(&mut self, ctx: &mut Context<Self>, msg: ChildExited) {
        let name = self.child_name(&msg.child);
        let Some(state) = self.children.get_mut(&msg.child) else {
            return;
        };
        if state.generation != msg.generation
            || (self.stopping && matches!(msg.child, ChildId::Listener(_)))
        {
            return; // an older incarnation, already replaced, or a listener we stopped
        }
        match &msg.child {
            ChildId::Pool(n) => {
                if let Some(h) = self.shared.pools.get(n) {
                    h.addr.set(None);
                }
            }
            ChildId::Listener(i) => self.shared.listeners[*i].addr.set(None),
            ChildId::HealthChecker => self.shared.health_checker.set(None),
        }
        let now = Instant::now();
        state.failures.retain(|t| now.duration_since(*t) < WINDOW);
        state.failures.push_back(now);
        let n = state.failures.len() as u32;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (n - 1).min(16))
            .min(MAX_BACKOFF);
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
        let name = self.child_name(&msg.child);
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
        for l in &self.shared.listeners {
            if let Some(mut addr) = l.addr.get() {
                let _ = addr.stop(None);
            }
            l.addr.set(None);
        }
        // The listeners' own references go with them: the sockets close, new connects are refused.
        self.sockets.clear();
        log::info!("supervisor: stopped accepting");
    }
}
