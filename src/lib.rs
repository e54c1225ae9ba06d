//! The `wsgate` binary's library half: reading the config file, starting the engine, and
//! (later) signals and the admin endpoint. `main.rs` is only the command line.

use std::path::PathBuf;
use wsgate_actors::config::Config;

pub use wsgate_actors as engine;

/// Runs the gateway from a config file until the process is stopped.
pub async fn serve(config_path: PathBuf) -> Result<(), String> {
    let config = Config::load(&config_path).map_err(|e| e.to_string())?;
    let _gateway = wsgate_actors::start(config).await?;
    futures::future::pending::<()>().await;
    Ok(())
}

/// Initialises env_logger (`RUST_LOG` as given, `info` when unset) and routes panics into
/// the log as one `error` line each: the supervisor and sessions recover from them, so a
/// multi-screen backtrace on stderr would only bury the log.
pub fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("info");
    let _ = env_logger::Builder::from_env(env).format_timestamp_millis().try_init();
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        log::error!(target: "wsgate::panic", "panic in thread {}: {info}", thread.name().unwrap_or("?"));
    }));
}
