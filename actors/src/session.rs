//! The Session actor: one per client connection. The actor is the session's control plane
//! (it hears `BackendLost` from its pool and `SessionControl` from the supervisor); the
//! session's task is its data plane: handshake, backend dial walk, then the relay loop.
//!
//! The task runs under `catch_unwind`: a panic anywhere in it ends this session alone with
//! close 1011 (or HTTP 500 before the upgrade), is logged and counted, and leaks nothing:
//! the session slot and backend lease are released by their drops.

use crate::config::{Config, OnBackendLoss, RelayMode};
use crate::handshake::{
    self, ClientInfo, HeadError, RequestHead, ResponseHead, UpgradeProblem, Upgraded,
};
use crate::http_forward;
use crate::messages::{
    trace, BackendFailed, BackendLost, PickBackends, PoolName, SessionControl, SessionId,
    SessionName,
};
use crate::metrics::HandshakeFailure;
use crate::pool::{BackendState, Lease};
use crate::relay::{self, Closing, Control, Counters, Fault, Outcome, RelayState, Side, Timing};
use crate::rt;
use crate::shared::{SessionSlot, Shared};
use crate::transport::{self, BackendStream, ClientStream};
use crate::tunnel::{self, TunnelCounts, TunnelEnd};
use crate::wire::ClosePayload;
use futures::channel::mpsc;
use futures::FutureExt;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;
use xactor::{Actor, Addr, Context, Handler};

/// What a new session starts from: the accepted connection and where it came in.
pub struct SessionStart {
    pub stream: rt::TcpStream,
    pub peer: SocketAddr,
    pub listener: usize,
    pub shared: Arc<Shared>,
}

pub struct Session {
    id: SessionId,
    start: Option<SessionStart>,
    control: Option<mpsc::UnboundedSender<Control>>,
    shared: Arc<Shared>,
}

impl Session {
    pub fn new(id: SessionId, start: SessionStart) -> Session {
        Session {
            id,
            shared: Arc::clone(&start.shared),
            start: Some(start),
            control: None,
        }
    }

    fn forward(&self, c: Control) {
        if let Some(tx) = &self.control {
            let _ = tx.unbounded_send(c);
        }
    }
}

#[async_trait::async_trait]
impl Actor for Session {
    async fn started(&mut self, ctx: &mut Context<Self>) -> xactor::Result<()> {
        self.shared.metrics.session_actors.fetch_add(1, Relaxed);
        let (tx, rx) = mpsc::unbounded();
        self.control = Some(tx);
        if let Some(start) = self.start.take() {
            rt::spawn(run(self.id, ctx.address(), start, rx));
        }
        Ok(())
    }

    /// Runs once the session task has dropped the actor's last address (its mailbox closed).
    async fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.shared.metrics.session_actors.fetch_sub(1, Relaxed);
    }
}

#[async_trait::async_trait]
impl Handler<BackendLost> for Session {
    async fn handle(&mut self, _ctx: &mut Context<Self>, msg: BackendLost) {
        self.forward(Control::BackendDown(msg.backend, msg.reason));
    }
}

#[async_trait::async_trait]
impl Handler<SessionControl> for Session {
    async fn handle(&mut self, _ctx: &mut Context<Self>, msg: SessionControl) {
        self.forward(msg.0);
    }
}

/// Who ended a session, for the access line.
#[derive(Debug, Clone, Copy)]
enum ClosedBy {
    Client,
    Backend,
    Gateway,
}

/// The session task's state, owned outside the `catch_unwind` so a panic can still be answered.
struct Run {
    id: SessionId,
    shared: Arc<Shared>,
    config: Arc<Config>,
    listener: usize,
    peer: SocketAddr,
    started: Instant,
    /// The accepted socket, until the PROXY header and TLS are done.
    tcp: Option<rt::TcpStream>,
    raw: Option<ClientStream>,
    client: Option<ClientStream>,
    backend: Option<BackendStream>,
    lease: Option<Lease>,
    slot: Option<SessionSlot>,
    /// The matched route: its index in the listener's routes of `config` (the session's own
    /// snapshot of the config, so the index stays valid across reloads).
    route: Option<usize>,
    /// The backends the session was relayed through, in order (more than one after failover).
    backends_used: Vec<SocketAddr>,
    /// The client's request, kept to redo the upstream handshake on failover (pools with
    /// `on_backend_loss: reconnect` only).
    head: Option<Box<RequestHead>>,
    /// The subprotocol the first backend chose; a failover backend must choose the same.
    subprotocol: Option<String>,
    state: RelayState,
    flushed: Counters,
    /// A tunnel-mode session's sockets and the bytes read past the handshake heads.
    tunnel: Option<Box<TunnelIo>>,
    tunnel_counts: TunnelCounts,
    close: Option<(u16, ClosedBy)>,
    /// How long the closing handshakes may take (shorter inside a shutdown's drain).
    close_wait: std::time::Duration,
    failovers: u32,
    fault: Fault,
}

async fn run(
    id: SessionId,
    me: Addr<Session>,
    start: SessionStart,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let config = Arc::clone(&start.shared.config);
    // Boxed: the task's future holds a pointer, not the state, so spawning it (which moves
    // the future through several wrappers) copies bytes, not a kilobyte.
    let mut s = Box::new(Run {
        id,
        shared: start.shared,
        config,
        listener: start.listener,
        peer: start.peer,
        started: Instant::now(),
        tcp: Some(start.stream),
        raw: None,
        client: None,
        backend: None,
        lease: None,
        slot: None,
        route: None,
        backends_used: Vec::new(),
        head: None,
        subprotocol: None,
        state: RelayState::default(),
        flushed: Counters::default(),
        tunnel: None,
        tunnel_counts: TunnelCounts::default(),
        close: None,
        close_wait: relay::CLOSE_TIMEOUT,
        failovers: 0,
        fault: Fault::default(),
    });
    let outcome = AssertUnwindSafe(s.session(&me, &mut control))
        .catch_unwind()
        .await;
    if let Err(panic) = outcome {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        log::warn!("session#{id} panicked: {what}; ending it with close 1011");
        s.shared.metrics.session_panics_total.fetch_add(1, Relaxed);
        Box::pin(s.after_panic()).await; // rare: kept out of every task's size
    }
    s.finish_log();
    // The actor's last (strong) address: dropping it closes the mailbox and the actor stops
    // (`stopped`). Others hold weak ones (pool leases) and upgrade them only to send.
    drop(me);
}

impl Run {
    async fn session(
        &mut self,
        me: &Addr<Session>,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) {
        // Boxed: an async fn's state is as large as its largest state, for the task's whole
        // life; the handshake's (head buffers, the upstream client handshake) would otherwise
        // stay in every idle session's memory (bench: 17 KB of the task, 61% of idle RSS).
        if Box::pin(self.handshake(me)).await {
            if self.tunnel.is_some() {
                // Boxed too: inline, the tunnel's state would size every message session.
                Box::pin(self.run_tunnel(control)).await;
            } else {
                self.relay(me, control).await;
            }
        }
    }

    /// Reads and checks the upgrade, dials a backend, answers 101. `false`: the client was
    /// answered with a refusal (or is gone) and the session is over.
    async fn handshake(&mut self, me: &Addr<Session>) -> bool {
        let timeouts = self.config.timeouts;
        let deadline = Instant::now() + timeouts.handshake();
        if !self.open_transport(deadline).await {
            return false;
        }
        let Some(raw) = self.raw.as_mut() else {
            return false;
        };
        let mut buf = Vec::with_capacity(1024);
        let left = deadline.saturating_duration_since(Instant::now());
        let (head, head_len) = match rt::timeout(left, handshake::read_head(raw, &mut buf)).await {
            Ok(Ok(h)) => h,
            Ok(Err(HeadError::TooLarge)) => {
                return self.refuse(431, HandshakeFailure::BadRequest).await
            }
            Ok(Err(HeadError::Malformed)) => {
                return self.refuse(400, HandshakeFailure::BadRequest).await
            }
            Ok(Err(HeadError::Eof | HeadError::Io(_))) => return false,
            Err(_) => {
                log::debug!(
                    "session#{} {}: no complete request within handshake_ms",
                    self.id,
                    self.peer
                );
                self.shared
                    .metrics
                    .handshake_failed(HandshakeFailure::Timeout);
                return false;
            }
        };
        // The route is borrowed from a second handle on the config, since `self` is borrowed
        // mutably below (cloning the route was two allocations).
        let config = Arc::clone(&self.config);
        let routes = &config.listeners[self.listener].routes;
        // One buffer for all of the session's heads: the client's request (read above), the
        // upstream request, the backend's answer, the 101 (valgrind --tool=dhat: each its
        // own was three more allocations and 1.7 KB more heap touched a session).
        let leftover = buf.split_off(head_len);
        buf.clear();
        let Some(ri) = crate::route::match_route(routes, head.header("host"), head.target()) else {
            return self.refuse(404, HandshakeFailure::NoRoute).await;
        };
        let route = &routes[ri];
        self.route = Some(ri);
        match handshake::check_upgrade(&head) {
            Ok(()) => {}
            Err(UpgradeProblem::NotUpgrade) => {
                if self.config.pools.get(&route.pool).is_some_and(|p| p.http) {
                    return Box::pin(self.http_pass(&route.pool, &head, leftover)).await;
                }
                return self.refuse(426, HandshakeFailure::NotUpgrade).await;
            }
            Err(UpgradeProblem::Malformed) => {
                return self.refuse(400, HandshakeFailure::BadRequest).await
            }
        }
        if !handshake::origin_allowed(&self.config.allowed_origins, head.header("origin")) {
            return self.refuse(403, HandshakeFailure::Origin).await;
        }
        let Some(slot) = self.shared.acquire_slot(self.peer.ip()) else {
            return self.refuse(503, HandshakeFailure::Limit).await;
        };
        self.slot = Some(slot);
        #[cfg(feature = "fault-injection")]
        let fault = head.header("x-wsgate-fault").map(str::to_string);
        #[cfg(feature = "fault-injection")]
        {
            self.fault.panic_after_first = fault.as_deref() == Some("panic");
        }

        let tunnel = self.config.relay_for(&route.pool) == RelayMode::Tunnel;
        let mode = if tunnel { Mode::Tunnel } else { Mode::Message };
        let accept = handshake::accept_key(&head);
        let Some(upstream) = self
            .connect(&route.pool, &head, &accept, mode, &mut buf)
            .await
        else {
            return false;
        };
        let Some(response) = upstream.response() else {
            return false;
        };
        self.subprotocol = response
            .header("sec-websocket-protocol")
            .map(str::to_string);
        let replay = self
            .config
            .pools
            .get(&route.pool)
            .map_or(0, |p| p.replay_first_messages as usize);
        let limits = relay::Limits {
            max_message: self.config.limits.max_message_bytes,
            max_frame: self.config.limits.max_frame_bytes,
        };
        self.state = RelayState::new(replay, limits);
        buf.clear();
        handshake::switching_protocols(&mut buf, &accept, response, tunnel);
        let Some(mut raw) = self.raw.take() else {
            return false;
        };
        let written = handshake::write_all(&mut raw, &buf).await.is_ok();
        let Upstream::Raw(backend, up) = upstream else {
            return false;
        };
        if !written {
            self.backend = Some(backend);
            self.close = Some((1006, ClosedBy::Client));
            return false;
        }
        if tunnel {
            self.tunnel = Some(Box::new(TunnelIo {
                client: raw,
                backend,
                c2b: leftover,
                b2c: up.rest,
            }));
        } else {
            self.state.preload(Side::Client, leftover);
            self.state.preload(Side::Backend, up.rest);
            self.client = Some(raw);
            self.backend = Some(backend);
        }
        if let Some(lease) = self.lease.as_mut() {
            lease.attach(self.id, me.downgrade());
        }
        self.shared.metrics.sessions_total.fetch_add(1, Relaxed);
        if self.shared.draining.load(Relaxed) {
            // Shutting down: this session missed the broadcast; end it the same way.
            let within = relay::CLOSE_TIMEOUT.min(self.config.timeouts.drain().mul_f64(0.5));
            let _ = me.send(SessionControl(Control::Close {
                code: 1001,
                reason: "going away",
                within,
            }));
        }
        #[cfg(feature = "fault-injection")]
        self.inject(fault.as_deref(), &route.pool);
        // Kept only to redo the upstream handshake on failover (an idle session's memory).
        if self.loss_policy() == OnBackendLoss::Reconnect {
            self.head = Some(Box::new(head));
        }
        true
    }

    #[cfg(feature = "fault-injection")]
    fn inject(&self, fault: Option<&str>, pool: &str) {
        let me = SessionName(self.id);
        match fault {
            Some("crash-pool") => {
                if let Some(addr) = self.shared.pools.get(pool).and_then(|p| p.addr.get()) {
                    trace(&me, &PoolName(pool), &crate::messages::Fault);
                    let _ = addr.send(crate::messages::Fault);
                }
            }
            Some("crash-health-checker") => {
                if let Some(addr) = self.shared.health_checker.get() {
                    trace(&me, &"health_checker", &crate::messages::Fault);
                    let _ = addr.send(crate::messages::Fault);
                }
            }
            Some("crash-listener") => {
                let l = &self.shared.listeners[self.listener];
                if let Some(addr) = l.addr.get() {
                    trace(
                        &me,
                        &crate::messages::ListenerName(&l.name),
                        &crate::messages::Fault,
                    );
                    let _ = addr.send(crate::messages::Fault);
                }
            }
            _ => {}
        }
    }

    /// A plain HTTP request on a pool with `"http": true`: forwarded to a healthy backend,
    /// the response streamed back, the connection closed. Always `false` (no WebSocket).
    async fn http_pass(&mut self, pool: &str, head: &RequestHead, pending: Vec<u8>) -> bool {
        let body = match http_forward::body_of(head) {
            Ok(b) => b,
            Err(e) => {
                log::debug!("session#{}: {e}", self.id);
                return self.refuse(400, HandshakeFailure::BadRequest).await;
            }
        };
        let Some(slot) = self.shared.acquire_slot(self.peer.ip()) else {
            return self.refuse(503, HandshakeFailure::Limit).await;
        };
        self.slot = Some(slot);
        let Some(Upstream::Http(mut backend)) = self
            .connect(pool, head, "", Mode::Http, &mut Vec::new())
            .await
        else {
            return false;
        };
        let client = ClientInfo {
            ip: self.peer.ip(),
            tls: self.shared.listeners[self.listener].tls.is_some(),
        };
        let head_bytes = http_forward::request_head(head, client, &self.config.headers);
        let Some(raw) = self.raw.as_mut() else {
            return false;
        };
        let result = http_forward::forward(raw, &mut backend, &head_bytes, body, pending).await;
        self.shared
            .metrics
            .http_requests_total
            .fetch_add(1, Relaxed);
        let backend_addr = self
            .backends_used
            .last()
            .map_or("-".to_string(), ToString::to_string);
        match result {
            Ok(status) => log::info!(
                "http session={} client={} listener={} route={} pool={pool} backend={backend_addr} {} {} status={status} duration_ms={}",
                self.id,
                self.peer,
                self.shared.listeners[self.listener].name,
                self.route_path(),
                head.method(),
                head.target(),
                self.started.elapsed().as_millis()
            ),
            Err(e) => log::info!("http session={} pool={pool} backend={backend_addr}: {e}", self.id),
        }
        false
    }

    /// Reads the PROXY header (listeners with `proxy_protocol`) and does the TLS handshake
    /// (listeners with `tls`), both within the handshake deadline. `false`: the connection is
    /// dropped (no valid PROXY header, failed TLS, or too slow).
    async fn open_transport(&mut self, deadline: Instant) -> bool {
        let Some(mut tcp) = self.tcp.take() else {
            return false;
        };
        let left = || deadline.saturating_duration_since(Instant::now());
        if self.config.listeners[self.listener].proxy_protocol {
            // Boxed, like the TLS accept below: a rarer path's state (the TLS accept's is
            // kilobytes) inline would be copied and touched by every handshake.
            let header = rt::timeout(left(), Box::pin(crate::proxy_header::read(&mut tcp))).await;
            match self.step_done("PROXY header", header) {
                Some(Some(addr)) => self.peer = addr,
                Some(None) => {}
                None => return false,
            }
        }
        let acceptor = self.shared.listeners[self.listener].tls.clone();
        self.raw = Some(match acceptor {
            None => ClientStream::Plain(tcp),
            Some(acceptor) => {
                let tls = rt::timeout(left(), Box::pin(acceptor.accept(tcp))).await;
                match self.step_done("TLS handshake", tls) {
                    Some(tls) => ClientStream::Tls(Box::new(tls)),
                    None => return false,
                }
            }
        });
        true
    }

    /// The result of a transport step bounded by the handshake deadline; a failure is logged
    /// and counted (a bad PROXY header or TLS handshake, or a client too slow).
    fn step_done<T, E: std::fmt::Display>(
        &self,
        step: &str,
        r: Result<Result<T, E>, rt::Elapsed>,
    ) -> Option<T> {
        let why = match r {
            Ok(Ok(v)) => return Some(v),
            Ok(Err(e)) => {
                log::info!(
                    "session#{} {}: {step} failed: {e}; closing",
                    self.id,
                    self.peer
                );
                HandshakeFailure::BadRequest
            }
            Err(_) => HandshakeFailure::Timeout,
        };
        self.shared.metrics.handshake_failed(why);
        None
    }

    /// The handshake's backend: a dial walk whose failures become the client's answer.
    async fn connect(
        &mut self,
        pool_name: &str,
        head: &RequestHead,
        accept: &str,
        mode: Mode,
        buf: &mut Vec<u8>,
    ) -> Option<Upstream> {
        match self
            .dial_walk(pool_name, head, accept, Vec::new(), mode, buf)
            .await
        {
            Ok(ok) => Some(ok),
            Err(Walk::Refused(resp)) => {
                // The application's own verdict (401, 403, 404…): pass it on, no retry.
                self.shared
                    .metrics
                    .handshake_failed(HandshakeFailure::BackendRefused);
                let bytes = handshake::passthrough_response(&resp.response, &resp.rest);
                self.answer(&bytes, resp.response.status).await;
                None
            }
            Err(Walk::NoBackend) => {
                self.refuse(502, HandshakeFailure::NoBackend).await;
                None
            }
        }
    }

    /// Asks the pool for candidates and walks them until one accepts the upgrade (its 101
    /// carrying `accept`, the key the client's `Sec-WebSocket-Key` calls for). Failures
    /// are reported to the pool (passive health) and cost the client nothing while another
    /// backend answers. The session's lease follows the backend being tried. `buf`: room
    /// for the upstream request and the backend's answer.
    async fn dial_walk(
        &mut self,
        pool_name: &str,
        head: &RequestHead,
        accept: &str,
        exclude: Vec<SocketAddr>,
        mode: Mode,
        buf: &mut Vec<u8>,
    ) -> Result<Upstream, Walk> {
        let Some(addr) = self.shared.pools.get(pool_name).and_then(|p| p.addr.get()) else {
            log::warn!("session#{}: pool {pool_name} is restarting", self.id);
            return Err(Walk::NoBackend);
        };
        let pick = PickBackends {
            session: self.id,
            client_ip: self.peer.ip(),
            exclude,
        };
        let me = SessionName(self.id);
        trace(&me, &PoolName(pool_name), &pick);
        let picked = match addr.call(pick).await {
            Ok(p) => p,
            Err(e) => {
                log::warn!("session#{}: pool {pool_name} did not answer: {e}", self.id);
                return Err(Walk::NoBackend);
            }
        };
        let timeouts = self.config.timeouts;
        let client = ClientInfo {
            ip: self.peer.ip(),
            tls: self.shared.listeners[self.listener].tls.is_some(),
        };
        let mut lease = picked.lease;
        for (k, b) in picked.candidates.iter().enumerate() {
            if k > 0 {
                if let Some(lease) = lease.as_mut() {
                    lease.switch_to(Arc::clone(b));
                }
            }
            buf.clear();
            if mode != Mode::Http {
                // An HTTP pass-through writes its own request once connected.
                handshake::upstream_request(
                    buf,
                    head,
                    b.addr,
                    client,
                    &self.config.headers,
                    mode == Mode::Tunnel,
                );
            }
            let offered = head.header("sec-websocket-protocol");
            match dial(b, buf, accept, offered, timeouts.connect(), mode).await {
                Ok(ok) => {
                    self.lease = lease;
                    // Most sessions only ever have one: no room for four (idle memory).
                    self.backends_used.reserve_exact(1);
                    self.backends_used.push(b.addr);
                    return Ok(ok);
                }
                Err(DialError::Refused(resp)) => {
                    log::info!(
                        "session#{} backend {} refused the upgrade with {}",
                        self.id,
                        b.addr,
                        resp.response.status
                    );
                    return Err(Walk::Refused(resp));
                }
                Err(DialError::Failed(reason)) => {
                    log::info!(
                        "session#{} backend {} in pool {pool_name} failed: {reason}",
                        self.id,
                        b.addr
                    );
                    let failed = BackendFailed {
                        session: self.id,
                        backend: b.addr,
                        reason,
                    };
                    trace(&me, &PoolName(pool_name), &failed);
                    let _ = addr.send(failed);
                }
            }
        }
        Err(Walk::NoBackend)
    }

    /// `on_backend_loss: reconnect`: dial another healthy backend with the original request,
    /// insist on the same subprotocol, replay the client's first messages. While this runs
    /// the client's socket is not read: its messages wait in order in the kernel's buffer
    /// (TCP flow control pushes back), and are relayed after the replay.
    async fn reconnect(&mut self, me: &Addr<Session>) -> Result<(), String> {
        // The pool's name borrowed from a second handle on the config (`self` is borrowed
        // mutably below).
        let config = Arc::clone(&self.config);
        let pool = route_of(&config, self.listener, self.route).map(|r| r.pool.as_str());
        let (Some(pool), Some(head)) = (pool, self.head.take()) else {
            return Err("no request to replay".into());
        };
        let lost = self.backends_used.last().copied();
        let accept = handshake::accept_key(&head);
        let result = self
            .dial_walk(
                pool,
                &head,
                &accept,
                lost.into_iter().collect(),
                Mode::Message,
                &mut Vec::with_capacity(1024),
            )
            .await;
        self.head = Some(head);
        let (mut backend, up) = match result {
            Ok(Upstream::Raw(backend, up)) => (backend, up),
            Ok(Upstream::Http(_)) => return Err("only message relays fail over".into()),
            Err(Walk::Refused(resp)) => {
                return Err(format!(
                    "new backend refused the upgrade with {}",
                    resp.response.status
                ))
            }
            Err(Walk::NoBackend) => return Err("no healthy backend took the session".into()),
        };
        let chosen = up.response.header("sec-websocket-protocol");
        if chosen != self.subprotocol.as_deref() {
            return Err(format!(
                "new backend chose subprotocol {chosen:?}, the session has {:?}",
                self.subprotocol
            ));
        }
        handshake::write_all(&mut backend, self.state.replay())
            .await
            .map_err(|e| format!("replay: {e}"))?;
        if let Some(lease) = self.lease.as_mut() {
            lease.attach(self.id, me.downgrade());
        }
        self.state.backend_replaced(&up.rest);
        self.backend = Some(backend);
        self.failovers += 1;
        self.shared.metrics.failovers_total.fetch_add(1, Relaxed);
        log::info!(
            "session#{} failed over from {} to {} (replayed {} messages)",
            self.id,
            lost.map_or("-".to_string(), |a| a.to_string()),
            self.backends_used
                .last()
                .map_or("-".to_string(), |a| a.to_string()),
            self.state.replayed()
        );
        Ok(())
    }

    /// Relays until the session ends (failing over on backend loss when the pool says
    /// `reconnect`), then runs the closing handshake the outcome calls for.
    async fn relay(&mut self, me: &Addr<Session>, control: &mut mpsc::UnboundedReceiver<Control>) {
        let t = self.config.timeouts;
        let timing = Timing {
            idle: t.idle(),
            ping_interval: t.ping_interval(),
        };
        let metrics = Arc::clone(&self.shared.metrics);
        let outcome = loop {
            let (Some(client), Some(backend)) = (self.client.as_mut(), self.backend.as_mut())
            else {
                return;
            };
            let flushed = &mut self.flushed;
            let outcome = relay::relay(
                client,
                backend,
                control,
                timing,
                &mut self.state,
                &self.fault,
                |c| flush_counters(&metrics, flushed, c),
            )
            .await;
            log::debug!("session#{} relay ended: {outcome:?}", self.id);
            let lost = match &outcome {
                Outcome::Gone(Side::Backend, why) => why.clone(),
                Outcome::Unresponsive(Side::Backend) => "backend did not answer pings".into(),
                Outcome::Control(Control::BackendDown(addr, why)) => {
                    if self.backends_used.last() != Some(addr) {
                        continue; // about a backend this session already left
                    }
                    format!("pool: {why}")
                }
                _ => break outcome,
            };
            let verdict_only = matches!(outcome, Outcome::Control(Control::BackendDown(..)));
            let current = (self.backend.take(), self.backends_used.last().copied());
            if self.loss_policy() == OnBackendLoss::Reconnect {
                match Box::pin(self.reconnect(me)).await {
                    Ok(()) => continue,
                    Err(e) => {
                        if let (true, (Some(ws), Some(addr))) = (verdict_only, current) {
                            // The pool gave up on the backend but this socket still works:
                            // better to stay on it than to end the session.
                            log::info!(
                                "session#{}: {lost}; failover failed ({e}); staying on {addr}",
                                self.id
                            );
                            // A failed failover leaves `backends_used` as it was: `addr` is
                            // still its last entry.
                            debug_assert_eq!(self.backends_used.last(), Some(&addr));
                            self.backend = Some(ws);
                            continue;
                        }
                        log::info!(
                            "session#{}: backend lost ({lost}); failover failed: {e}",
                            self.id
                        )
                    }
                }
            } else {
                log::info!(
                    "session#{}: backend lost ({lost}); on_backend_loss close",
                    self.id
                );
            }
            break outcome;
        };
        let send = |code, reason| Some(Closing::Send(ClosePayload::new(code, reason)));
        let going_away = || send(1001, "going away");
        let (client_close, backend_close, close) = match outcome {
            Outcome::Closed(Side::Client, p) => {
                let code = p.code().unwrap_or(1005);
                let answer = Some(Closing::Answer(p.clone()));
                (answer, Some(Closing::Send(p)), (code, ClosedBy::Client))
            }
            Outcome::Closed(Side::Backend, p) => {
                let code = p.code().unwrap_or(1005);
                let answer = Some(Closing::Answer(p.clone()));
                (Some(Closing::Send(p)), answer, (code, ClosedBy::Backend))
            }
            Outcome::Gone(Side::Client, _) | Outcome::Unresponsive(Side::Client) => {
                self.client = None;
                (None, going_away(), (1006, ClosedBy::Client))
            }
            Outcome::Gone(Side::Backend, _)
            | Outcome::Unresponsive(Side::Backend)
            | Outcome::Control(Control::BackendDown(..)) => {
                (send(1014, "bad gateway"), None, (1014, ClosedBy::Gateway))
            }
            Outcome::Violation(side, code, ref why) => {
                log::info!(
                    "session#{}: {side:?} broke a limit or the protocol: {why}",
                    self.id
                );
                let mine = send(code, "message too big or invalid");
                match side {
                    Side::Client => (mine, going_away(), (code, ClosedBy::Gateway)),
                    Side::Backend => (going_away(), mine, (1001, ClosedBy::Gateway)),
                }
            }
            Outcome::Idle => (
                send(1001, "idle timeout"),
                send(1001, "idle timeout"),
                (1001, ClosedBy::Gateway),
            ),
            Outcome::Control(Control::Close {
                code,
                reason,
                within,
            }) => {
                self.close_wait = within;
                (send(code, reason), going_away(), (code, ClosedBy::Gateway))
            }
            Outcome::ControlLost => (
                send(1011, "internal error"),
                going_away(),
                (1011, ClosedBy::Gateway),
            ),
        };
        self.close = Some(close);
        Box::pin(self.close_sockets(client_close, backend_close)).await;
    }

    /// A tunnel-mode session: copy bytes both ways until a side closes. Frames are not parsed,
    /// so the close code is unknown (`close=-`); a drain closes both sockets.
    async fn run_tunnel(&mut self, control: &mut mpsc::UnboundedReceiver<Control>) {
        let Some(t) = self.tunnel.take() else { return };
        let end = tunnel::copy_both(
            t.client.split(),
            t.backend.split(),
            &t.c2b,
            &t.b2c,
            control,
            &mut self.tunnel_counts,
        )
        .await;
        log::debug!("session#{} tunnel ended: {end:?}", self.id);
        self.close = Some(match end {
            TunnelEnd::ClientClosed => (0, ClosedBy::Client),
            TunnelEnd::BackendClosed => (0, ClosedBy::Backend),
            TunnelEnd::Failed(_) | TunnelEnd::Control(_) => (0, ClosedBy::Gateway),
        });
        let m = &self.shared.metrics;
        m.bytes_c2b.fetch_add(self.tunnel_counts.c2b_bytes, Relaxed);
        m.bytes_b2c.fetch_add(self.tunnel_counts.b2c_bytes, Relaxed);
    }

    /// The matched route, once routed.
    fn route_config(&self) -> Option<&crate::config::RouteConfig> {
        route_of(&self.config, self.listener, self.route)
    }

    /// The matched route's path, for the logs.
    fn route_path(&self) -> &str {
        self.route_config().map_or("-", |r| r.path.as_str())
    }

    /// The matched route's pool, once routed.
    fn pool_name(&self) -> Option<&str> {
        self.route_config().map(|r| r.pool.as_str())
    }

    /// The pool's `on_backend_loss` (tunnel relays cannot fail over).
    fn loss_policy(&self) -> OnBackendLoss {
        let Some(pool) = self.pool_name() else {
            return OnBackendLoss::Close;
        };
        match self.config.relay_for(pool) {
            RelayMode::Tunnel => OnBackendLoss::Close,
            RelayMode::Message => self
                .config
                .pools
                .get(pool)
                .map(|p| p.on_backend_loss)
                .unwrap_or_default(),
        }
    }

    /// The closing handshakes: `None` for a side that gets no close frame (gone, or a
    /// backend whose socket is still the lost one: it is dropped).
    async fn close_sockets(&mut self, client: Option<Closing>, backend: Option<Closing>) {
        relay::close_both(
            self.client.as_mut().zip(client),
            self.backend.as_mut().zip(backend),
            &mut self.state,
            self.close_wait,
        )
        .await;
    }

    /// Answers a panic: 1011 to the client (500 before the upgrade), 1001 to the backend.
    async fn after_panic(&mut self) {
        self.close = Some((1011, ClosedBy::Gateway));
        if let Some(raw) = self.raw.as_mut() {
            let _ = rt::timeout(
                relay::CLOSE_TIMEOUT,
                handshake::write_all(raw, &handshake::refusal(500)),
            )
            .await;
            return;
        }
        self.close_sockets(
            Some(Closing::Send(ClosePayload::new(1011, "internal error"))),
            Some(Closing::Send(ClosePayload::new(1001, "going away"))),
        )
        .await;
    }

    async fn refuse(&mut self, status: u16, why: HandshakeFailure) -> bool {
        self.shared.metrics.handshake_failed(why);
        self.answer(&handshake::refusal(status), status).await;
        false
    }

    async fn answer(&mut self, bytes: &[u8], status: u16) {
        if let Some(raw) = self.raw.as_mut() {
            let _ = rt::timeout(relay::CLOSE_TIMEOUT, handshake::write_all(raw, bytes)).await;
        }
        let l = &self.shared.listeners[self.listener];
        log::info!(
            "refused session={} client={} listener={} route={} pool={} status={status} duration_ms={}",
            self.id,
            self.peer,
            l.name,
            self.route_path(),
            self.pool_name().unwrap_or("-"),
            self.started.elapsed().as_millis()
        );
    }

    /// The access line (SPEC §6) of an established session, and its last metric counts.
    fn finish_log(&mut self) {
        flush_counters(
            &self.shared.metrics,
            &mut self.flushed,
            &self.state.counters(),
        );
        let Some((code, by)) = self.close else { return };
        if !log::log_enabled!(log::Level::Info) {
            return; // the line's strings are built only for a log that shows them
        }
        let mut c = self.state.counters();
        c.c2b_bytes += self.tunnel_counts.c2b_bytes;
        c.b2c_bytes += self.tunnel_counts.b2c_bytes;
        let code = if code == 0 {
            "-".to_string()
        } else {
            code.to_string()
        };
        let backends: Vec<String> = self.backends_used.iter().map(ToString::to_string).collect();
        log::info!(
            "access session={} client={} listener={} route={} pool={} backend={} duration_ms={} c2b_msgs={} b2c_msgs={} c2b_bytes={} b2c_bytes={} close={code} closed_by={} failovers={} backends={}",
            self.id,
            self.peer,
            self.shared.listeners[self.listener].name,
            self.route_path(),
            self.pool_name().unwrap_or("-"),
            backends.last().map(String::as_str).unwrap_or("-"),
            self.started.elapsed().as_millis(),
            c.c2b_msgs,
            c.b2c_msgs,
            c.c2b_bytes,
            c.b2c_bytes,
            match by {
                ClosedBy::Client => "client",
                ClosedBy::Backend => "backend",
                ClosedBy::Gateway => "gateway",
            },
            self.failovers,
            if backends.is_empty() { "-".to_string() } else { backends.join(",") },
        );
    }
}

/// A session's route in its config snapshot: listener `listener`'s route number `route`.
fn route_of(
    config: &Config,
    listener: usize,
    route: Option<usize>,
) -> Option<&crate::config::RouteConfig> {
    config.listeners.get(listener)?.routes.get(route?)
}

/// Adds what the relay counted since the last flush to the process metrics.
fn flush_counters(m: &crate::metrics::Metrics, flushed: &mut Counters, now: &Counters) {
    m.messages_c2b
        .fetch_add(now.c2b_msgs - flushed.c2b_msgs, Relaxed);
    m.messages_b2c
        .fetch_add(now.b2c_msgs - flushed.b2c_msgs, Relaxed);
    m.bytes_c2b
        .fetch_add(now.c2b_bytes - flushed.c2b_bytes, Relaxed);
    m.bytes_b2c
        .fetch_add(now.b2c_bytes - flushed.b2c_bytes, Relaxed);
    *flushed = *now;
}

/// Why a dial walk found no backend.
enum Walk {
    /// A backend answered the upgrade with a 4xx (its head and body).
    Refused(Upgraded),
    /// Every candidate failed, or none is up.
    NoBackend,
}

enum DialError {
    /// The backend answered the upgrade with a 4xx: the application's verdict.
    Refused(Upgraded),
    /// Refused/reset connection, timeout, 5xx, or a broken handshake: try another backend.
    Failed(String),
}

/// What a dial walk sets up with a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A WebSocket upgrade for the message relay.
    Message,
    /// A raw WebSocket upgrade for the tunnel relay.
    Tunnel,
    /// A plain connection for HTTP pass-through.
    Http,
}

/// A backend that accepted the connection (and the upgrade, for WebSocket modes).
enum Upstream {
    /// Message and tunnel relays: the raw socket, its 101 and what the backend sent after it.
    Raw(BackendStream, Upgraded),
    /// HTTP pass-through: a connected socket.
    Http(BackendStream),
}

impl Upstream {
    fn response(&self) -> Option<&ResponseHead> {
        match self {
            Upstream::Raw(_, up) => Some(&up.response),
            Upstream::Http(_) => None,
        }
    }
}

/// A tunnel-mode session's sockets and the bytes each side sent past its handshake head.
struct TunnelIo {
    client: ClientStream,
    backend: BackendStream,
    c2b: Vec<u8>,
    b2c: Vec<u8>,
}

/// Connects to a backend and, for the WebSocket modes, does the upgrade on raw bytes (one
/// path for both relays), keeping any frames the backend sent right after its 101. Connect
/// and upgrade share one `connect_ms` deadline: one timer per attempt. `buf` holds the
/// upgrade request, and then the backend's answer.
async fn dial(
    b: &BackendState,
    buf: &mut Vec<u8>,
    accept: &str,
    offered: Option<&str>,
    timeout: std::time::Duration,
    mode: Mode,
) -> Result<Upstream, DialError> {
    let mut connected = false;
    let attempt = async {
        let mut tcp = transport::connect(b.addr, b.tls.as_ref())
            .await
            .map_err(|e| DialError::Failed(format!("connect: {e}")))?;
        connected = true;
        if mode == Mode::Http {
            return Ok(Upstream::Http(tcp));
        }
        match handshake::raw_upgrade(&mut tcp, buf, accept, offered).await {
            Ok(up) => Ok(Upstream::Raw(tcp, up)),
            Err(Ok(up)) if (400..500).contains(&up.response.status) => Err(DialError::Refused(up)),
            Err(Ok(up)) => Err(DialError::Failed(format!(
                "upgrade answered {}",
                up.response.status
            ))),
            Err(Err(reason)) => Err(DialError::Failed(reason)),
        }
    };
    match rt::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) if connected => Err(DialError::Failed("upgrade timed out (connect_ms)".into())),
        Err(_) => Err(DialError::Failed("connect: connect timed out".into())),
    }
}
