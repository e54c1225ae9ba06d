//! The admin endpoint (`admin.bind`, off unless configured): `GET /metrics` (Prometheus text),
//! `GET /status` (JSON), `POST /reload` (re-read the config file, as SIGHUP does). Plain
//! HTTP/1.1, one request per connection; unknown paths get 404.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wsgate_actors::handshake::{read_head, simple_response, write_all};
use wsgate_actors::rt::{self, TcpListener, TcpStream};
use wsgate_actors::Gateway;

/// What `/status` reports beyond the engine's own state.
pub struct AdminInfo {
    pub config_path: String,
    pub started: std::time::Instant,
    loaded_at_unix: AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl AdminInfo {
    pub fn new(config_path: &std::path::Path) -> AdminInfo {
        AdminInfo {
            config_path: config_path.display().to_string(),
            started: std::time::Instant::now(),
            loaded_at_unix: AtomicU64::new(unix_now()),
        }
    }

    /// Records a successful reload.
    pub fn reloaded(&self) {
        self.loaded_at_unix.store(unix_now(), Relaxed);
    }
}

/// Binds the admin socket; the accept loop runs until the process ends.
pub async fn start(
    bind: SocketAddr,
    gateway: Arc<Gateway>,
    info: Arc<AdminInfo>,
    config_path: PathBuf,
) -> Result<SocketAddr, String> {
    let socket = TcpListener::bind(bind)
        .await
        .map_err(|e| format!("admin: cannot bind {bind}: {e}"))?;
    let local = socket.local_addr().map_err(|e| format!("admin: {e}"))?;
    log::info!("admin listening on {local}");
    rt::spawn(async move {
        loop {
            match socket.accept().await {
                Ok((stream, _)) => {
                    let job = handle(
                        stream,
                        Arc::clone(&gateway),
                        Arc::clone(&info),
                        config_path.clone(),
                    );
                    rt::spawn(job);
                }
                Err(e) => {
                    log::warn!("admin: accept failed: {e}");
                    rt::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(local)
}

async fn handle(
    mut stream: TcpStream,
    gateway: Arc<Gateway>,
    info: Arc<AdminInfo>,
    config_path: PathBuf,
) {
    let mut buf = Vec::new();
    let head = match rt::timeout(Duration::from_secs(5), read_head(&mut stream, &mut buf)).await {
        Ok(Ok((head, _))) => head,
        _ => return,
    };
    let path = head.target().split('?').next().unwrap_or("");
    let Some(shared) = gateway.shared() else {
        return;
    };
    let text =
        |status, body: &[u8]| simple_response(status, &[("Content-Type", "text/plain")], body);
    let response = match (head.method(), path) {
        ("GET", "/metrics") => simple_response(
            200,
            &[("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
            shared.prometheus().as_bytes(),
        ),
        ("GET", "/status") => {
            let mut status = shared.status();
            status["uptime_s"] = info.started.elapsed().as_secs().into();
            status["config_file"] = info.config_path.clone().into();
            status["config_loaded_at_unix"] = info.loaded_at_unix.load(Relaxed).into();
            let body = serde_json::to_vec_pretty(&status).unwrap_or_default();
            simple_response(200, &[("Content-Type", "application/json")], &body)
        }
        ("POST", "/reload") => match crate::reload(&gateway, &config_path, &info).await {
            Ok(()) => text(200, b"reloaded\n"),
            Err(e) => text(400, format!("{e}\n").as_bytes()),
        },
        (_, "/metrics" | "/status") => {
            simple_response(405, &[("Allow", "GET")], b"method not allowed\n")
        }
        (_, "/reload") => simple_response(405, &[("Allow", "POST")], b"method not allowed\n"),
        _ => text(404, b"not found\n"),
    };
    let _ = write_all(&mut stream, &response).await;
}
