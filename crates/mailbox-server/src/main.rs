//! `mailboxd`: a mailbox cluster node, or (`mailboxd dev`) a local DC of
//! several nodes for trying things out.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mailbox_server::NodeConfig;

mod dev;

/// jemalloc rather than glibc's malloc for Rust's allocations (RocksDB's
/// C++ keeps its own): many small, short-lived buffers (gRPC frames, log
/// entries, values read back) cross threads under load, which glibc's
/// arenas handle poorly (see docs/benchmarks.md, session 13).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "mailboxd", version, about = "Multi-DC replicated mailbox node")]
struct Cli {
    /// Node configuration file (TOML).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate a config file and print it with all defaults filled in.
    CheckConfig,
    /// Run a local data center of several nodes on loopback (`make run`).
    Dev(dev::DevArgs),
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Dev(args)) => dev::run(args).await,
        Some(Cmd::CheckConfig) => {
            let path = cli.config.context("--config is required")?;
            let cfg = NodeConfig::load(&path)?;
            print!("{}", toml::to_string_pretty(&cfg)?);
            Ok(())
        }
        None => {
            let path = cli
                .config
                .context("--config FILE is required (or use `mailboxd dev`)")?;
            let cfg = NodeConfig::load(&path)?;
            let listener = tokio::net::TcpListener::bind(&cfg.listen)
                .await
                .with_context(|| format!("cannot listen on {}", cfg.listen))?;
            let http = match &cfg.http_listen {
                Some(addr) => Some(mailbox_server::bind_http(addr).await?),
                None => None,
            };
            mailbox_server::serve_with(cfg, listener, http, shutdown_signal()).await?;
            Ok(())
        }
    }
}
