//! The data plane of a `relay: "message"` session: one task polls both sockets in a tight
//! loop. Per message: a read, a frame-header decode, a write. Frames pass on byte for byte
//! (see `wire` for why that is valid in both directions), so a payload is never decoded,
//! copied into a message or re-encoded; no actor mailbox, lock, timer reset or allocation is
//! on that path. Keepalive and idle checks run on a coarse tick.
//!
//! Buffers: a read goes into a per-thread scratch buffer shared by every session on the
//! thread, and the complete frames in it are written on from there. Only what cannot be
//! written at once (the destination pushed back, or a frame is still incomplete) is copied
//! into the session's own buffer, which is dropped again once the session has been idle for
//! a tick. An idle session holds no buffer.
//!
//! The gateway looks into a frame only where it must: close frames (their code ends the
//! relay), pongs (the answers to its own keepalive pings are not passed on), and fragmented
//! messages, which it reassembles and sends on as one frame, so that a message is never
//! split across backends by a failover.
//!
//! The loop ends with an [`Outcome`]; `close_side` then runs the closing handshake that
//! outcome calls for, both sides at once. A side whose close is answered (its handshake is
//! then complete) gets the answer and, where its transport allows ([`Finish`]: a plain
//! client connection), the FIN in the same segment. The session actor decides what an
//! outcome means (e.g. failover on backend loss).

use crate::rt::Timer;
use crate::transport::Finish;
use crate::wire::{self, ClosePayload, Kind, Parsed};
use futures::channel::mpsc;
use futures::task::{waker, ArcWake, AtomicWaker};
use futures::{AsyncRead, AsyncWrite, StreamExt};
use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Payload of the gateway's own keepalive pings; pongs carrying it are not forwarded.
const KEEPALIVE: &[u8] = b"wsgate-keepalive";
/// Reads per direction before the loop yields to the executor (fairness between sessions).
const READS: usize = 16;
/// How long a closing handshake may take before the sockets are dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The per-thread read buffer: large enough that a 64 KiB message usually arrives whole.
const SCRATCH: usize = 256 * 1024;
/// The smallest buffer a session keeps for bytes it could not pass on at once.
const MIN_KEEP: usize = 4096;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
}

/// Which socket of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
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
    Closed(Side, ClosePayload),
    /// A side's socket ended or failed without a close frame.
    Gone(Side, String),
    /// A side broke a protocol rule (its close code: 1009 too big, 1002 protocol).
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

/// The size limits a relay enforces (`limits.max_message_bytes`, `limits.max_frame_bytes`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message: usize,
    pub max_frame: usize,
}

/// Everything a relay keeps across a backend swap (`on_backend_loss: reconnect`): both
/// directions' buffers, parse state and counts.
pub struct RelayState {
    c2b: Dir,
    b2c: Dir,
}

impl Default for RelayState {
    fn default() -> RelayState {
        let l = Limits {
            max_message: 16 << 20,
            max_frame: 16 << 20,
        };
        RelayState::new(0, l)
    }
}

impl RelayState {
    pub fn new(replay_max: usize, limits: Limits) -> RelayState {
        let mut s = RelayState {
            c2b: Dir::new(Side::Client, limits),
            b2c: Dir::new(Side::Backend, limits),
        };
        s.c2b.core.replay_max = replay_max;
        s
    }

    /// Bytes a side sent right after its handshake head, relayed before anything else.
    pub fn preload(&mut self, from: Side, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            let inbox = &mut self.dir_from(from).inbox;
            inbox.w = Window {
                end: bytes.len(),
                ..Window::default()
            };
            inbox.buf = bytes;
        }
    }

    /// The client's first messages as frames, to send to a new backend before anything else.
    pub fn replay(&self) -> &[u8] {
        &self.c2b.core.replay
    }

    /// How many messages [`RelayState::replay`] holds.
    pub fn replayed(&self) -> usize {
        self.c2b.core.replayed
    }

    pub fn counters(&self) -> Counters {
        Counters {
            c2b_msgs: self.c2b.core.msgs,
            b2c_msgs: self.b2c.core.msgs,
            c2b_bytes: self.c2b.core.bytes,
            b2c_bytes: self.b2c.core.bytes,
        }
    }

    /// After a failover to a backend that sent `rest` right after its 101: a client frame
    /// partly written to the lost backend goes whole to the new one (a backend application
    /// only ever sees whole frames, so it never saw that one); the keepalive ping meant for
    /// the lost backend is dropped; what the lost backend sent that was not yet parsed
    /// (a partial frame, part of a fragmented message) is dropped, what is owed to the client
    /// is kept.
    pub fn backend_replaced(&mut self, rest: &[u8]) {
        let c = &mut self.c2b;
        c.core.ping_due = false;
        c.core.dirty = false;
        c.core.heard = true;
        match c.core.oob_kind {
            Oob::Data { .. } => c.core.oob_off = 0,
            _ => c.core.clear_oob(),
        }
        c.inbox.rewind_region(Side::Client);
        let b = &mut self.b2c;
        b.inbox.replace_unparsed(rest);
        b.core.frag = None;
        b.core.closed = false;
        b.core.heard = true;
    }

    fn dir_from(&mut self, from: Side) -> &mut Dir {
        match from {
            Side::Client => &mut self.c2b,
            Side::Backend => &mut self.b2c,
        }
    }
}

/// One direction of the relay: the bytes read from its source that are not passed on yet,
/// and what it knows of the source's frames.
struct Dir {
    inbox: Inbox,
    core: Core,
}

impl Dir {
    fn new(from: Side, limits: Limits) -> Dir {
        Dir {
            inbox: Inbox::default(),
            core: Core {
                from,
                to: from.other(),
                limits,
                oob: Vec::new(),
                oob_off: 0,
                oob_kind: Oob::None,
                frag: None,
                ping_due: false,
                dirty: false,
                region_replay: false,
                heard: true,
                closed: false,
                msgs: 0,
                bytes: 0,
                replay: Vec::new(),
                replayed: 0,
                replay_max: 0,
                #[cfg(feature = "fault-injection")]
                panic_after_first: false,
            },
        }
    }

    /// Whether there is anything to write or parse in the session's own buffer.
    fn has_work(&self) -> bool {
        self.core.oob_off < self.core.oob.len()
            || self.core.ping_due
            || self.inbox.w.fwd < self.inbox.w.end
    }

    /// Frees the session's own buffer when nothing is in it (called on an idle tick).
    fn shrink(&mut self) {
        if self.inbox.w.fwd == self.inbox.w.end && !self.inbox.buf.is_empty() {
            self.inbox = Inbox::default();
        }
    }

    /// Writes what this direction owes its destination (the gateway's frames, then the
    /// frames already parsed), without reading more.
    fn poll_drain<D: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut D,
    ) -> Poll<Result<(), String>> {
        let Dir { inbox, core } = self;
        write_out(cx, &inbox.buf, &mut inbox.w, core, dst)
    }

    /// Bytes read but not parsed (they may hold the peer's close frame).
    fn unparsed(&self) -> Vec<u8> {
        self.inbox.buf[self.inbox.w.pos..self.inbox.w.end].to_vec()
    }
}

/// Offsets into a buffer of read bytes: `[origin, fwd)` complete frames already written
/// (`origin` is the frame boundary the current write began at), `[fwd, pos)` complete frames
/// being written on unchanged, `[pos, end)` not parsed yet.
#[derive(Debug, Default, Clone, Copy)]
struct Window {
    origin: usize,
    fwd: usize,
    pos: usize,
    end: usize,
}

/// The session's own buffer for one direction; empty (no allocation) while the scratch
/// buffer suffices. `buf.len()` is its initialised size, `w.end` how much of it holds data.
#[derive(Default)]
struct Inbox {
    buf: Vec<u8>,
    w: Window,
    /// The size of the incomplete frame at `w.pos`, once its header is known.
    want: usize,
}

impl Inbox {
    /// Keeps bytes of the scratch buffer that could not be passed on: `s` is the scratch from
    /// `w.origin` on.
    fn keep(&mut self, s: &[u8], w: Window) {
        if self.buf.len() < s.len().max(MIN_KEEP) {
            self.buf.resize(s.len().max(MIN_KEEP), 0);
        }
        self.buf[..s.len()].copy_from_slice(s);
        self.w = Window {
            origin: 0,
            fwd: w.fwd - w.origin,
            pos: w.pos - w.origin,
            end: w.end - w.origin,
        };
    }

    /// Before a read: only an incomplete frame is left (at `pos`); moves it to the front and
    /// makes room for the whole of it.
    fn make_room(&mut self) {
        let w = self.w;
        if w.pos > 0 {
            self.buf.copy_within(w.pos..w.end, 0);
            self.w = Window {
                end: w.end - w.pos,
                ..Window::default()
            };
        }
        let need = self.want.max(MIN_KEEP).max(self.w.end + 1);
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
    }

    /// Moves `fwd` back to the start of the frame it is inside (see `backend_replaced`).
    fn rewind_region(&mut self, from: Side) {
        let w = &mut self.w;
        let mut p = w.origin;
        while p < w.fwd {
            match wire::parse(&self.buf[p..w.pos], from, usize::MAX) {
                Parsed::Frame(h) if p + h.total() <= w.fwd => p += h.total(),
                _ => break,
            }
        }
        w.fwd = p;
        w.origin = p;
    }

    /// Drops the bytes not parsed yet and puts `rest` in their place.
    fn replace_unparsed(&mut self, rest: &[u8]) {
        let need = self.w.pos + rest.len();
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
        self.buf[self.w.pos..need].copy_from_slice(rest);
        self.w.end = need;
        self.want = 0;
    }
}

/// What a direction has to write that is not a frame of its source passed on unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Oob {
    None,
    /// The gateway's keepalive ping.
    Keepalive,
    /// A fragmented message, reassembled; `record`: one of the first messages to replay.
    Data {
        record: bool,
    },
    /// The gateway's close frame.
    Close,
}

/// A direction's parse state and counts.
struct Core {
    from: Side,
    to: Side,
    limits: Limits,
    /// Bytes the gateway made for the destination (a ping, a close, a reassembled message),
    /// written at a frame boundary before anything else.
    oob: Vec<u8>,
    oob_off: usize,
    oob_kind: Oob,
    /// A fragmented message being reassembled: its kind and unmasked payload so far.
    frag: Option<(Kind, Vec<u8>)>,
    /// A keepalive ping is to be sent at the next frame boundary.
    ping_due: bool,
    /// Written since the last flush (TLS buffers records until flushed).
    dirty: bool,
    /// The frames being written are one of the first messages to replay.
    region_replay: bool,
    /// Any frame arrived from the source since the last keepalive ping.
    heard: bool,
    closed: bool,
    /// Data messages and payload bytes read from the source.
    msgs: u64,
    bytes: u64,
    /// The first `replay_max` data messages, as frames written to the backend (c2b only).
    replay: Vec<u8>,
    replayed: usize,
    replay_max: usize,
    #[cfg(feature = "fault-injection")]
    panic_after_first: bool,
}

impl Core {
    fn clear_oob(&mut self) {
        self.oob = Vec::new();
        self.oob_off = 0;
        self.oob_kind = Oob::None;
    }

    fn set_oob(&mut self, bytes: Vec<u8>, kind: Oob) {
        self.oob = bytes;
        self.oob_off = 0;
        self.oob_kind = kind;
    }

    /// The frames `[origin, pos)` of a region are written.
    fn region_done(&mut self, frames: &[u8]) {
        if std::mem::take(&mut self.region_replay) {
            self.replay.extend_from_slice(frames);
            self.replayed += 1;
        }
        #[cfg(feature = "fault-injection")]
        if self.panic_after_first && self.msgs > 0 {
            panic!("fault injection: session panic after relaying the first client message");
        }
    }

    fn oob_done(&mut self) {
        if self.oob_kind == (Oob::Data { record: true }) {
            self.replay.extend_from_slice(&self.oob);
            self.replayed += 1;
        }
        self.clear_oob();
    }

    /// Parses the frames at `w.pos`: frames that pass on unchanged extend the region to
    /// write; the others are handled once the region before them is written.
    fn parse_frames(&mut self, data: &[u8], w: &mut Window) -> Next {
        loop {
            let region = w.fwd < w.pos;
            if w.pos == w.end {
                // Everything read is parsed (the usual end of a read): no header to look at.
                return if region {
                    Next::Write
                } else {
                    Next::NeedMore(0)
                };
            }
            let avail = &data[w.pos..w.end];
            let h = match wire::parse(avail, self.from, self.limits.max_frame) {
                Parsed::Frame(h) => h,
                _ if region => return Next::Write,
                Parsed::Incomplete => return Next::NeedMore(0),
                Parsed::Bad(code, why) => return Next::Event(DirEvent::Violation(code, why)),
            };
            let message = match (h.kind, &self.frag) {
                (Kind::Text | Kind::Binary, None) => h.payload,
                (Kind::Continue, Some((_, p))) => p.len() as u64 + h.payload,
                _ => 0,
            };
            if message > self.limits.max_message as u64 {
                if region {
                    return Next::Write;
                }
                let why = "message over max_message_bytes";
                return Next::Event(DirEvent::Violation(1009, why));
            }
            let total = h.total();
            if avail.len() < total {
                return if region {
                    Next::Write
                } else {
                    Next::NeedMore(total)
                };
            }
            let frame = &avail[..total];
            let data_frame = matches!(h.kind, Kind::Text | Kind::Binary);
            let verbatim = match h.kind {
                Kind::Text | Kind::Binary => h.fin && self.frag.is_none(),
                Kind::Ping => true,
                Kind::Pong => !is_keepalive(frame, &h),
                Kind::Close | Kind::Continue => false,
            };
            if verbatim {
                // A message to replay after a failover is a region of its own, recorded once
                // written.
                let record = data_frame && self.replayed < self.replay_max;
                if record && region {
                    return Next::Write;
                }
                self.heard = true;
                if data_frame {
                    self.msgs += 1;
                    self.bytes += h.payload;
                }
                w.pos += total;
                if record {
                    self.region_replay = true;
                    return Next::Write;
                }
                continue;
            }
            if region {
                return Next::Write;
            }
            // At a frame boundary of the destination: frames the gateway handles itself.
            self.heard = true;
            w.pos += total;
            w.fwd = w.pos;
            w.origin = w.pos;
            match (h.kind, self.frag.is_some()) {
                (Kind::Pong, _) => continue, // the answer to our keepalive
                (Kind::Close, _) => {
                    let (p, n) = wire::control_payload(frame, &h);
                    self.closed = true;
                    return Next::Event(DirEvent::Closed(ClosePayload::from_bytes(&p[..n])));
                }
                (Kind::Text | Kind::Binary, true) => {
                    let why = "a new message inside a fragmented one";
                    return Next::Event(DirEvent::Violation(1002, why));
                }
                (Kind::Continue, false) => {
                    let why = "a continuation frame outside a fragmented message";
                    return Next::Event(DirEvent::Violation(1002, why));
                }
                _ => {}
            }
            let (kind, payload) = self.frag.get_or_insert_with(|| (h.kind, Vec::new()));
            let at = payload.len();
            payload.extend_from_slice(&frame[h.len..]);
            if let Some(m) = h.mask {
                wire::unmask(&mut payload[at..], m);
            }
            if h.fin {
                let m = wire::message(*kind, payload, self.to);
                self.msgs += 1;
                self.bytes += payload.len() as u64;
                self.frag = None;
                let record = self.replayed < self.replay_max;
                self.set_oob(m, Oob::Data { record });
                return Next::Write;
            }
        }
    }
}

/// Whether a pong carries the gateway's keepalive payload.
fn is_keepalive(frame: &[u8], h: &wire::Head) -> bool {
    let (p, n) = wire::control_payload(frame, h);
    &p[..n] == KEEPALIVE
}

enum Next {
    /// There is a region or the gateway's bytes to write first.
    Write,
    /// The frame at `pos` is incomplete (its size, if its header is complete).
    NeedMore(usize),
    Event(DirEvent),
}

enum Pump {
    /// Everything complete was passed on; more bytes are needed (the incomplete frame's size).
    NeedMore(usize),
    /// The destination pushed back; its write waker is registered.
    Blocked,
    Event(DirEvent),
}

#[derive(Debug)]
enum DirEvent {
    Closed(ClosePayload),
    ReadFailed(String),
    Eof,
    WriteFailed(String),
    Violation(u16, &'static str),
}

/// Writes the gateway's bytes, then the region, then flushes: `Ready(Ok)` when everything
/// this direction owes its destination is written.
#[inline]
fn write_out<D: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    data: &[u8],
    w: &mut Window,
    d: &mut Core,
    dst: &mut D,
) -> Poll<Result<(), String>> {
    loop {
        let (bytes, oob) = if d.oob_off < d.oob.len() {
            (&d.oob[d.oob_off..], true)
        } else if w.fwd < w.pos {
            (&data[w.fwd..w.pos], false)
        } else if d.dirty {
            match Pin::new(&mut *dst).poll_flush(cx) {
                Poll::Ready(Ok(())) => d.dirty = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.to_string())),
                Poll::Pending => return Poll::Pending,
            }
            return Poll::Ready(Ok(()));
        } else {
            return Poll::Ready(Ok(()));
        };
        let n = match Pin::new(&mut *dst).poll_write(cx, bytes) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err("connection closed".into())),
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.to_string())),
            Poll::Pending => return Poll::Pending,
        };
        d.dirty = true;
        if oob {
            d.oob_off += n;
            if d.oob_off == d.oob.len() {
                d.oob_done();
            }
        } else {
            w.fwd += n;
            if w.fwd == w.pos {
                d.region_done(&data[w.origin..w.pos]);
                w.origin = w.pos;
            }
        }
    }
}

/// Passes on everything complete in `data[w.pos..w.end]`, writing as it goes.
fn pump<D: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    data: &[u8],
    w: &mut Window,
    d: &mut Core,
    dst: &mut D,
) -> Pump {
    loop {
        match write_out(cx, data, w, d, dst) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Pump::Event(DirEvent::WriteFailed(e)),
            Poll::Pending => return Pump::Blocked,
        }
        if std::mem::take(&mut d.ping_due) {
            d.set_oob(wire::ping(KEEPALIVE, d.to), Oob::Keepalive);
            continue;
        }
        match d.parse_frames(data, w) {
            Next::Write => continue,
            Next::NeedMore(total) => return Pump::NeedMore(total),
            Next::Event(ev) => return Pump::Event(ev),
        }
    }
}

fn read<S: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    src: &mut S,
    buf: &mut [u8],
) -> Poll<Result<usize, DirEvent>> {
    match Pin::new(src).poll_read(cx, buf) {
        Poll::Ready(Ok(0)) => Poll::Ready(Err(DirEvent::Eof)),
        Poll::Ready(Ok(n)) => Poll::Ready(Ok(n)),
        Poll::Ready(Err(e)) => Poll::Ready(Err(DirEvent::ReadFailed(e.to_string()))),
        Poll::Pending => Poll::Pending,
    }
}

/// Polls one direction: reads from `src` and passes complete frames on to `dst` until `src`
/// has nothing more, `dst` pushes back, or the read budget is spent.
fn poll_dir<S, D>(cx: &mut Context<'_>, src: &mut S, dst: &mut D, dir: &mut Dir) -> Poll<DirEvent>
where
    S: AsyncRead + Unpin,
    D: AsyncWrite + Unpin,
{
    let mut reads = READS;
    loop {
        if dir.has_work() {
            let Dir { inbox, core } = &mut *dir;
            match pump(cx, &inbox.buf, &mut inbox.w, core, dst) {
                Pump::NeedMore(total) => inbox.want = total,
                Pump::Blocked => return Poll::Pending,
                Pump::Event(ev) => return Poll::Ready(ev),
            }
        }
        if reads == 0 {
            // Let the other direction and other sessions run; come back at once.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        reads -= 1;
        let Dir { inbox, core } = &mut *dir;
        if inbox.w.fwd == inbox.w.end && inbox.buf.len() > SCRATCH {
            // An empty buffer grown past the scratch's size for one large frame goes back at
            // once, not at the next idle tick: a busy session must not keep it.
            *inbox = Inbox::default();
        }
        if !inbox.buf.is_empty() {
            // This direction has a buffer of its own (a frame is incomplete, or it carried
            // large frames recently): read into it, so a large frame is copied only once.
            inbox.make_room();
            let end = inbox.w.end;
            match read(cx, src, &mut inbox.buf[end..]) {
                Poll::Ready(Ok(n)) => inbox.w.end += n,
                Poll::Ready(Err(ev)) => return Poll::Ready(ev),
                Poll::Pending => return Poll::Pending,
            }
            continue;
        }
        let step = SCRATCH_BUF.with(|s| {
            let mut s = s.borrow_mut();
            let n = match read(cx, src, &mut s[..]) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(ev)) => return Pump::Event(ev),
                Poll::Pending => return Pump::Blocked,
            };
            let mut w = Window {
                end: n,
                ..Window::default()
            };
            let step = pump(cx, &s[..n], &mut w, core, dst);
            if w.origin < w.end {
                inbox.keep(&s[w.origin..w.end], w);
            }
            step
        });
        match step {
            Pump::NeedMore(total) => inbox.want = total,
            Pump::Blocked => return Poll::Pending,
            Pump::Event(ev) => return Poll::Ready(ev),
        }
    }
}

fn dir_outcome(src: Side, ev: DirEvent) -> Outcome {
    match ev {
        DirEvent::Closed(p) => Outcome::Closed(src, p),
        DirEvent::ReadFailed(e) => Outcome::Gone(src, e),
        DirEvent::Eof => Outcome::Gone(src, "connection closed without a close frame".into()),
        DirEvent::WriteFailed(e) => Outcome::Gone(src.other(), e),
        DirEvent::Violation(code, why) => Outcome::Violation(src, code, why.to_string()),
    }
}

/// The waker of one of the relay loop's event sources (a direction's sockets, the control
/// channel, the tick timer): it remembers that its source became ready, then wakes the
/// session task, whose waker all of them share. A wakeup then polls only the sources that
/// are ready: no read is attempted on a socket that has nothing (bench/profile.sh: polling
/// both directions on every wakeup made most reads return EAGAIN), and the channel and the
/// timer are not polled for every message.
struct Flag {
    ready: AtomicBool,
    task: Arc<AtomicWaker>,
}

impl ArcWake for Flag {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.ready.store(true, Ordering::Release);
        arc_self.task.wake();
    }
}

impl Flag {
    /// A flag that starts raised (its source is polled once, to register), and its waker.
    fn new(task: &Arc<AtomicWaker>) -> (Arc<Flag>, std::task::Waker) {
        let f = Arc::new(Flag {
            ready: AtomicBool::new(true),
            task: Arc::clone(task),
        });
        let w = waker(Arc::clone(&f));
        (f, w)
    }

    fn take(&self) -> bool {
        self.ready.swap(false, Ordering::AcqRel)
    }

    fn raise(&self) {
        self.ready.store(true, Ordering::Release);
    }
}

/// Test-only fault injection: panic after relaying the first client message.
#[derive(Default)]
pub struct Fault {
    #[cfg(feature = "fault-injection")]
    pub panic_after_first: bool,
}

/// Relays until something ends the session. Counts live in `state` (so a caller can flush
/// them even after a panic) and are handed to `on_tick` each tick for the shared metrics.
pub async fn relay<C, B>(
    client: &mut C,
    backend: &mut B,
    control: &mut mpsc::UnboundedReceiver<Control>,
    timing: Timing,
    state: &mut RelayState,
    #[allow(unused_variables)] fault: &Fault,
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
    #[cfg(feature = "fault-injection")]
    {
        c2b.core.panic_after_first = fault.panic_after_first;
    }
    let start = Instant::now();
    let mut last_data = start;
    let mut data_seen = c2b.core.msgs + b2c.core.msgs;
    let mut next_ping = start + timing.ping_interval;
    let mut pinged = false;

    let task = Arc::new(AtomicWaker::new());
    let (c2b_flag, c2b_waker) = Flag::new(&task);
    let (b2c_flag, b2c_waker) = Flag::new(&task);
    let (ctl_flag, ctl_waker) = Flag::new(&task);
    let (tick_flag, tick_waker) = Flag::new(&task);
    poll_fn(|cx| loop {
        task.register(cx.waker());
        if ctl_flag.take() {
            match control.poll_next_unpin(&mut Context::from_waker(&ctl_waker)) {
                Poll::Ready(Some(c)) => return Poll::Ready(Outcome::Control(c)),
                Poll::Ready(None) => return Poll::Ready(Outcome::ControlLost),
                Poll::Pending => {}
            }
        }
        // Backend to client first: when a backend's FIN and client data arrive in the same
        // wakeup, the loss is seen before more client messages are written to a dead socket.
        if b2c_flag.take() {
            let mut dcx = Context::from_waker(&b2c_waker);
            if let Poll::Ready(ev) = poll_dir(&mut dcx, backend, client, b2c) {
                return Poll::Ready(dir_outcome(Side::Backend, ev));
            }
        }
        if c2b_flag.take() {
            let mut dcx = Context::from_waker(&c2b_waker);
            if let Poll::Ready(ev) = poll_dir(&mut dcx, client, backend, c2b) {
                return Poll::Ready(dir_outcome(Side::Client, ev));
            }
        }
        if !tick_flag.take()
            || Pin::new(&mut timer)
                .poll(&mut Context::from_waker(&tick_waker))
                .is_pending()
        {
            return Poll::Pending;
        }
        // Tick: idle and keepalive bookkeeping, then re-arm and poll again to register.
        let now = Instant::now();
        let counters = Counters {
            c2b_msgs: c2b.core.msgs,
            b2c_msgs: b2c.core.msgs,
            c2b_bytes: c2b.core.bytes,
            b2c_bytes: b2c.core.bytes,
        };
        on_tick(&counters);
        let seen = c2b.core.msgs + b2c.core.msgs;
        if seen != data_seen {
            data_seen = seen;
            last_data = now;
        } else {
            // Quiet for a tick: give the buffers back.
            c2b.shrink();
            b2c.shrink();
            if now.duration_since(last_data) >= timing.idle {
                return Poll::Ready(Outcome::Idle);
            }
        }
        if now >= next_ping {
            if pinged {
                if !c2b.core.heard {
                    return Poll::Ready(Outcome::Unresponsive(Side::Client));
                }
                if !b2c.core.heard {
                    return Poll::Ready(Outcome::Unresponsive(Side::Backend));
                }
            }
            c2b.core.heard = false;
            b2c.core.heard = false;
            pinged = true;
            // To the backend: queued on the client→backend direction, and vice versa.
            c2b.core.ping_due = true;
            b2c.core.ping_due = true;
            c2b_flag.raise();
            b2c_flag.raise();
            next_ping = now + timing.ping_interval;
        }
        timer.set_after(tick);
        tick_flag.raise(); // poll the re-armed timer once, to register it
    })
    .await
}

/// How one side's socket is closed once the relay is over.
#[derive(Debug, Clone)]
pub enum Closing {
    /// Send this close frame and wait, bounded, for the peer's.
    Send(ClosePayload),
    /// The side sent its own close frame: answer it with this one.
    Answer(ClosePayload),
}

/// The close frames of a finished relay, both sides at once, each bounded by `within`. What
/// each direction had already parsed for a side is written to it before its close frame.
/// `None` for a side whose socket is gone.
pub async fn close_both<C, B>(
    client: Option<(&mut C, Closing)>,
    backend: Option<(&mut B, Closing)>,
    state: &mut RelayState,
    within: Duration,
) where
    C: AsyncRead + AsyncWrite + Finish + Unpin,
    B: AsyncRead + AsyncWrite + Finish + Unpin,
{
    let RelayState { c2b, b2c } = state;
    // Each side's own answer may already be among the bytes read from it.
    let (from_client, from_backend) = (c2b.unparsed(), b2c.unparsed());
    let c = async {
        if let Some((io, how)) = client {
            close_side(io, Side::Client, b2c, from_client, how, within).await;
        }
    };
    let b = async {
        if let Some((io, how)) = backend {
            close_side(io, Side::Backend, c2b, from_backend, how, within).await;
        }
    };
    futures::join!(c, b);
}

async fn close_side<S: AsyncRead + AsyncWrite + Finish + Unpin>(
    io: &mut S,
    side: Side,
    toward: &mut Dir,
    read: Vec<u8>,
    how: Closing,
    within: Duration,
) {
    let _ = crate::rt::timeout(within, async {
        if poll_fn(|cx| toward.poll_drain(cx, io)).await.is_err() {
            return;
        }
        let (payload, wait) = match how {
            Closing::Send(p) => (p, true),
            Closing::Answer(p) => (p, false),
        };
        if !wait {
            // The answer completes the handshake: it is the last thing this side is sent.
            io.hold_for_fin();
        }
        toward.core.set_oob(payload.frame(side), Oob::Close);
        if poll_fn(|cx| toward.poll_drain(cx, io)).await.is_err() {
            return;
        }
        if wait {
            wait_for_close(io, side, read).await;
        } else {
            io.finish();
        }
    })
    .await;
}

/// Reads frames from `side` (after `seen`, bytes already read from it) until its close
/// frame, the end of the socket, or a protocol error. Payloads are skipped, not buffered.
async fn wait_for_close<S: AsyncRead + Unpin>(io: &mut S, side: Side, mut seen: Vec<u8>) {
    use futures::AsyncReadExt;
    // Read straight into `seen`, a step at a time: its capacity is reused, so each read
    // zero-fills only its step (a zeroed 2 KiB chunk was a session's one calloc). The
    // first step fits the usual read, a close frame (at most 139 bytes); steps double
    // while reads fill them (frames still in flight before the close), up to 16 KiB.
    let mut step = 256;
    let mut skip = 0usize;
    loop {
        let mut at = 0;
        loop {
            let k = skip.min(seen.len() - at);
            at += k;
            skip -= k;
            if skip > 0 {
                break;
            }
            match wire::parse(&seen[at..], side, usize::MAX) {
                Parsed::Frame(h) if h.kind == Kind::Close => return,
                Parsed::Frame(h) => skip = h.total(),
                Parsed::Incomplete => break,
                Parsed::Bad(..) => return,
            }
        }
        seen.drain(..at);
        let len = seen.len();
        seen.resize(len + step, 0);
        match io.read(&mut seen[len..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                seen.truncate(len + n);
                if n == step {
                    step = (step * 2).min(16 * 1024);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A source that hands out `chunks` one per read, with a `Pending` before every other one.
    struct Chunks {
        chunks: Vec<Vec<u8>>,
        next: usize,
        stall: bool,
    }

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<std::io::Result<usize>> {
            if std::mem::take(&mut self.stall) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.stall = true;
            let next = self.next;
            let Some(c) = self.chunks.get_mut(next) else {
                return Poll::Ready(Ok(0));
            };
            let n = c.len().min(buf.len());
            buf[..n].copy_from_slice(&c[..n]);
            c.drain(..n);
            if c.is_empty() {
                self.next += 1;
            }
            Poll::Ready(Ok(n))
        }
    }

    /// A destination that takes at most `step` bytes a write and pushes back every third one.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        calls: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.calls += 1;
            if self.calls.is_multiple_of(3) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A client's frame: masked, with a fixed key (tungstenite's encoder).
    fn client_frame(op: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        use async_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        use async_tungstenite::tungstenite::protocol::frame::Frame;
        let mut f = match op {
            0x9 => Frame::ping(payload.to_vec()),
            0x0 => Frame::message(payload.to_vec(), OpCode::Data(Data::Continue), fin),
            0x1 => Frame::message(payload.to_vec(), OpCode::Data(Data::Text), fin),
            0x2 => Frame::message(payload.to_vec(), OpCode::Data(Data::Binary), fin),
            other => panic!("no test frames with opcode {other}"),
        };
        f.header_mut().mask = Some([0x11, 0x22, 0x33, 0x44]);
        let mut out = Vec::new();
        f.format(&mut out).unwrap();
        out
    }

    /// The messages and pings in a stream of frames a backend receives.
    fn decode(mut bytes: &[u8]) -> Vec<(Kind, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let Parsed::Frame(h) = wire::parse(bytes, Side::Client, usize::MAX) else {
                panic!("garbage in the output: {bytes:?}")
            };
            assert!(h.fin, "the gateway sends every message as one frame");
            let mut p = bytes[h.len..h.total()].to_vec();
            wire::unmask(&mut p, h.mask.unwrap_or_default());
            out.push((h.kind, p));
            bytes = &bytes[h.total()..];
        }
        out
    }

    /// Polls one direction (with a no-op waker: the mocks never need a real wakeup) until it
    /// ends, at most `polls` times.
    fn drive(src: &mut Chunks, dst: &mut Trickle, dir: &mut Dir, polls: usize) -> Option<DirEvent> {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        (0..polls).find_map(|_| match poll_dir(&mut cx, src, dst, dir) {
            Poll::Ready(ev) => Some(ev),
            Poll::Pending => None,
        })
    }

    /// `wait_for_close` skips data frames that span reads (and the bytes already read) and
    /// stops at the close frame, without reading past it.
    #[test]
    fn wait_for_close_skips_frames_across_reads_and_stops_at_the_close() {
        struct Watch(Chunks, bool);
        impl AsyncRead for Watch {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut [u8],
            ) -> Poll<std::io::Result<usize>> {
                let r = Pin::new(&mut self.0).poll_read(cx, buf);
                if matches!(r, Poll::Ready(Ok(0))) {
                    self.1 = true; // read past the end: the close was missed
                }
                r
            }
        }
        let mut bytes = client_frame(0x2, true, &[7u8; 3000]);
        bytes.extend(client_frame(0x9, true, b"ping"));
        bytes.extend(client_frame(0x1, true, &[b'a'; 1500]));
        bytes.extend(ClosePayload::new(1000, "bye").frame(Side::Backend));
        let after = client_frame(0x2, true, &[9u8; 100]); // sent after the close: not read
        for first in [0, 10, 3010] {
            let seen = bytes[..first].to_vec();
            let mut chunks: Vec<Vec<u8>> = bytes[first..].chunks(700).map(<[u8]>::to_vec).collect();
            let n = chunks.len();
            chunks.push(after.clone());
            let mut io = Watch(
                Chunks {
                    chunks,
                    next: 0,
                    stall: false,
                },
                false,
            );
            futures::executor::block_on(wait_for_close(&mut io, Side::Client, seen));
            assert_eq!((io.0.next, io.1), (n, false), "first {first}");
        }
    }

    /// One message: kind (text, binary, or a client ping), payload, and how many fragments.
    fn message() -> impl Strategy<Value = (u8, Vec<u8>, usize)> {
        (
            0u8..3,
            prop::collection::vec(any::<u8>(), 0..3000),
            1usize..4,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Whatever the read boundaries and however the destination trickles, the backend
        /// gets every message and ping once, in order, whole, and the counts add up.
        #[test]
        fn frames_pass_whole_and_in_order(
            msgs in prop::collection::vec(message(), 1..12),
            cuts in prop::collection::vec(1usize..5000, 1..40),
            step in 1usize..9000,
        ) {
            let mut stream = Vec::new();
            let mut want = Vec::new();
            let mut payload_bytes = 0u64;
            let mut data_msgs = 0u64;
            for (k, payload, parts) in &msgs {
                if *k == 2 {
                    let p = &payload[..payload.len().min(125)];
                    stream.extend(client_frame(0x9, true, p));
                    want.push((Kind::Ping, p.to_vec()));
                    continue;
                }
                let (op, kind) = if *k == 0 { (0x1, Kind::Text) } else { (0x2, Kind::Binary) };
                let size = payload.len().div_ceil(*parts).max(1);
                let pieces: Vec<&[u8]> = if payload.is_empty() { vec![&[][..]] } else { payload.chunks(size).collect() };
                for (i, piece) in pieces.iter().enumerate() {
                    let first = if i == 0 { op } else { 0x0 };
                    stream.extend(client_frame(first, i + 1 == pieces.len(), piece));
                    if i == 0 && pieces.len() > 1 {
                        // A client ping in the middle of a fragmented message goes on first.
                        stream.extend(client_frame(0x9, true, b"mid"));
                        want.push((Kind::Ping, b"mid".to_vec()));
                    }
                }
                want.push((kind, payload.clone()));
                payload_bytes += payload.len() as u64;
                data_msgs += 1;
            }
            let mut chunks = Vec::new();
            let mut rest = &stream[..];
            for c in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let n = (*c).min(rest.len());
                chunks.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
            let mut src = Chunks { chunks, next: 0, stall: false };
            let mut dst = Trickle { out: Vec::new(), step, calls: 0 };
            let limits = Limits { max_message: 1 << 20, max_frame: 1 << 20 };
            let mut dir = Dir::new(Side::Client, limits);
            let end = drive(&mut src, &mut dst, &mut dir, 100_000);
            prop_assert!(matches!(end, Some(DirEvent::Eof)), "ended with {end:?}");
            let got = decode(&dst.out);
            // Reassembled messages go out when complete, so a ping sent between fragments
            // may come first: compare pings and messages each in their own order.
            type Frames = Vec<(Kind, Vec<u8>)>;
            let split = |v: &Frames| -> (Frames, Frames) {
                v.iter().cloned().partition(|(k, _)| *k == Kind::Ping)
            };
            prop_assert_eq!(split(&got), split(&want));
            prop_assert_eq!((dir.core.msgs, dir.core.bytes), (data_msgs, payload_bytes));
        }
    }

    #[test]
    fn a_frame_over_the_limit_ends_the_direction_before_it_is_buffered() {
        let mut head = vec![0x82u8, 0x80 | 127];
        head.extend_from_slice(&(10u64 << 20).to_be_bytes());
        head.extend_from_slice(&[1, 2, 3, 4]);
        let mut src = Chunks {
            chunks: vec![head],
            next: 0,
            stall: false,
        };
        let mut dst = Trickle {
            out: Vec::new(),
            step: 100,
            calls: 0,
        };
        let limits = Limits {
            max_message: 1 << 20,
            max_frame: 8 << 20,
        };
        let mut dir = Dir::new(Side::Client, limits);
        let end = drive(&mut src, &mut dst, &mut dir, 10);
        assert!(matches!(end, Some(DirEvent::Violation(1009, _))), "{end:?}");
        assert!(
            dir.inbox.buf.len() < 1 << 20,
            "the frame must not be buffered"
        );
        assert!(dst.out.is_empty());
    }

    #[test]
    fn a_buffer_grown_for_one_large_frame_is_given_back_when_empty() {
        let big = client_frame(0x2, true, &vec![9; SCRATCH + 1000]);
        let small = client_frame(0x1, true, b"after");
        let mut src = Chunks {
            chunks: vec![big[..1000].to_vec(), big[1000..].to_vec(), small],
            next: 0,
            stall: false,
        };
        let mut dst = Trickle {
            out: Vec::new(),
            step: usize::MAX,
            calls: 1,
        };
        let limits = Limits {
            max_message: 1 << 20,
            max_frame: 1 << 20,
        };
        let mut dir = Dir::new(Side::Client, limits);
        let end = drive(&mut src, &mut dst, &mut dir, 1000);
        assert!(matches!(end, Some(DirEvent::Eof)), "{end:?}");
        assert_eq!(decode(&dst.out).len(), 2);
        // (A small buffer may stay until the idle tick, for a write that pushed back.)
        assert!(
            dir.inbox.buf.len() <= MIN_KEEP,
            "{} bytes kept",
            dir.inbox.buf.len()
        );
    }

    #[test]
    fn failover_resends_a_partly_written_frame_whole() {
        let a = client_frame(0x2, true, &[1; 100]);
        let b = client_frame(0x2, true, &[2; 100]);
        let mut inbox = Inbox::default();
        let mut bytes = a.clone();
        bytes.extend_from_slice(&b);
        let w = Window {
            origin: 0,
            fwd: a.len() + 10,
            pos: bytes.len(),
            end: bytes.len(),
        };
        inbox.keep(&bytes, w);
        inbox.rewind_region(Side::Client);
        assert_eq!(
            (inbox.w.origin, inbox.w.fwd),
            (a.len(), a.len()),
            "b goes whole"
        );
    }
}
