//! `wsgate [--config PATH]`, `wsgate --check [--config PATH]`, `wsgate --version`.

use std::path::PathBuf;
use std::process::ExitCode;
use wsgate_actors::config::Config;

const USAGE: &str =
    "usage: wsgate [--config PATH] | wsgate --check [--config PATH] | wsgate --version";

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut config = PathBuf::from("config.json");
    let mut check = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => match args.next() {
                Some(p) => config = PathBuf::from(p),
                None => return usage_error("--config needs a PATH"),
            },
            "--check" => check = true,
            "--version" | "-V" => {
                println!("wsgate {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage_error(&format!("unknown argument {other:?}")),
        }
    }
    if check {
        return match Config::load(&config) {
            Ok(_) => {
                println!("config ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    wsgate::init_logging();
    match wsgate_actors::rt::block_on(wsgate::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr (SPEC §1), not also a log record.
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("wsgate: {msg}\n{USAGE}");
    ExitCode::from(2)
}
