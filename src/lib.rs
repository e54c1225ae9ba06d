//! The `wsgate` binary's library half: reading the config file, starting the engine, and
//! (later) signals and the admin endpoint. `main.rs` is only the command line.

pub mod admin;

use futures::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_async_std::Signals;
use std::path::PathBuf;
use std::sync::Arc;
use wsgate_actors::config::Config;

pub use wsgate_actors as engine;

/// Runs the gateway from a config file until the process is stopped.
pub async fn serve(config_path: PathBuf) -> Result<(), String> {
    let config = Config::load(&config_path).map_err(|e| e.to_string())?;
    let admin_bind = config.admin.as_ref().map(|a| a.bind);
    let gateway = wsgate_actors::start(config).await?;
    if let Some(bind) = admin_bind {
        let info = Arc::new(admin::AdminInfo::new(&config_path));
        admin::start(bind, Arc::clone(&gateway.shared), info).await?;
    }
    let drain = gateway.shared.config.timeouts.drain();
    let mut signals = Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    if let Some(sig) = signals.next().await {
        let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
        log::info!("{name}: draining");
        let left = gateway.shutdown(drain).await;
        if left > 0 {
            log::warn!("shutdown: {left} sessions still open after drain_ms; exiting anyway");
        }
        log::info!("shutdown complete");
    }
    Ok(())
}

/// Initialises env_logger (`RUST_LOG` as given, `info` when unset) and routes panics into
/// the log as one `error` line each: the supervisor and sessions recover from them, so a
/// multi-screen backtrace on stderr would only bury the log.
pub fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("info");
    let _ = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .try_init();
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        log::error!(target: "wsgate::panic", "panic in thread {}: {info}", thread.name().unwrap_or("?"));
    }));
}
