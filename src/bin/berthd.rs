//! berthd: the berth CRI daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::sync::Arc;

use berth::server::reload::LogFilterSetter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use berth::config::Config;
use berth::sandbox::init::POD_INIT_FLAG;
use berth::server::Daemon;

/// berth's CRI daemon: serves runtime.v1 RuntimeService and ImageService on a unix socket.
#[derive(Parser)]
#[command(name = "berthd", version, about)]
struct Args {
    /// TOML configuration file (every key optional; without it the embedded defaults apply).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log filter, e.g. `info` or `berth=debug` (default: $RUST_LOG or `info`).
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// Log line format on stderr: `text` (human) or `json` (one object a line, for log
    /// shippers: timestamp, level, target, fields, and the RPC span with its pod and
    /// container ids). Default: the config's `[log] format`, else `text`.
    #[arg(long, value_name = "FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Print the embedded default configuration and exit (as `berthd config default`).
    #[arg(long)]
    print_default_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Configuration: print the defaults, or check a file with its drop-ins.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the embedded default configuration.
    Default,
    /// Read FILE and its drop-ins (`FILE.d/*.toml`, or `drop_in_dir`); print the effective
    /// configuration, or the error naming file, key and value (exit status 1).
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    // Before any thread exists (see berth::alloc).
    berth::alloc::limit_arenas();
    // berthd re-executes itself as a pod's init (see berth::sandbox::init); that mode must
    // start before anything else (no threads, no runtime).
    let mut raw = std::env::args_os().skip(1);
    if raw.next().as_deref() == Some(std::ffi::OsStr::new(POD_INIT_FLAG)) {
        let pid_file = PathBuf::from(raw.next().unwrap_or_default());
        std::process::exit(berth::sandbox::init::launcher_main(&pid_file));
    }
    berth::notify::take_from_env();
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", berth::config::DEFAULT_TOML);
        return Ok(());
    }
    match &args.command {
        Some(Command::Config(ConfigCommand::Default)) => {
            print!("{}", berth::config::DEFAULT_TOML);
            return Ok(());
        }
        Some(Command::Config(ConfigCommand::Check { file })) => {
            return match Config::load_with_sources(file) {
                Ok((config, sources)) => {
                    for s in &sources {
                        println!("# read {}", s.display());
                    }
                    print!("{}", config.to_toml());
                    Ok(())
                }
                Err(e) => {
                    eprintln!("berthd: {e}");
                    std::process::exit(1);
                }
            };
        }
        None => {}
    }
    // The config first: it may choose the log format and filter (a bad config is an error
    // on stderr).
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    // --log, then RUST_LOG, then [log] level; only the last changes on SIGHUP.
    let (filter, from_config) = match &args.log {
        Some(f) => (
            parse_filter(f).with_context(|| format!("bad --log filter {f:?}"))?,
            false,
        ),
        None => match std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()) {
            Some(f) => (
                parse_filter(&f).with_context(|| format!("bad RUST_LOG {f:?}"))?,
                false,
            ),
            None => (
                parse_filter(&config.log.level)
                    .with_context(|| format!("bad [log] level {:?}", config.log.level))?,
                true,
            ),
        },
    };
    let format = args.log_format.unwrap_or(match config.log.format {
        berth::config::LogFormat::Text => LogFormat::Text,
        berth::config::LogFormat::Json => LogFormat::Json,
    });
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let logs = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => logs
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
        // Fields at the top level of each object; the current span and the span list
        // carry the RPC's method, pod and container.
        LogFormat::Json => logs
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    let set_filter: LogFilterSetter = Arc::new(move |f: &str| {
        let filter = parse_filter(f).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    });
    // reqwest's rustls needs a process-wide crypto provider; berth uses ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Blocking threads (mounts, file trees, cgroups, namespace work) come in bursts with pod
    // churn; idle ones go after 2 s instead of tokio's 10 s, so that a drained node does not
    // keep a burst's threads (their stacks) resident.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        berth::alloc::spawn_trimmer();
        let mut daemon = Daemon::start(config).await?;
        if let Some(path) = &args.config {
            daemon.reload_on_sighup(path.clone(), from_config.then_some(set_filter));
        }
        daemon.serve(shutdown_signal()).await?;
        Ok(())
    })
}

/// A `RUST_LOG`-style filter: `level`, `target=level`, comma-separated (tracing's
/// `Targets`, which needs no regex engine, unlike `EnvFilter`'s span and field directives).
fn parse_filter(f: &str) -> anyhow::Result<Targets> {
    berth::config::parse_log_filter(f).map_err(anyhow::Error::msg)
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop berthd with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}
