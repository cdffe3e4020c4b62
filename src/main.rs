//! The `ecst` command line. Thin: parse, load config, set up logs, hand over to `app`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use ecst::app::{self, Components};
use ecst::config::{Config, LogFormat};

/// mimalloc instead of glibc malloc: rows are decoded on the reader task and freed on the
/// producer task, a cross-thread pattern that glibc's arenas handle poorly (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Event-Carried State Transfer sidecar: MySQL/MariaDB binlog → Avro/Kafka → copies in MongoDB.
#[derive(Parser)]
#[command(name = "ecst", version, about, long_about = None)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "connector.toml",
        env = "ECST_CONFIG"
    )]
    config: PathBuf,
    /// Log format (overrides `log.format`).
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the source and the sink (those configured).
    Run,
    /// Run only the source (binlog → Kafka).
    Source,
    /// Run only the sink (Kafka → MongoDB).
    Sink,
    /// Check every service and setting, one line each; non-zero exit on failure.
    Check,
    /// Validate the configuration file only (no network).
    Validate,
    /// Print the effective configuration with secrets redacted.
    PrintConfig,
    /// The stored positions: the source's (file:pos, GTID, epoch, server, snapshot state) and
    /// the sink group's committed offsets with their lag.
    Offsets {
        #[command(subcommand)]
        action: OffsetsAction,
    },
    /// Compare every embedded copy (and mirrored document) with the latest row of its key in
    /// the change topic: counts of ok, stale, missing and orphaned copies, with samples.
    /// --repair rewrites the drifted ones through the sink's guarded writes. Exit status 1
    /// while drift is left (like diff), 2 on an error.
    Reconcile {
        /// Only this mapping (default: all).
        #[arg(long)]
        mapping: Option<String>,
        /// Repair what differs, then compare again.
        #[arg(long)]
        repair: bool,
    },
    /// Snapshot tables again while the source runs (online: no lock, every table streams on):
    /// a signal in the source's signals topic, which the running source picks up (a stopped one
    /// when it starts). Progress shows in the source's log and its snapshot metrics.
    Snapshot {
        /// `db.table` names, each one in source.tables.
        #[arg(required = true)]
        tables: Vec<String>,
    },
    /// A live view of a running ecst in the terminal, read from its metrics endpoint: per table
    /// events/s and snapshot progress, the binlog position against the server's end and its purge
    /// margin, per mapping applied/s, stale skips, consumer lag and dead letters. q quits.
    Top {
        /// Base URL of the metrics listener (default: `metrics.listen` of the configuration).
        #[arg(long)]
        url: Option<String>,
        /// Milliseconds between refreshes.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
        interval_ms: u64,
        /// Print one frame as text and exit (status 1 when the endpoint cannot be reached).
        #[arg(long)]
        once: bool,
    },
    /// Decode binlog files offline through the source's decoder: one JSON line per change (op,
    /// table, key, before, after, position, GTID). Needs no configuration and no server.
    InspectBinlog {
        /// Binlog files, read in order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also print each transaction boundary (the positions the source would store).
        #[arg(long)]
        commits: bool,
        /// Decode tables whose binlog has no column names (binlog_row_metadata = MINIMAL) with
        /// names @1…@N; the source refuses them.
        #[arg(long)]
        positional: bool,
    },
}

#[derive(Subcommand)]
enum OffsetsAction {
    /// Print them.
    Show,
    /// Move them, only while that half is stopped; prints the plan, and applies it with --yes.
    Reset {
        /// Where the source goes: now | resnapshot | resnapshot-table:DB.TABLE | position:FILE:POS
        #[arg(long)]
        source: Option<ecst::positions::SourceTarget>,
        /// Where the sink group goes: earliest | latest | timestamp:MILLISECONDS
        #[arg(long)]
        sink: Option<ecst::positions::SinkTarget>,
        /// Apply the plan (without it, nothing is written).
        #[arg(long)]
        yes: bool,
    },
}

fn init_logs(cfg: Option<&Config>, flag: Option<&str>) {
    let level = cfg
        .and_then(|c| c.log.level.clone())
        .unwrap_or_else(|| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let json = match flag {
        Some(f) => f == "json",
        None => cfg.is_some_and(|c| c.log.format == LogFormat::Json),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::InspectBinlog {
        files,
        commits,
        positional,
    } = &cli.command
    {
        let opts = ecst::inspect::Options {
            commits: *commits,
            positional: *positional,
        };
        return inspect_binlog(files, opts);
    }
    if let Command::Top {
        url,
        interval_ms,
        once,
    } = &cli.command
    {
        return top(&cli.config, url.clone(), *interval_ms, *once);
    }
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}: {e}", cli.config.display());
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Validate => {
            println!("{}: valid", cli.config.display());
            return ExitCode::SUCCESS;
        }
        Command::PrintConfig => {
            println!("{}", cfg.redacted());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    init_logs(Some(&cfg), cli.log_format.as_deref());
    // A panic is a bug: one structured line with its message and place, instead of the default
    // hook's free text. The task boundary then stops the component with a definite error.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "a task panicked; this is a bug in ecst, please report it");
    }));
    install_tls_provider();
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread().enable_all()) else {
        return ExitCode::FAILURE;
    };
    let cfg = Arc::new(cfg);
    runtime.block_on(async move {
        let which = match cli.command {
            Command::Check => {
                let checks = ecst::check::run_checks(&cfg).await;
                let mut failed = 0;
                for c in &checks {
                    println!(
                        "{} {:<40} {}",
                        if c.ok { "PASS" } else { "FAIL" },
                        c.name,
                        c.detail
                    );
                    failed += usize::from(!c.ok);
                }
                println!("{} passed, {} failed", checks.len() - failed, failed);
                return if failed == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                };
            }
            Command::Offsets {
                action: OffsetsAction::Reset { source, sink, yes },
            } => {
                if source.is_none() && sink.is_none() {
                    eprintln!("error: say what to move: --source and/or --sink");
                    return ExitCode::from(2);
                }
                return printed(ecst::positions::reset(&cfg, source, sink, yes).await);
            }
            Command::Offsets {
                action: OffsetsAction::Show,
            } => {
                return printed(ecst::positions::show(&cfg).await);
            }
            Command::Reconcile { mapping, repair } => {
                let opts = ecst::reconcile::Options { mapping, repair };
                return match ecst::reconcile::run(&cfg, &opts).await {
                    Ok(report) => {
                        print!("{}", report.text);
                        if report.clean {
                            ExitCode::SUCCESS
                        } else {
                            ExitCode::from(1)
                        }
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(2)
                    }
                };
            }
            Command::Snapshot { tables } => {
                return printed(ecst::source::signal::request_snapshot(&cfg, &tables).await);
            }
            Command::Source => Components::Source,
            Command::Sink => Components::Sink,
            _ => Components::Both,
        };
        let (tx, rx) = ecst::shutdown::channel();
        let tx = Arc::new(tx);
        app::spawn_signal_handler(tx.clone());
        match app::run(cfg, which, tx, rx).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "ecst stopped with an error");
                ExitCode::FAILURE
            }
        }
    })
}

/// Prints a command's text, or its error; the exit code says which.
fn printed(result: Result<String, impl std::fmt::Display>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime `builder` describes, or `None` after saying why there is none.
fn runtime(builder: &mut tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    builder
        .build()
        .map_err(|e| eprintln!("error: cannot start the async runtime: {e}"))
        .ok()
}

/// One TLS provider for every client (rustls with ring): set before any client exists.
fn install_tls_provider() {
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("a rustls crypto provider was already installed");
    }
}

/// `ecst top`: the configuration only for the address, when `--url` is not given.
fn top(config: &std::path::Path, url: Option<String>, interval_ms: u64, once: bool) -> ExitCode {
    let url = match url {
        Some(u) => u,
        None => match Config::load(config) {
            Ok(c) if c.metrics.listen.is_empty() => {
                eprintln!(
                    "error: {}: metrics.listen is empty, so ecst serves no metrics; set it, or pass --url",
                    config.display()
                );
                return ExitCode::from(2);
            }
            Ok(c) => ecst::top::url_for_listen(&c.metrics.listen),
            Err(e) => {
                eprintln!("error: {}: {e} (or pass --url)", config.display());
                return ExitCode::from(2);
            }
        },
    };
    install_tls_provider();
    let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread().enable_all()) else {
        return ExitCode::FAILURE;
    };
    let opts = ecst::top::Options {
        url,
        interval: std::time::Duration::from_millis(interval_ms),
        once,
    };
    match runtime.block_on(ecst::top::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ecst inspect-binlog`: no configuration, no server, one thread.
fn inspect_binlog(files: &[PathBuf], opts: ecst::inspect::Options) -> ExitCode {
    let Some(runtime) = runtime(&mut tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::FAILURE;
    };
    let mut out = std::io::BufWriter::new(std::io::stdout());
    match runtime.block_on(ecst::inspect::inspect(files, opts, &mut out)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            use std::io::Write;
            let _ = out.flush();
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
