//! The data plane of a `relay: "message"` session: one task polls both sockets in a tight
//! loop. Per message: a read, a frame decode, a write. No actor mailbox, no lock, no timer
//! reset and no allocation beyond the message tungstenite decodes; writes are coalesced (one
//! flush per batch of ready frames). Keepalive and idle checks run on a coarse tick.
//!
//! The loop ends with an [`Outcome`]; [`finish`] then runs the closing handshake that outcome
//! calls for. The session actor decides what an outcome means (e.g. failover on backend loss).

use crate::rt::Timer;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use async_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use async_tungstenite::tungstenite::{Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use futures::channel::mpsc;
use futures::{AsyncRead, AsyncWrite, Sink, SinkExt, Stream, StreamExt};

use futures::task::{waker, ArcWake, AtomicWaker};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Payload of the gateway's own keepalive pings; pongs carrying it are not forwarded.
const KEEPALIVE: &[u8] = b"wsgate-keepalive";
/// Messages relayed per direction before the loop yields to the executor.
const BUDGET: usize = 64;
/// How long a closing handshake may take before the sockets are dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// tungstenite settings for a relayed socket: limits from the config, buffers sized for many
/// mostly-idle sessions (tungstenite's 128 KiB defaults would cost 256 KiB per session side).
pub fn ws_config(max_message: usize, max_frame: usize) -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.read_buffer_size = 4096;
    c.write_buffer_size = 16 * 1024;
    c.max_write_buffer_size = max_message.saturating_add(1 << 20);
    c.max_message_size = Some(max_message);
    c.max_frame_size = Some(max_frame);
    c
}

/// Which socket of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

/// Control events the session actor sends into a running relay.
#[derive(Debug)]
pub enum Control {
    /// End the session: the client gets `code`, the backend 1001 (drain, shutdown), and the
    /// closing handshakes may take at most `within` (so a shutdown's drain_ms holds).
    Close {
        code: u16,
        reason: &'static str,
        within: Duration,
    },
    /// The pool declared this backend down (health check, or drained by a reload): treat as
    /// loss if it is still the session's backend (a failed-over session ignores its old one).
    BackendDown(std::net::SocketAddr, String),
}

/// Why the relay loop stopped.
#[derive(Debug)]
pub enum Outcome {
    /// A side sent a close frame; it is to be passed to the other side unchanged.
    Closed(Side, Option<CloseFrame>),
    /// A side's socket ended or failed without a close frame.
    Gone(Side, String),
    /// A side broke a protocol rule (its close code: 1009 too big, 1007 bad UTF-8, 1002).
    Violation(Side, u16, String),
    /// No data message either way for `idle`.
    Idle,
    /// A side did not answer keepalive pings for two intervals.
    Unresponsive(Side),
    /// A control event from the session actor.
    Control(Control),
    /// The session actor is gone (it failed): end with 1011.
    ControlLost,
}

/// Per-session traffic counts; added to the process metrics in batches.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub c2b_msgs: u64,
    pub b2c_msgs: u64,
    pub c2b_bytes: u64,
    pub b2c_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub idle: Duration,
    pub ping_interval: Duration,
}

/// Everything a relay keeps across a backend swap (`on_backend_loss: reconnect`).
#[derive(Default)]
pub struct RelayState {
    c2b: Dir,
    b2c: Dir,
}

impl RelayState {
    pub fn new(replay_max: usize) -> RelayState {
        let mut s = RelayState::default();
        s.c2b.replay_max = replay_max;
        s
    }

    /// The client's first messages, to send to a new backend before anything else.
    pub fn replay(&self) -> &[Message] {
        &self.c2b.replay
    }

    pub fn counters(&self) -> Counters {
        Counters {
            c2b_msgs: self.c2b.msgs,
            b2c_msgs: self.b2c.msgs,
            c2b_bytes: self.c2b.bytes,
            b2c_bytes: self.b2c.bytes,
        }
    }

    /// Forgets what belonged to the lost backend; keeps what is owed to the client and the
    /// client message read but not yet written (it goes to the new backend after the replay).
    pub fn backend_replaced(&mut self) {
        self.c2b.urgent = None;
        self.c2b.unflushed = false;
        self.c2b.heard = true;
        self.b2c.heard = true;
        self.b2c.closed = false;
    }
}

/// One direction of the relay: a message waiting for the destination to accept it, and
/// whether the destination has unflushed writes.
#[derive(Default)]
struct Dir {
    urgent: Option<Message>,
    pending: Option<Message>,
    unflushed: bool,
    /// Any frame arrived from this direction's source since the last keepalive ping.
    heard: bool,
    closed: bool,
    /// Data messages and payload bytes read from the source.
    msgs: u64,
    bytes: u64,
    /// The first `replay_max` data messages written to the destination (client→backend only).
    replay: Vec<Message>,
    replay_max: usize,
}

enum DirEvent {
    Closed(Option<CloseFrame>),
    ReadFailed(WsError),
    Eof,
    WriteFailed(WsError),
}

/// Polls one direction: forwards ready messages from `src` to `dst` until `src` has nothing
/// more, `dst` pushes back, or the budget is spent; flushes `dst` once per batch.
fn poll_dir<S, D>(
    cx: &mut Context<'_>,
    src: &mut WebSocketStream<S>,
    dst: &mut WebSocketStream<D>,
    dir: &mut Dir,
    #[allow(unused_variables)] fault: &mut Fault,
) -> Poll<DirEvent>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    let mut budget = BUDGET;
    loop {
        let next = dir.urgent.take().or_else(|| dir.pending.take());
        if let Some(msg) = next {
            match Pin::new(&mut *dst).poll_ready(cx) {
                Poll::Ready(Ok(())) => {
                    if dir.replay.len() < dir.replay_max
                        && matches!(msg, Message::Text(_) | Message::Binary(_))
                    {
                        dir.replay.push(msg.clone()); // a refcount bump, for the first few only
                    }
                    if let Err(e) = Pin::new(&mut *dst).start_send(msg) {
                        return Poll::Ready(DirEvent::WriteFailed(e));
                    }
                    dir.unflushed = true;
                    #[cfg(feature = "fault-injection")]
                    fault.after_forward();
                    continue;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(DirEvent::WriteFailed(e)),
                Poll::Pending => {
                    dir.pending = Some(msg);
                    return Poll::Pending;
                }
            }
        }
        if dir.closed {
            return Poll::Pending;
        }
        if budget == 0 {
            // Let the other direction and other sessions run; come back at once.
            if dir.unflushed {
                if let Poll::Ready(Err(e)) = Pin::new(&mut *dst).poll_flush(cx) {
                    return Poll::Ready(DirEvent::WriteFailed(e));
                }
            }
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        budget -= 1;
        match Pin::new(&mut *src).poll_next(cx) {
            Poll::Ready(Some(Ok(msg))) => {
                dir.heard = true;
                match msg {
                    Message::Text(ref t) => {
                        dir.msgs += 1;
                        dir.bytes += t.len() as u64;
                        dir.pending = Some(msg);
                    }
                    Message::Binary(ref b) => {
                        dir.msgs += 1;
                        dir.bytes += b.len() as u64;
                        dir.pending = Some(msg);
                    }
                    Message::Ping(_) => dir.pending = Some(msg),
                    Message::Pong(ref p) if p.as_ref() == KEEPALIVE => {}
                    Message::Pong(_) => dir.pending = Some(msg),
                    Message::Close(frame) => {
                        dir.closed = true;
                        return Poll::Ready(DirEvent::Closed(frame));
                    }
                    Message::Frame(_) => {}
                }
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(DirEvent::ReadFailed(e)),
            Poll::Ready(None) => return Poll::Ready(DirEvent::Eof),
            Poll::Pending => {
                if dir.unflushed {
                    match Pin::new(&mut *dst).poll_flush(cx) {
                        Poll::Ready(Ok(())) => {
                            dir.unflushed = false;
                            park_write_waker(dst);
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(DirEvent::WriteFailed(e)),
                        Poll::Pending => {}
                    }
                }
                return Poll::Pending;
            }
        }
    }
}

/// After a completed flush, leaves a no-op waker in `ws`'s write slot. async-tungstenite
/// wakes a stream's read *and* write wakers on any event of its socket, so the waker of the
/// direction that last wrote to `ws` would otherwise be woken by every message read from it,
/// and poll its own source for nothing. Flushing an empty buffer makes no syscall; a write
/// that pushes back registers the real waker again through `poll_ready`.
fn park_write_waker<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) {
    let mut noop = Context::from_waker(futures::task::noop_waker_ref());
    let _ = Pin::new(ws).poll_flush(&mut noop);
}

/// Maps a read error to the outcome it means for the side that sent it.
fn read_failure(side: Side, e: WsError) -> Outcome {
    use async_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            Outcome::Violation(side, 1009, e.to_string())
        }
        WsError::Capacity(_) => Outcome::Violation(side, 1009, e.to_string()),
        WsError::Utf8(_) => Outcome::Violation(side, 1007, e.to_string()),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            Outcome::Gone(side, e.to_string())
        }
        WsError::Protocol(_) => Outcome::Violation(side, 1002, e.to_string()),
        _ => Outcome::Gone(side, e.to_string()),
    }
}

fn dir_outcome(src: Side, ev: DirEvent) -> Outcome {
    let dst = match src {
        Side::Client => Side::Backend,
        Side::Backend => Side::Client,
    };
    match ev {
        DirEvent::Closed(f) => Outcome::Closed(src, f),
        DirEvent::ReadFailed(e) => read_failure(src, e),
        DirEvent::Eof => Outcome::Gone(src, "connection closed without a close frame".into()),
        DirEvent::WriteFailed(e) => Outcome::Gone(dst, e.to_string()),
    }
}

/// The waker of one direction: it remembers that this direction's sockets became ready, then
/// wakes the session task. A wakeup then polls only the directions that are ready: a read
/// attempt on a socket with nothing to read costs a syscall returning EAGAIN and a fill of
/// tungstenite's read buffer, and polling both directions on every wakeup made most reads
/// such attempts (bench/profile.sh: 5.9 of 8 recvfrom per echo returned EAGAIN).
struct DirWake {
    ready: AtomicBool,
    task: AtomicWaker,
}

impl ArcWake for DirWake {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.ready.store(true, Ordering::Release);
        arc_self.task.wake();
    }
}

impl DirWake {
    fn new() -> Arc<DirWake> {
        Arc::new(DirWake {
            ready: AtomicBool::new(true),
            task: AtomicWaker::new(),
        })
    }
}

/// Test-only fault injection: panic after relaying the first client message.
#[derive(Default)]
pub struct Fault {
    #[cfg(feature = "fault-injection")]
    pub panic_after_first: bool,
}

impl Fault {
    #[cfg(feature = "fault-injection")]
    fn after_forward(&mut self) {
        if self.panic_after_first {
            panic!("fault injection: session panic after relaying the first client message");
        }
    }
}

/// Relays until something ends the session. Counts live in `state` (so a caller can flush
/// them even after a panic) and are handed to `on_tick` each tick for the shared metrics.
#[allow(clippy::too_many_arguments)]
pub async fn relay<C, B>(
    client: &mut WebSocketStream<C>,
    backend: &mut WebSocketStream<B>,
    control: &mut mpsc::UnboundedReceiver<Control>,
    timing: Timing,
    state: &mut RelayState,
    fault: &mut Fault,
    mut on_tick: impl FnMut(&Counters),
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // Coarse enough to cost nothing on idle sessions, fine enough for metrics and idle_ms.
    let tick = timing
        .ping_interval
        .min(timing.idle / 8)
        .min(Duration::from_secs(5))
        .max(Duration::from_millis(5));
    let mut timer = Timer::after(tick);
    let RelayState { c2b, b2c } = state;
    let start = Instant::now();
    let mut last_data = start;
    let mut data_seen = 0u64;
    let mut next_ping = start + timing.ping_interval;
    let mut pinged = false;

    let (c2b_wake, b2c_wake) = (DirWake::new(), DirWake::new());
    let (c2b_waker, b2c_waker) = (waker(Arc::clone(&c2b_wake)), waker(Arc::clone(&b2c_wake)));
    poll_fn(|cx| loop {
        c2b_wake.task.register(cx.waker());
        b2c_wake.task.register(cx.waker());
        match control.poll_next_unpin(cx) {
            Poll::Ready(Some(c)) => return Poll::Ready(Outcome::Control(c)),
            Poll::Ready(None) => return Poll::Ready(Outcome::ControlLost),
            Poll::Pending => {}
        }
        // Backend to client first: when a backend's FIN and client data arrive in the same
        // wakeup, the loss is seen before more client messages are written to a dead socket.
        if b2c_wake.ready.swap(false, Ordering::AcqRel) {
            let mut dcx = Context::from_waker(&b2c_waker);
            if let Poll::Ready(ev) = poll_dir(&mut dcx, backend, client, b2c, &mut Fault::default())
            {
                return Poll::Ready(dir_outcome(Side::Backend, ev));
            }
        }
        if c2b_wake.ready.swap(false, Ordering::AcqRel) {
            let mut dcx = Context::from_waker(&c2b_waker);
            if let Poll::Ready(ev) = poll_dir(&mut dcx, client, backend, c2b, fault) {
                return Poll::Ready(dir_outcome(Side::Client, ev));
            }
        }
        if Pin::new(&mut timer).poll(cx).is_pending() {
            return Poll::Pending;
        }
        // Tick: idle and keepalive bookkeeping, then re-arm and poll again to register.
        let now = Instant::now();
        let counters = Counters {
            c2b_msgs: c2b.msgs,
            b2c_msgs: b2c.msgs,
            c2b_bytes: c2b.bytes,
            b2c_bytes: b2c.bytes,
        };
        on_tick(&counters);
        let seen = c2b.msgs + b2c.msgs;
        if seen != data_seen {
            data_seen = seen;
            last_data = now;
        } else if now.duration_since(last_data) >= timing.idle {
            return Poll::Ready(Outcome::Idle);
        }
        if now >= next_ping {
            if pinged {
                if !c2b.heard {
                    return Poll::Ready(Outcome::Unresponsive(Side::Client));
                }
                if !b2c.heard {
                    return Poll::Ready(Outcome::Unresponsive(Side::Backend));
                }
            }
            c2b.heard = false;
            b2c.heard = false;
            pinged = true;
            // To the backend: queued on the client→backend direction, and vice versa.
            c2b.urgent = Some(Message::Ping(KEEPALIVE.into()));
            b2c.urgent = Some(Message::Ping(KEEPALIVE.into()));
            c2b_wake.ready.store(true, Ordering::Release);
            b2c_wake.ready.store(true, Ordering::Release);
            next_ping = now + timing.ping_interval;
        }
        timer.set_after(tick);
    })
    .await
}

/// A close frame with a code and reason.
pub fn close_frame(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }
}

/// Sends a close frame (if the socket can still take one) and waits, bounded, for the peer's
/// answer; data arriving meanwhile is dropped (the other side is gone).
pub async fn close_side<S>(ws: &mut WebSocketStream<S>, frame: Option<CloseFrame>, within: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = crate::rt::timeout(within, async {
        if ws.close(frame).await.is_err() {
            return;
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Completes a side that already sent its close frame: flushes tungstenite's queued reply and
/// reads until the socket ends, bounded.
pub async fn finish_closed_side<S>(ws: &mut WebSocketStream<S>, within: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = crate::rt::timeout(within, async {
        let _ = ws.flush().await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}
