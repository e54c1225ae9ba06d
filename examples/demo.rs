//! wsgate in one command: two chat backends, two ticker backends and the gateway, in-process.
//!
//! ```text
//! cargo run --example demo
//! ```
//!
//! Backends: `chat-a` 127.0.0.1:8010, `chat-b` 127.0.0.1:8011, `ticker-a` 127.0.0.1:8012,
//! `ticker-b` 127.0.0.1:8013 (ticks every 1000 ms). The gateway runs from `config.json`
//! (`./config.json`, else the one at the repository root), which routes `/chat` and `/ticker`
//! on 127.0.0.1:8020 to those pools. `RUST_LOG` works as for wsgate (default `info`).

use std::path::PathBuf;
use std::process::exit;
use std::time::Duration;

use async_std::net::TcpListener;
use async_std::task;

// The backends are the standalone examples, compiled in as modules; their `main`s go unused.
#[allow(dead_code)]
#[path = "chat_server.rs"]
mod chat_server;
#[allow(dead_code)]
#[path = "ticker_server.rs"]
mod ticker_server;

const CHAT: [(u16, &str); 2] = [(8010, "chat-a"), (8011, "chat-b")];
const TICKER: [(u16, &str); 2] = [(8012, "ticker-a"), (8013, "ticker-b")];
const TICK_INTERVAL: Duration = Duration::from_millis(1000);

#[async_std::main]
async fn main() {
    // env_logger, `RUST_LOG` as given or `info`, formatted like the wsgate binary's log.
    wsgate::init_logging();

    // Bind everything first so a busy port is reported at once, not from inside a task.
    for (port, name) in CHAT {
        let listener = bind(port, name).await;
        task::spawn(async move {
            if let Err(e) = chat_server::serve(listener, name.to_string()).await {
                log::error!("{name} stopped: {e}");
            }
        });
    }
    for (port, name) in TICKER {
        let listener = bind(port, name).await;
        task::spawn(async move {
            if let Err(e) = ticker_server::serve(listener, name.to_string(), TICK_INTERVAL).await {
                log::error!("{name} stopped: {e}");
            }
        });
    }
    // Let the backends print their readiness lines before the instructions.
    task::sleep(Duration::from_millis(50)).await;

    let config = config_path();
    println!(
        r#"
wsgate demo: gateway on 127.0.0.1:8020 from {config}
  /chat   -> pool chat   (chat-a 127.0.0.1:8010, chat-b 127.0.0.1:8011)
  /ticker -> pool ticker (ticker-a 127.0.0.1:8012, ticker-b 127.0.0.1:8013)

Try it from another terminal:
  cargo run --example client -- ws://127.0.0.1:8020/chat
      type {{"join":"lobby"}} then {{"say":"hi"}}; "backend" in every message tells which
      server you reached, and a second client sees your says when it reaches the same one
      (rooms live in each backend; the pool spreads clients over chat-a and chat-b)
  cargo run --example client -- ws://127.0.0.1:8020/ticker
      type {{"subscribe":["AAPL","MSFT"]}} and watch the ticks
  open http://127.0.0.1:8020/chat in a browser for the chat page
      (served through the gateway when the chat pool sets "http": true;
       directly from a backend at http://127.0.0.1:8010/)
Ctrl-C stops everything.
"#,
        config = config.display()
    );

    // The gateway runs in this process until it is shut down (SIGINT/SIGTERM drain it); the
    // backend tasks end with the process.
    if let Err(e) = wsgate::serve(config).await {
        eprintln!("demo: {e}");
        exit(1);
    }
}

async fn bind(port: u16, name: &str) -> TcpListener {
    match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!(
                "demo: cannot start {name} on 127.0.0.1:{port}: {e} (is another demo running?)"
            );
            exit(1);
        }
    }
}

/// `./config.json`, or the repository's own when the demo is run from elsewhere.
fn config_path() -> PathBuf {
    let local = PathBuf::from("config.json");
    if local.exists() {
        return local;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config.json");
    if repo.exists() {
        repo
    } else {
        local
    }
}
