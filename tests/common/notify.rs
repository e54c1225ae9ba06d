//! A tiny async "something changed" signal, so tests wait on events instead of sleeping.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

#[derive(Default)]
pub struct Notify {
    generation: AtomicU64,
    wakers: Mutex<Vec<Waker>>,
}

impl Notify {
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes every waiter.
    pub fn notify(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap());
        for w in wakers {
            w.wake();
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Resolves once `notify` has been called after `seen` was read from `generation`.
    pub fn changed(&self, seen: u64) -> Changed<'_> {
        Changed { notify: self, seen }
    }

    /// Waits (bounded by `d`) until `pred` holds; `pred` is re-evaluated on every notify.
    pub async fn wait_until(&self, what: &str, d: Duration, mut pred: impl FnMut() -> bool) {
        super::within(what, d, async {
            loop {
                let g = self.generation();
                if pred() {
                    return;
                }
                self.changed(g).await;
            }
        })
        .await
    }
}

pub struct Changed<'a> {
    notify: &'a Notify,
    seen: u64,
}

impl Future for Changed<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation() != self.seen {
            return Poll::Ready(());
        }
        self.notify.wakers.lock().unwrap().push(cx.waker().clone());
        if self.notify.generation() != self.seen {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}
