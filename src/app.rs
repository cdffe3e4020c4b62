//! Wiring: metrics endpoint, registry, source and sink tasks, one shutdown path.
//!
//! Shutdown order (SIGTERM/SIGINT or a component's definite error): the shared signal stops
//! intake in both halves; the source commits its open Kafka transaction if it is at a source
//! transaction boundary (else aborts it: the partial transaction is re-read on restart); the
//! sink finishes or abandons its in-flight batch (offsets only move after MongoDB acknowledged)
//! and commits stored offsets synchronously; then clients close. Everything must finish within
//! `shutdown_timeout_ms`, else the process exits non-zero. A second signal exits at once.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::error::Classify;
use crate::events::registry::{Registry, RegistrySettings};
use crate::metrics::{self, Readiness};
use crate::shutdown::{ShutdownRx, ShutdownTx};

/// Which halves to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Components {
    /// Source and sink (whatever is configured).
    Both,
    /// Source only.
    Source,
    /// Sink only.
    Sink,
}

/// Binary-level failure: every component error, collected.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Set-up failed (metrics listener, registry settings).
    #[error("{0}")]
    Setup(String),
    /// One or more components stopped with an error.
    #[error("{}", .0.join("\n"))]
    Components(Vec<String>),
    /// Shutdown did not finish within the deadline.
    #[error("shutdown did not finish within {0} ms")]
    ShutdownTimeout(u64),
}

/// Builds the registry client from the config.
pub fn registry(cfg: &Config) -> Result<Registry, AppError> {
    Registry::new(&RegistrySettings {
        url: cfg.schema_registry.url.clone(),
        username: cfg.schema_registry.username.clone(),
        password: cfg
            .schema_registry
            .password
            .as_ref()
            .map(|p| p.expose().to_string()),
        timeout: Duration::from_millis(cfg.schema_registry.timeout_ms),
    })
    .map_err(|e| AppError::Setup(e.to_string()))
}

/// Runs the components until `shutdown` fires or one fails definitively.
pub async fn run(
    cfg: Arc<Config>,
    which: Components,
    shutdown_tx: Arc<ShutdownTx>,
    shutdown_rx: ShutdownRx,
) -> Result<(), AppError> {
    let readiness = Arc::new(Readiness::default());
    let run_source = which != Components::Sink && cfg.source.is_some();
    let run_sink = which != Components::Source && cfg.sink.is_some();
    readiness
        .source_ready
        .store(!run_source, std::sync::atomic::Ordering::Relaxed);
    readiness
        .sink_ready
        .store(!run_sink, std::sync::atomic::Ordering::Relaxed);
    let mut server = None;
    if !cfg.metrics.listen.is_empty() {
        let handle = metrics::install().map_err(AppError::Setup)?;
        let listener = tokio::net::TcpListener::bind(&cfg.metrics.listen)
            .await
            .map_err(|e| AppError::Setup(format!("metrics.listen {}: {e}", cfg.metrics.listen)))?;
        tracing::info!(listen = %cfg.metrics.listen, "metrics and health endpoint up");
        server = Some(tokio::spawn(metrics::serve(
            listener,
            handle,
            readiness.clone(),
        )));
    }
    let registry = registry(&cfg)?;
    let mut tasks = Vec::new();
    if run_source {
        let fut = crate::source::run(
            cfg.clone(),
            registry.clone(),
            shutdown_rx.clone(),
            readiness.clone(),
        );
        tasks.push((
            "source",
            spawn_component("source", fut, shutdown_tx.clone()),
        ));
    }
    if run_sink {
        let fut = crate::sink::run(
            cfg.clone(),
            registry.clone(),
            shutdown_rx.clone(),
            readiness.clone(),
        );
        tasks.push(("sink", spawn_component("sink", fut, shutdown_tx.clone())));
    }
    let deadline = Duration::from_millis(cfg.shutdown_timeout_ms);
    let mut rx = shutdown_rx.clone();
    let wait_all = async move {
        let mut results = Vec::new();
        for (name, handle) in tasks {
            results.push((name, handle.await));
        }
        results
    };
    tokio::pin!(wait_all);
    let results = tokio::select! {
        r = &mut wait_all => r,
        () = rx.wait() => match tokio::time::timeout(deadline, &mut wait_all).await {
            Ok(r) => r,
            Err(_) => return Err(AppError::ShutdownTimeout(cfg.shutdown_timeout_ms)),
        },
    };
    let mut errors = Vec::new();
    for (name, res) in results {
        match res {
            Ok(Ok(())) => tracing::info!(component = name, "stopped"),
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("{name}: task failed: {e}")),
        }
    }
    if let Some(s) = server {
        s.abort();
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(AppError::Components(errors))
    }
}

/// Runs one component; its error (rendered with its class) stops the other one too.
fn spawn_component<E: std::fmt::Display + Classify>(
    name: &'static str,
    fut: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    shutdown: Arc<ShutdownTx>,
) -> tokio::task::JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        let res = fut
            .await
            .map_err(|e| format!("{name} ({}): {e}", e.class().as_str()));
        if res.is_err() {
            shutdown.trigger();
        }
        res
    })
}

/// Spawns the signal handler: the first SIGTERM/SIGINT asks for a graceful shutdown, a second
/// one exits at once (status 130).
pub fn spawn_signal_handler(tx: Arc<ShutdownTx>) {
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            tracing::error!("cannot install the SIGTERM handler");
            return;
        };
        let mut first = true;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                r = tokio::signal::ctrl_c() => if r.is_err() { return },
            }
            if first {
                tracing::info!(
                    "shutdown requested, draining (send the signal again to exit at once)"
                );
                tx.trigger();
                first = false;
            } else {
                tracing::warn!("second signal, exiting at once");
                std::process::exit(130);
            }
        }
    });
}
