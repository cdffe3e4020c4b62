//! What the benchmarks in `examples/` share: the stack's addresses, ecst in-process, offsets and
//! Prometheus histograms read back. Not an example itself (no `main.rs`); each benchmark includes
//! it with `#[path = "support/mod.rs"] mod support;`.
#![allow(dead_code)] // each benchmark uses a part

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use ecst::app::Components;
use ecst::config::Config;

pub fn env_or(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

/// A connector.toml on the stack's servers (addresses from `dev/stack env`): `name`, the
/// source's `tables` with `source_extra` settings, the MongoDB `uri` and database, no metrics
/// listener. The caller appends `[sink]` when it needs one.
pub fn stack_toml(
    name: &str,
    tables: &[String],
    source_extra: &str,
    (uri, mongo_db): (&str, &str),
) -> String {
    let tables = tables
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
        name = "{name}"
        [mysql]
        host = "{host}"
        port = {port}
        user = "{user}"
        password = "{pw}"
        server_id = {sid}
        [source]
        tables = [{tables}]
        {source_extra}
        [kafka]
        bootstrap_servers = "{kafka}"
        [schema_registry]
        url = "{registry}"
        [metrics]
        listen = ""
        [mongo]
        uri = "{uri}"
        database = "{mongo_db}"
        "#,
        host = env_or("ECST_MYSQL_HOST", "127.0.0.1"),
        port = env_or("ECST_MYSQL_PORT", "13306"),
        user = env_or("ECST_MYSQL_USER", "ecst"),
        pw = env_or("ECST_MYSQL_PASSWORD", "ecst"),
        sid = 900_000 + std::process::id() % 10_000,
        kafka = env_or("ECST_KAFKA_BOOTSTRAP", "127.0.0.1:19092"),
        registry = env_or(
            "ECST_SCHEMA_REGISTRY_URL",
            "http://127.0.0.1:18081/apis/ccompat/v7"
        ),
    )
}

/// The mapping's name in [`orders_sink_toml`]: its versions live at `_ecst.<this>`.
pub const USER_IN_ORDERS: &str = "user_in_orders";

/// The `[sink]` of the seed's purchase orders: `topic`'s rows are users, embedded at `user`
/// (`id`, `firstname`, `lastname`, `email`) in every `purchase_order` whose `user.id` is the
/// row's; `sink_extra` adds `[sink]` settings.
pub fn orders_sink_toml(name: &str, topic: &str, sink_extra: &str) -> String {
    format!(
        r#"
        [sink]
        group_id = "{name}-sink"
        {sink_extra}
        [[sink.mappings]]
        name = "{USER_IN_ORDERS}"
        topic = "{topic}"
        kind = "embedded"
        collection = "purchase_order"
        match_path = "user.id"
        target_path = "user"
        fields = ["id", "firstname", "lastname", "email"]
        "#
    )
}

pub fn arg(i: usize, d: u64) -> u64 {
    std::env::args()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// CPU seconds (user + system) of this process so far.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

pub async fn admin() -> Result<mysql_async::Conn> {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(env_or("ECST_MYSQL_HOST", "127.0.0.1"))
        .tcp_port(env_or("ECST_MYSQL_PORT", "13306").parse()?)
        .user(Some(env_or("ECST_MYSQL_ADMIN_USER", "ecst_admin")))
        .pass(Some(env_or("ECST_MYSQL_ADMIN_PASSWORD", "ecst_admin")))
        .prefer_socket(false);
    Ok(mysql_async::Conn::new(opts).await?)
}

pub struct Running {
    pub tx: Arc<ecst::shutdown::ShutdownTx>,
    pub handle: tokio::task::JoinHandle<Result<(), ecst::app::AppError>>,
}

pub fn start(cfg: Config, which: Components) -> Running {
    let (tx, rx) = ecst::shutdown::channel();
    let tx = Arc::new(tx);
    let handle = tokio::spawn(ecst::app::run(Arc::new(cfg), which, tx.clone(), rx));
    Running { tx, handle }
}

impl Running {
    pub async fn stop(self) -> Result<()> {
        self.tx.trigger();
        self.handle.await?.map_err(|e| anyhow::anyhow!("{e}"))
    }
}

pub async fn wait_offset(
    cfg: &Config,
    done: impl Fn(&ecst::offsets::SourceOffset) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        // The topic appears once the source has started: errors before that are expected.
        if let Ok(Some(o)) = ecst::source::load_offset(cfg, &cfg.offsets_topic()).await
            && done(&o)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Cumulative bucket counts `(le, count)` of a histogram in a Prometheus rendering.
pub fn buckets(render: &str, metric: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{metric}_bucket");
    render
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|line| {
            let le = line.split("le=\"").nth(1)?.split('"').next()?;
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, line.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// p50/p99 of the observations between two bucket snapshots (linear within a bucket, as
/// Prometheus' histogram_quantile does).
pub fn delta_quantiles(before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<(f64, f64, u64)> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            (
                *le,
                c - before
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |(_, b)| *b),
            )
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let q = |p: f64| {
        let target = p * total;
        let mut prev = (0.0, 0.0);
        for &(le, c) in &delta {
            if c >= target {
                if le.is_infinite() {
                    return prev.0;
                }
                let frac = if c > prev.1 {
                    (target - prev.1) / (c - prev.1)
                } else {
                    0.0
                };
                return prev.0 + (le - prev.0) * frac;
            }
            prev = (le, c);
        }
        prev.0
    };
    Some((q(0.5), q(0.99), total as u64))
}

/// p50/p99 and count of everything a histogram recorded so far.
pub fn quantiles(render: &str, metric: &str) -> Option<(f64, f64, u64)> {
    delta_quantiles(&[], &buckets(render, metric))
}

/// The sum of a counter over all its label sets in a Prometheus rendering (0 when absent).
pub fn counter_sum(render: &str, metric: &str) -> u64 {
    render
        .lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The machine, for the tables printed: CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!("{cpu}, {cores} cores")
}
