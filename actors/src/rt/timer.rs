//! The gateway's timers: a hashed timing wheel of coarse ticks, driven by one async-io timer.
//!
//! Every session arms a few timers (the handshake deadline, a dial's `connect_ms`, the
//! relay's tick) and nearly all of them are cancelled, not fired. An async-io timer costs an
//! insert and a remove in the reactor's `BTreeMap` plus an eventfd write to wake the reactor
//! for each insert (bench/profile.sh: ~1.5 k instructions and one `write` + `read` per timer),
//! and every reactor wait splits that map. Here arming or cancelling a timer is a slot-list
//! link or unlink under an uncontended lock, with no allocation once the slab has grown;
//! only the earliest deadline is an async-io timer, re-armed by a driver task when it moves
//! earlier, or when it fires.
//!
//! Deadlines are rounded *up* to a [`TICK`] (so a timer never fires early, and at most one
//! tick late): gateway timeouts are milliseconds to minutes, and the coarse tick bounds the
//! driver's wakeups, however many timers are due, to one per tick.

use futures::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The wheel's resolution.
pub const TICK: Duration = Duration::from_millis(4);
/// Slots in the wheel: one revolution is `SLOTS × TICK` (8.2 s); a later deadline waits in
/// its slot for as many revolutions as it needs.
const SLOTS: usize = 2048;
const NIL: u32 = u32::MAX;

/// A timer: `Ready` once its deadline has passed. Dropping it cancels it.
pub struct Timer {
    key: u32,
    generation: u32,
}

impl Timer {
    pub fn after(d: Duration) -> Timer {
        Timer::at(Instant::now() + d)
    }

    pub fn at(when: Instant) -> Timer {
        let (key, generation) = wheel().arm(when);
        Timer { key, generation }
    }

    /// Re-arms the timer (fired or not) for `d` from now.
    pub fn set_after(&mut self, d: Duration) {
        let w = wheel();
        let mut inner = w.lock();
        inner.unlink(self.key);
        w.link(inner, self.key, Instant::now() + d);
    }
}

impl Future for Timer {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = wheel().lock();
        let e = &mut inner.entries[self.key as usize];
        debug_assert_eq!(e.generation, self.generation);
        if e.state == State::Fired {
            return Poll::Ready(());
        }
        match &e.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => e.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let mut inner = wheel().lock();
        inner.unlink(self.key);
        let e = &mut inner.entries[self.key as usize];
        e.state = State::Free;
        e.waker = None;
        inner.free.push(self.key);
    }
}

/// `Err(Elapsed)` when `f` did not finish within `d`.
pub fn timeout<F: Future>(d: Duration, f: F) -> Timeout<F> {
    Timeout { f, d, timer: None }
}

pin_project_lite::pin_project! {
    /// The future [`timeout`] returns. A type, not an `async fn`: an `async fn` taking `f`
    /// keeps the argument and its pinned copy side by side in its state (twice `f`'s size,
    /// and every enclosing wrapper again), and it is copied whole on every move.
    pub struct Timeout<F> {
        #[pin]
        f: F,
        d: Duration,
        timer: Option<Timer>,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, super::Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.f.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        // Armed only once the future has had to wait: one that is ready at once costs no timer.
        let d = *this.d;
        let t = this.timer.get_or_insert_with(|| Timer::after(d));
        match Pin::new(t).poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(super::Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Free,
    /// Linked into the slot of its deadline's tick.
    Armed,
    /// Deadline passed; waiting to be polled or dropped.
    Fired,
}

struct Entry {
    tick: u64,
    state: State,
    generation: u32,
    prev: u32,
    next: u32,
    waker: Option<Waker>,
}

struct Inner {
    entries: Vec<Entry>,
    free: Vec<u32>,
    /// Per slot: the first entry of its list, or `NIL`.
    heads: Vec<u32>,
    /// Per slot: whether its list is non-empty (to find the next deadline fast).
    occupied: [u64; SLOTS / 64],
    /// Every tick before this one has been processed.
    current: u64,
    /// The tick the driver's async-io timer is set for (`None`: not set).
    armed: Option<u64>,
}

impl Inner {
    /// Links armed entry `key` into the slot of `tick`. `true` if the driver must wake: the
    /// new deadline is earlier than the one it waits for.
    fn link(&mut self, key: u32, tick: u64) -> bool {
        let tick = tick.max(self.current);
        let slot = (tick % SLOTS as u64) as usize;
        let head = self.heads[slot];
        {
            let e = &mut self.entries[key as usize];
            e.tick = tick;
            e.state = State::Armed;
            e.prev = NIL;
            e.next = head;
        }
        if head != NIL {
            self.entries[head as usize].prev = key;
        }
        self.heads[slot] = key;
        self.occupied[slot / 64] |= 1 << (slot % 64);
        self.armed.is_none_or(|a| tick < a)
    }

    /// Unlinks `key` if it is armed (a fired or free entry is in no list); it is then
    /// `Fired`: in no list, until it is linked again or freed.
    fn unlink(&mut self, key: u32) {
        let (tick, prev, next, state) = {
            let e = &self.entries[key as usize];
            (e.tick, e.prev, e.next, e.state)
        };
        if state != State::Armed {
            return;
        }
        let slot = (tick % SLOTS as u64) as usize;
        if prev == NIL {
            self.heads[slot] = next;
            if next == NIL {
                self.occupied[slot / 64] &= !(1 << (slot % 64));
            }
        } else {
            self.entries[prev as usize].next = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
        self.entries[key as usize].state = State::Fired;
    }

    /// Fires every entry due at or before `now` (a tick): their wakers go to `wake`.
    fn advance(&mut self, now: u64, wake: &mut Vec<Waker>) {
        if now < self.current {
            return;
        }
        // A whole revolution visits every slot once; later ticks would only revisit them.
        let span = (now - self.current + 1).min(SLOTS as u64);
        for t in self.current..self.current + span {
            let slot = (t % SLOTS as u64) as usize;
            let mut k = self.heads[slot];
            while k != NIL {
                let (tick, next) = {
                    let e = &self.entries[k as usize];
                    (e.tick, e.next)
                };
                if tick <= now {
                    self.unlink(k);
                    if let Some(w) = self.entries[k as usize].waker.take() {
                        wake.push(w);
                    }
                }
                k = next;
            }
        }
        self.current = now + 1;
    }

    /// The earliest tick at which some slot holds an entry (that entry may belong to a later
    /// revolution: the driver then wakes, finds nothing due, and looks again).
    fn next_tick(&self) -> Option<u64> {
        let start = (self.current % SLOTS as u64) as usize;
        let words = SLOTS / 64;
        for i in 0..=words {
            let w = (start / 64 + i) % words;
            let mut bits = self.occupied[w];
            if i == 0 {
                bits &= !0u64 << (start % 64); // slots before `start` in this word come last
            }
            if i == words {
                bits &= !(!0u64 << (start % 64));
            }
            if bits != 0 {
                let slot = w * 64 + bits.trailing_zeros() as usize;
                let d = (slot + SLOTS - start) % SLOTS;
                return Some(self.current + d as u64);
            }
        }
        None
    }
}

struct Wheel {
    origin: Instant,
    inner: Mutex<Inner>,
    driver: AtomicWaker,
}

impl Wheel {
    fn new() -> Wheel {
        Wheel {
            origin: Instant::now(),
            inner: Mutex::new(Inner {
                entries: Vec::new(),
                free: Vec::new(),
                heads: vec![NIL; SLOTS],
                occupied: [0; SLOTS / 64],
                current: 0,
                armed: None,
            }),
            driver: AtomicWaker::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the lists consistent (no await inside).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first tick at or after `t`.
    fn tick_up(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.origin).as_nanos();
        let tick = TICK.as_nanos();
        d.div_ceil(tick) as u64
    }

    /// The last tick at or before `t`.
    fn tick_down(&self, t: Instant) -> u64 {
        (t.saturating_duration_since(self.origin).as_nanos() / TICK.as_nanos()) as u64
    }

    /// Links `key` for `when` and releases the lock; wakes the driver if `when` is now the
    /// earliest deadline.
    fn link(&self, mut inner: MutexGuard<'_, Inner>, key: u32, when: Instant) {
        let wake = inner.link(key, self.tick_up(when));
        drop(inner);
        if wake {
            self.driver.wake();
        }
    }

    fn arm(&self, when: Instant) -> (u32, u32) {
        let mut inner = self.lock();
        let key = match inner.free.pop() {
            Some(k) => k,
            None => {
                inner.entries.push(Entry {
                    tick: 0,
                    state: State::Free,
                    generation: 0,
                    prev: NIL,
                    next: NIL,
                    waker: None,
                });
                (inner.entries.len() - 1) as u32
            }
        };
        let generation = {
            let e = &mut inner.entries[key as usize];
            e.generation = e.generation.wrapping_add(1);
            e.generation
        };
        self.link(inner, key, when);
        (key, generation)
    }
}

static WHEEL: OnceLock<Wheel> = OnceLock::new();

fn wheel() -> &'static Wheel {
    if let Some(w) = WHEEL.get() {
        return w;
    }
    let mut started = false;
    let w = WHEEL.get_or_init(|| {
        started = true;
        Wheel::new()
    });
    if started {
        super::spawn(drive(w));
    }
    w
}

/// Fires due timers whenever the earliest deadline passes, and keeps one async-io timer set
/// for the next one.
async fn drive(w: &'static Wheel) {
    let mut timer = async_io::Timer::never();
    let mut set_for: Option<u64> = None;
    let mut due = Vec::new();
    std::future::poll_fn(|cx| loop {
        w.driver.register(cx.waker());
        let next = {
            let mut inner = w.lock();
            inner.advance(w.tick_down(Instant::now()), &mut due);
            let next = inner.next_tick();
            inner.armed = next;
            next
        };
        for waker in due.drain(..) {
            waker.wake();
        }
        let Some(next) = next else {
            return Poll::Pending; // no timers: an arm wakes us
        };
        if set_for != Some(next) {
            timer.set_at(w.origin + Duration::from_nanos(TICK.as_nanos() as u64 * next));
            set_for = Some(next);
        }
        if Pin::new(&mut timer).poll(cx).is_pending() {
            return Poll::Pending;
        }
        set_for = None;
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rt;

    /// Never early, at most a couple of ticks late (the machine is shared: generous bound).
    #[test]
    fn fires_after_its_deadline_and_not_before() {
        rt::block_on(async {
            for ms in [1u64, 5, 23, 60] {
                let t0 = Instant::now();
                Timer::after(Duration::from_millis(ms)).await;
                let took = t0.elapsed();
                assert!(
                    took >= Duration::from_millis(ms),
                    "{ms} ms fired after {took:?}"
                );
                assert!(
                    took < Duration::from_millis(ms + 200),
                    "{ms} ms took {took:?}"
                );
            }
        });
    }

    /// Many timers at once, armed out of order and re-armed, with cancelled ones linked and
    /// unlinked among them: each fires once, in deadline order, none before its deadline.
    #[test]
    fn many_timers_fire_in_order_and_cancelled_ones_never() {
        rt::block_on(async {
            let t0 = Instant::now();
            let order = std::sync::Arc::new(Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for i in (0..60u64).rev() {
                let order = order.clone();
                tasks.push(rt::spawn(async move {
                    let mut t = Timer::after(Duration::from_millis(500));
                    t.set_after(Duration::from_millis(10 + i * 8));
                    t.await;
                    order.lock().unwrap().push(i);
                }));
            }
            // Armed earlier than all of the above, then dropped: must not fire.
            let cancelled = rt::spawn(async {
                let r = timeout(Duration::from_millis(1), futures::future::pending::<()>());
                let _early = Timer::after(Duration::from_millis(2));
                r.await
            });
            assert!(cancelled.await.is_err(), "timeout did not elapse");
            let dropped: Vec<Timer> = (0..100)
                .map(|_| Timer::after(Duration::from_millis(3)))
                .collect();
            drop(dropped);
            for t in tasks {
                t.await;
            }
            let order = order.lock().unwrap().clone();
            assert_eq!(order, (0..60).collect::<Vec<_>>());
            assert!(t0.elapsed() >= Duration::from_millis(10 + 59 * 8));
        });
    }

    /// A deadline beyond one revolution of the wheel waits in its slot for its own turn.
    #[test]
    fn wheel_wraps_without_firing_early() {
        let mut inner = Wheel::new().inner.into_inner().unwrap();
        let mut woke = Vec::new();
        inner.entries.push(Entry {
            tick: 0,
            state: State::Free,
            generation: 1,
            prev: NIL,
            next: NIL,
            waker: Some(futures::task::noop_waker()),
        });
        let far = SLOTS as u64 * 3 + 7;
        inner.link(0, far);
        assert_eq!(inner.next_tick(), Some(7));
        inner.advance(7, &mut woke);
        assert!(woke.is_empty(), "fired a revolution early");
        inner.advance(far - 1, &mut woke);
        assert!(woke.is_empty());
        assert_eq!(inner.next_tick(), Some(far));
        inner.advance(far, &mut woke);
        assert_eq!(woke.len(), 1);
        assert_eq!(inner.next_tick(), None);
    }

    #[test]
    fn timeout_passes_a_ready_future_through() {
        rt::block_on(async {
            assert_eq!(timeout(Duration::from_millis(1), async { 7 }).await, Ok(7));
            let slow = timeout(
                Duration::from_millis(20),
                Timer::after(Duration::from_secs(5)),
            );
            assert_eq!(slow.await, Err(rt::Elapsed));
        });
    }
}
