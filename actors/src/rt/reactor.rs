//! Edge-triggered readiness for the gateway's TCP sockets, connections and listeners
//! (Linux epoll).
//!
//! async-io registers sockets one-shot: every wait for a readiness event re-arms the socket
//! with an `epoll_ctl`, one per message and direction (bench/profile.sh: 2.4 per echoed
//! message, about a quarter of the relay's syscall time; nginx makes none). Here every
//! socket is registered once, edge-triggered, for reading and writing, in an epoll set of
//! our own. That set's descriptor is itself a source in async-io's reactor, so the executor
//! and its reactor stay async-std's: one dispatch task waits for the set to become readable,
//! takes every ready event with one `epoll_wait` (no timeout) and wakes the tasks waiting on
//! them. Per batch of events that costs the set's one-shot re-arm and one `epoll_wait`,
//! whatever the number of sockets in it.
//!
//! A [`Readiness`] is a flag set by the dispatcher and consumed by the socket's user: a read
//! or write is attempted after consuming it, so an event arriving during the attempt sets it
//! again and is never lost (the edge-triggered rule: wait only after `EAGAIN`, or after a
//! read that came back short, which emptied the receive queue).

use futures::task::AtomicWaker;
use rustix::event::epoll;
use std::io;
use std::mem::MaybeUninit;
use std::net;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll};

/// Events taken per `epoll_wait`; more are taken on the next round at once.
const BATCH: usize = 256;

/// One direction's readiness: set by the dispatcher on an event, consumed by the user.
pub struct Readiness {
    ready: AtomicBool,
    waker: AtomicWaker,
}

impl Readiness {
    fn new() -> Readiness {
        Readiness {
            ready: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    fn set(&self) {
        self.ready.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Consumes a pending event; `true` if there was one.
    pub fn take(&self) -> bool {
        self.ready.swap(false, Ordering::AcqRel)
    }

    /// Attempts `op` until it does not fail with `WouldBlock`, waiting for this direction's
    /// next event in between (the event is consumed before each attempt).
    pub fn poll_io<T>(
        &self,
        cx: &mut Context<'_>,
        mut op: impl FnMut() -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            self.take();
            match op() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                res => return Poll::Ready(res),
            }
        }
    }

    /// `Ready` (the event consumed) once an event is pending; otherwise registers the waker.
    pub fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.take() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.take() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// A registered socket (a connection, or a listener: `T`). Its socket leaves the set when it
/// closes (the kernel drops a descriptor's registrations with its last close, as nginx
/// relies on: no `EPOLL_CTL_DEL`); dropping it frees its slot, and the slot's generation, in
/// every event's data, keeps an event that was already taken for it from reaching the slot's
/// next owner.
pub struct Source<T = net::TcpStream> {
    pub io: T,
    pub read: Readiness,
    pub write: Readiness,
    /// The peer's FIN (or an error) has been reported. It is sticky: arriving with the last
    /// data, it brings no event of its own after the read that takes that data, so a read
    /// must not wait for one.
    pub hup: AtomicBool,
    key: usize,
}

/// What the dispatcher sees of a source, whatever its socket type.
trait Events: Send + Sync {
    fn read(&self) -> &Readiness;
    fn write(&self) -> &Readiness;
    fn hup(&self) -> &AtomicBool;
}

impl<T: Send + Sync> Events for Source<T> {
    fn read(&self) -> &Readiness {
        &self.read
    }
    fn write(&self) -> &Readiness {
        &self.write
    }
    fn hup(&self) -> &AtomicBool {
        &self.hup
    }
}

impl<T: AsFd + Send + Sync + 'static> Source<T> {
    /// Registers `io`, which must be non-blocking, for edge-triggered read and write events.
    pub fn new(io: T) -> io::Result<Arc<Source<T>>> {
        let r = reactor()?;
        let (src, tag) = {
            let mut slots = r.slots();
            let key = slots.free.pop().unwrap_or(slots.list.len());
            if key == slots.list.len() {
                slots.list.push((Weak::<Source>::new(), 0));
            }
            let src = Arc::new(Source {
                io,
                read: Readiness::new(),
                write: Readiness::new(),
                hup: AtomicBool::new(false),
                key,
            });
            let slot = &mut slots.list[key];
            slot.0 = Arc::downgrade(&src) as Weak<dyn Events>;
            slot.1 = slot.1.wrapping_add(1);
            (src, event_data(key, slot.1))
        };
        let flags = epoll::EventFlags::IN
            | epoll::EventFlags::OUT
            | epoll::EventFlags::RDHUP
            | epoll::EventFlags::ET;
        epoll::add(&r.epoll, &src.io, epoll::EventData::new_u64(tag), flags)?;
        Ok(src)
    }
}

/// An event's data: the slot in the low 32 bits, its generation in the high 32.
fn event_data(key: usize, generation: u32) -> u64 {
    (key as u64 & 0xffff_ffff) | (u64::from(generation) << 32)
}

impl<T> Drop for Source<T> {
    fn drop(&mut self) {
        if let Some(r) = REACTOR.get() {
            let mut slots = r.slots();
            slots.list[self.key].0 = Weak::<Source>::new();
            slots.free.push(self.key);
        }
    }
}

#[derive(Default)]
struct Slots {
    /// Per slot: its source, and its generation (bumped each time the slot is taken).
    list: Vec<(Weak<dyn Events>, u32)>,
    free: Vec<usize>,
}

struct Reactor {
    epoll: OwnedFd,
    slots: Mutex<Slots>,
}

impl Reactor {
    fn slots(&self) -> MutexGuard<'_, Slots> {
        // A panic while holding the lock cannot leave the table half-written.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

static REACTOR: OnceLock<Reactor> = OnceLock::new();

/// The process's set, created (and its dispatch task started) on first use.
fn reactor() -> io::Result<&'static Reactor> {
    if let Some(r) = REACTOR.get() {
        return Ok(r);
    }
    let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    let outer = async_io::Async::new(epoll.try_clone()?)?;
    let mut started = false;
    let r = REACTOR.get_or_init(|| {
        started = true;
        Reactor {
            epoll,
            slots: Mutex::new(Slots::default()),
        }
    });
    if started {
        super::spawn(dispatch(r, outer));
    }
    Ok(r)
}

/// Waits for the set to have events, then wakes the sockets they are for.
async fn dispatch(r: &'static Reactor, outer: async_io::Async<OwnedFd>) {
    let mut woken: Vec<(Arc<dyn Events>, epoll::EventFlags)> = Vec::with_capacity(BATCH);
    loop {
        if let Err(e) = outer.readable().await {
            log::error!("edge-triggered reactor: waiting on the epoll set failed: {e}");
            super::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        }
        // While a batch wakes sessions, their peers answer: look again once they have run,
        // and go back to the reactor only when a look finds nothing.
        while take_events(r, &mut woken) > 0 {
            use epoll::EventFlags as F;
            for (src, flags) in woken.drain(..) {
                if flags.intersects(F::RDHUP | F::HUP | F::ERR) {
                    src.hup().store(true, Ordering::Release);
                }
                if flags.intersects(F::IN | F::PRI | F::RDHUP | F::HUP | F::ERR) {
                    src.read().set();
                }
                if flags.intersects(F::OUT | F::HUP | F::ERR) {
                    src.write().set();
                }
            }
            super::yield_now().await;
        }
    }
}

/// One `epoll_wait` without a timeout: the sources of the ready events, upgraded under the
/// lock (they are woken and dropped outside it, since a drop takes the lock).
fn take_events(r: &Reactor, woken: &mut Vec<(Arc<dyn Events>, epoll::EventFlags)>) -> usize {
    let mut buf = [const { MaybeUninit::<epoll::Event>::uninit() }; BATCH];
    let none = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let events = match epoll::wait(&r.epoll, &mut buf[..], Some(&none)) {
        Ok((events, _)) => events,
        Err(rustix::io::Errno::INTR) => return 1, // look again
        Err(e) => {
            log::error!("edge-triggered reactor: epoll_wait failed: {e}");
            return 0;
        }
    };
    let slots = r.slots();
    for ev in events.iter() {
        let data = ev.data.u64();
        let (key, generation) = ((data & 0xffff_ffff) as usize, (data >> 32) as u32);
        match slots.list.get(key) {
            Some((src, g)) if *g == generation => {
                if let Some(src) = src.upgrade() {
                    woken.push((src, ev.flags));
                }
            }
            _ => {} // for a socket that has closed since, or a slot taken again
        }
    }
    events.len()
}

#[cfg(test)]
mod tests {
    use crate::rt::{self, TcpListener, TcpStream};
    use futures::{AsyncReadExt, AsyncWriteExt};
    use std::io::Write;
    use std::time::Duration;

    async fn pair() -> (TcpStream, std::net::TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().await.unwrap();
        (s, peer)
    }

    /// The edge-triggered trap: data and the peer's FIN arrive before the first read, so
    /// they bring one event between them. The read that takes the data comes back short; the
    /// next must see the end of stream at once instead of waiting for an event that never
    /// comes.
    #[test]
    fn end_of_stream_that_came_with_the_last_data_is_not_missed() {
        rt::block_on(async {
            let (mut s, mut peer) = pair().await;
            peer.write_all(b"last words").unwrap();
            peer.shutdown(std::net::Shutdown::Write).unwrap();
            drop(peer);
            rt::sleep(Duration::from_millis(50)).await; // both have arrived
            let mut buf = [0u8; 64];
            let n = rt::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            assert_eq!(n.ok().and_then(Result::ok), Some(10));
            let eof = rt::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            assert_eq!(
                eof.ok().and_then(Result::ok),
                Some(0),
                "end of stream missed"
            );
        });
    }

    /// 200 connections at once, 20 round trips each, through one set: every byte back, in
    /// order (batches of events from many sockets; slots reused as connections close).
    #[test]
    fn many_connections_round_trip_through_one_set() {
        rt::block_on(async {
            let l = TcpListener::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let addr = l.local_addr().unwrap();
            let server = rt::spawn(async move {
                for _ in 0..200 {
                    let (mut s, _) = l.accept().await.unwrap();
                    rt::spawn(async move {
                        let mut buf = [0u8; 256];
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => s.write_all(&buf[..n]).await.unwrap(),
                            }
                        }
                    });
                }
            });
            let clients: Vec<_> = (0..200u32)
                .map(|i| {
                    rt::spawn(async move {
                        let mut c = TcpStream::connect(addr).await.unwrap();
                        for k in 0..20u32 {
                            let msg = format!("{i}:{k};");
                            c.write_all(msg.as_bytes()).await.unwrap();
                            let mut back = vec![0u8; msg.len()];
                            c.read_exact(&mut back).await.unwrap();
                            assert_eq!(back, msg.as_bytes());
                        }
                    })
                })
                .collect();
            let all = futures::future::join_all(clients);
            assert!(
                rt::timeout(Duration::from_secs(30), all).await.is_ok(),
                "round trips stalled"
            );
            server.await;
        });
    }
}
