//! Echo backend for the benchmarks: every data message is sent back unchanged. Writes are
//! batched (one flush for all messages already read), so pipelined load costs one write
//! syscall per batch, and the backend is not the bottleneck of a proxy comparison.
//!
//! `echo-backend --bind 127.0.0.1:PORT [--secs N]` prints `listening on ADDR` once bound and
//! exits by itself after `--secs` (default 3600) so a forgotten one does not linger.

use async_std::net::TcpListener;
use async_tungstenite::tungstenite::Message;
use futures::{FutureExt, SinkExt, StreamExt};
use std::io::Write;
use std::time::Duration;
use wsgate_loadgen::{ws_config, Args};

async fn serve(stream: async_std::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = async_tungstenite::accept_async_with_config(stream, Some(ws_config())).await
    else {
        return;
    };
    loop {
        let Some(Ok(first)) = ws.next().await else {
            return;
        };
        let mut batch = Some(first);
        while let Some(msg) = batch.take() {
            if matches!(msg, Message::Binary(_) | Message::Text(_)) && ws.feed(msg).await.is_err() {
                return;
            }
            // Take whatever else is already readable before flushing.
            match ws.next().now_or_never() {
                Some(Some(Ok(m))) => batch = Some(m),
                Some(_) => {
                    let _ = ws.flush().await;
                    return;
                }
                None => {}
            }
        }
        if ws.flush().await.is_err() {
            return;
        }
    }
}

fn main() {
    let args = Args::parse(std::env::args().skip(1));
    let bind = args.addr("bind");
    let secs: u64 = args.num("secs", 3600);
    async_std::task::block_on(async move {
        let listener = TcpListener::bind(bind).await.expect("bind");
        println!(
            "listening on {}",
            listener.local_addr().expect("local_addr")
        );
        let _ = std::io::stdout().flush();
        let accept = async {
            let mut incoming = listener.incoming();
            while let Some(s) = incoming.next().await {
                match s {
                    Ok(s) => {
                        async_std::task::spawn(serve(s));
                    }
                    Err(e) => {
                        eprintln!("echo-backend: accept: {e}");
                        // EMFILE and the like: back off briefly instead of spinning.
                        async_std::task::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        };
        let _ = async_std::future::timeout(Duration::from_secs(secs), accept).await;
    });
}
