//! The `wsgate` binary's library half: reading the config file, starting the engine, and
//! (later) signals and the admin endpoint. `main.rs` is only the command line.

pub mod admin;

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_async_std::Signals;
use std::path::PathBuf;
use std::sync::Arc;
use wsgate_actors::config::Config;

pub use wsgate_actors as engine;

/// Runs the gateway from a config file until SIGTERM/SIGINT has drained it. SIGHUP reloads.
pub async fn serve(config_path: PathBuf) -> Result<(), String> {
    let config = Config::load(&config_path).map_err(|e| e.to_string())?;
    let admin_bind = config.admin.as_ref().map(|a| a.bind);
    let drain = config.timeouts.drain();
    let gateway = Arc::new(wsgate_actors::start(config).await?);
    let info = Arc::new(admin::AdminInfo::new(&config_path));
    if let Some(bind) = admin_bind {
        admin::start(
            bind,
            Arc::clone(&gateway),
            Arc::clone(&info),
            config_path.clone(),
        )
        .await?;
    }
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    while let Some(sig) = signals.next().await {
        if sig == SIGHUP {
            log::info!("SIGHUP: reloading {}", config_path.display());
            let _ = reload(&gateway, &config_path, &info).await;
            continue;
        }
        let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
        log::info!("{name}: draining");
        let drain = gateway
            .shared()
            .map_or(drain, |s| s.config.timeouts.drain());
        let left = gateway.shutdown(drain).await;
        if left > 0 {
            log::warn!("shutdown: {left} sessions still open after drain_ms; exiting anyway");
        }
        log::info!("shutdown complete");
        break;
    }
    Ok(())
}

/// Re-reads the config file and applies it; an invalid file is logged with its field-path
/// error and changes nothing. Shared by SIGHUP and `POST /reload`.
pub async fn reload(
    gateway: &wsgate_actors::Gateway,
    path: &std::path::Path,
    info: &admin::AdminInfo,
) -> Result<(), String> {
    let result = match Config::load(path) {
        Ok(config) => gateway.reload(config).await,
        Err(e) => Err(e.to_string()),
    };
    match &result {
        Ok(()) => {
            info.reloaded();
            log::info!("reload: {} applied", path.display());
        }
        Err(e) => log::error!("reload failed, the running config stays: {e}"),
    }
    result
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
