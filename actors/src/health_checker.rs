//! The HealthChecker actor: active checks for every pool that configures `health_check`.
//!
//! Each backend gets its own check loop (a task the actor owns and aborts when it stops or
//! fails), so a backend that accepts TCP and then hangs costs its own check `timeout_ms` and
//! delays no other check. A loop counts consecutive results and sends one `HealthReport` to
//! the Pool actor per transition: DOWN after `unhealthy_after` failures in a row, UP after
//! `healthy_after` passes. It reads the pool's current verdict before each check, so a passive
//! ejection by the pool is honoured: only `healthy_after` passing checks bring it back.

use crate::config::{HealthCheckConfig, HealthKind};
use crate::handshake::read_response_head;
use crate::messages::{trace, Fault, HealthReport, PoolName};
use crate::pool::BackendState;
use crate::rt;
use crate::shared::Shared;
use async_tungstenite::tungstenite::Message;
use futures::future::{AbortHandle, Abortable};
use futures::{AsyncWriteExt, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xactor::{Actor, Context, Handler};

const PING_PAYLOAD: &[u8] = b"wsgate-health";

pub struct HealthChecker {
    shared: Arc<Shared>,
    loops: Vec<AbortHandle>,
}

impl HealthChecker {
    pub fn new(shared: Arc<Shared>) -> HealthChecker {
        HealthChecker {
            shared,
            loops: Vec::new(),
        }
    }

    /// Whether any pool has active checks (the supervisor starts this actor only then).
    pub fn needed(shared: &Shared) -> bool {
        shared
            .config
            .pools
            .values()
            .any(|p| p.health_check.is_some())
    }

    fn abort_all(&mut self) {
        for h in self.loops.drain(..) {
            h.abort();
        }
    }
}

impl Drop for HealthChecker {
    /// Also runs when the actor's task unwinds from a panic: its check loops die with it.
    fn drop(&mut self) {
        self.abort_all();
    }
}

#[async_trait::async_trait]
impl Actor for HealthChecker {
    async fn started(&mut self, _ctx: &mut Context<Self>) -> xactor::Result<()> {
        for (name, pool) in &self.shared.pools {
            let Some(hc) = pool.shared.config.health_check.clone() else {
                continue;
            };
            for (i, b) in pool.shared.backends.iter().enumerate() {
                let (handle, reg) = AbortHandle::new_pair();
                self.loops.push(handle);
                let job = check_loop(
                    Arc::clone(&self.shared),
                    name.clone(),
                    i,
                    Arc::clone(b),
                    hc.clone(),
                );
                rt::spawn(Abortable::new(job, reg));
            }
        }
        Ok(())
    }

    async fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.abort_all();
    }
}

#[async_trait::async_trait]
impl Handler<Fault> for HealthChecker {
    async fn handle(&mut self, _ctx: &mut Context<Self>, _msg: Fault) {
        panic!("fault injection: health checker crashes");
    }
}

async fn check_loop(
    shared: Arc<Shared>,
    pool: String,
    index: usize,
    backend: Arc<BackendState>,
    hc: HealthCheckConfig,
) {
    let interval = Duration::from_millis(hc.interval_ms);
    let timeout = Duration::from_millis(hc.timeout_ms);
    let (mut passes, mut fails) = (0u32, 0u32);
    // Spread the first checks over one interval so pools do not check in lockstep.
    rt::sleep(interval.mul_f64(fastrand::f64())).await;
    loop {
        let started = Instant::now();
        let result = check(hc.kind, &backend, &hc.path, timeout).await;
        let up_now = backend.is_up();
        let verdict = match result {
            Ok(()) => {
                passes += 1;
                fails = 0;
                (!up_now && passes >= hc.healthy_after)
                    .then(|| (true, format!("{} checks passed", passes)))
            }
            Err(why) => {
                fails += 1;
                passes = 0;
                (up_now && fails >= hc.unhealthy_after).then_some((false, why))
            }
        };
        if let Some((up, cause)) = verdict {
            let report = HealthReport {
                backend: index,
                up,
                cause,
            };
            trace(&"health_checker", &PoolName(&pool), &report);
            match shared.pools.get(&pool).and_then(|p| p.addr.get()) {
                Some(addr) => {
                    let _ = addr.send(report);
                }
                None => log::warn!(
                    "health_checker: pool {pool} is restarting; report dropped, will repeat"
                ),
            }
            passes = 0;
            fails = 0;
        }
        // Interval ±10% jitter, measured from the start of this check.
        let jittered = interval.mul_f64(0.9 + 0.2 * fastrand::f64());
        rt::sleep(jittered.saturating_sub(started.elapsed())).await;
    }
}

/// One check of one backend, bounded by `timeout`. `Err` names the cause for the log.
async fn check(
    kind: HealthKind,
    backend: &BackendState,
    path: &str,
    timeout: Duration,
) -> Result<(), String> {
    let addr = backend.addr;
    let run = async {
        // The same transport sessions use: TLS for `wss://` backends.
        let mut tcp = crate::transport::dial(addr, backend.tls.as_ref(), timeout)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        match kind {
            HealthKind::Tcp => Ok(()),
            HealthKind::Http => {
                let req = format!(
                    "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: wsgate-health\r\nConnection: close\r\n\r\n"
                );
                tcp.write_all(req.as_bytes())
                    .await
                    .map_err(|e| format!("http: {e}"))?;
                let mut buf = Vec::with_capacity(512);
                let (resp, _) = read_response_head(&mut tcp, &mut buf)
                    .await
                    .map_err(|e| format!("http: {e}"))?;
                if (200..400).contains(&resp.status) {
                    Ok(())
                } else {
                    Err(format!("http: status {}", resp.status))
                }
            }
            HealthKind::Websocket => {
                let url = format!("ws://{addr}{path}");
                let (mut ws, _) = async_tungstenite::client_async(url, tcp)
                    .await
                    .map_err(|e| format!("websocket upgrade: {e}"))?;
                ws.send(Message::Ping(PING_PAYLOAD.into()))
                    .await
                    .map_err(|e| format!("websocket ping: {e}"))?;
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Pong(p))) if p.as_ref() == PING_PAYLOAD => break,
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(format!("websocket: {e}")),
                        None => return Err("websocket: closed before the pong".into()),
                    }
                }
                let _ = ws.close(None).await;
                Ok(())
            }
        }
    };
    match rt::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer within timeout_ms ({} ms)",
            timeout.as_millis()
        )),
    }
}
