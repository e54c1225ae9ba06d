//! The Listener actor: one per configured listener. Its accept loop (a task the actor owns
//! and aborts when it stops or fails) turns each accepted connection into a Session actor.
//! The listening socket itself belongs to the supervisor, so a restart of this actor never
//! refuses a connection: the kernel queues them until the new accept loop runs.

use crate::messages::{Fault, ListenerName};
use crate::rt::{self, TcpListener};
use crate::session::{Session, SessionStart};
use crate::shared::Shared;
use futures::future::{AbortHandle, Abortable};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use xactor::{Actor, Context, Handler};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

pub struct Listener {
    index: usize,
    socket: Arc<TcpListener>,
    shared: Arc<Shared>,
    accept_loop: Option<AbortHandle>,
}

impl Listener {
    pub fn new(index: usize, socket: Arc<TcpListener>, shared: Arc<Shared>) -> Listener {
        Listener {
            index,
            socket,
            shared,
            accept_loop: None,
        }
    }
}

impl Drop for Listener {
    /// Also runs when the actor's task unwinds from a panic: the accept loop dies with it.
    fn drop(&mut self) {
        if let Some(h) = self.accept_loop.take() {
            h.abort();
        }
    }
}

#[async_trait::async_trait]
impl Actor for Listener {
    async fn started(&mut self, _ctx: &mut Context<Self>) -> xactor::Result<()> {
        let (handle, reg) = AbortHandle::new_pair();
        self.accept_loop = Some(handle);
        let (socket, shared, index) = (
            Arc::clone(&self.socket),
            Arc::clone(&self.shared),
            self.index,
        );
        rt::spawn(Abortable::new(accept_loop(socket, shared, index), reg));
        Ok(())
    }

    async fn stopped(&mut self, _ctx: &mut Context<Self>) {
        if let Some(h) = self.accept_loop.take() {
            h.abort();
        }
    }
}

async fn accept_loop(socket: Arc<TcpListener>, shared: Arc<Shared>, index: usize) {
    let name = ListenerName(&shared.listeners[index].name);
    loop {
        match socket.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let id = NEXT_SESSION.fetch_add(1, Relaxed);
                let start = SessionStart {
                    stream,
                    peer,
                    listener: index,
                    shared: Arc::clone(&shared),
                };
                if let Err(e) = xactor::Actor::start(Session::new(id, start)).await {
                    log::warn!("{name}: session#{id} did not start: {e}");
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                log::warn!("{name}: accept failed: {e}");
                rt::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[async_trait::async_trait]
impl Handler<Fault> for Listener {
    async fn handle(&mut self, _ctx: &mut Context<Self>, _msg: Fault) {
        panic!(
            "fault injection: listener {} crashes",
            self.shared.listeners[self.index].name
        );
    }
}
