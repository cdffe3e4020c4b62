//! The sink against MongoDB's own limit (issue 15), on each MongoDB server named, in one run
//! (`dev/bench-sink` runs it; see BENCHMARKS.md).
//!
//! Shape: the seed's. USERS rows of `users(id, firstname, lastname, email)`; USERS × PER_USER
//! `purchase_order` documents embed them (`{user: {id, firstname, lastname, email}, product,
//! price}`, index on `user.id`). For each server:
//! 1. **history**: the source alone puts the table's snapshot and ROUNDS round-robin updates of
//!    every user into Kafka: USERS × (ROUNDS + 1) changes. Any USERS consecutive ones have
//!    distinct keys, so with `batch_size = USERS` nothing collapses: one change, one statement.
//! 2. **bare client**: the sink's statements for that history (a guarded `updateMany` of one
//!    user's copies: the sink's filter and update), in commands as large as the sink's on that
//!    server, one command at a time, on a fresh copy of the collection: changes/s.
//! 3. **ecst sink**: the sink alone catches up with the history on another fresh copy:
//!    changes/s from its first acknowledged batch to its last, and the ratio to 2.
//! 4. **latency**: source and sink together, with their default settings; single-row updates at
//!    LATENCY_RATE/s for 30 s (at most half the bare client's rate: above the server's limit
//!    the figure would be the backlog's). p50/p99 of binlog read → MongoDB acknowledged, of ecst's own share
//!    (binlog read → the sink's write began, `ecst_pipeline_before_write_seconds`), and of the
//!    sink's batch writes (the server's share); and of the source's Kafka commits, part of the
//!    own share.
//! 5. **sustained**: the highest rate of a doubling ladder (20 s a step) after which the sink
//!    has applied every change within 1 s of the writer stopping, then held for SECONDS; then
//!    p50/p99 at half that rate. The writer is one MariaDB connection sending autocommit
//!    `UPDATE`s every 10 ms; when it falls short of the rate asked, the row says so.
//!
//! ecst runs in this process, beside MariaDB, Kafka, the registry and the MongoDB servers, on
//! the same cores; the bare client runs alone (nothing else is writing then).
//!
//! Usage: `cargo run --release --example bench_sink -- [users] [per_user] [rounds]
//! [latency_rate] [seconds]`, servers from `ECST_BENCH_MONGO_URIS` (comma-separated, default
//! `ECST_MONGO_URI`); `ECST_BENCH_SINK_SETTINGS` adds `[sink]` settings to phases 4 and 5,
//! `ECST_BENCH_SINK_SUSTAINED=off` skips phase 5.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bson::{Document, doc};
use ecst::app::Components;
use ecst::config::Config;
use mysql_async::prelude::Queryable;

#[path = "support/mod.rs"]
mod support;
use support::{
    USER_IN_ORDERS, admin, arg, buckets, counter_sum, delta_quantiles, env_or, machine,
    orders_sink_toml, stack_toml, start, wait_offset,
};

/// The same allocator as the `ecst` binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const APPLIED: &str = "ecst_sink_applied_total";
const PIPELINE: &str = "ecst_pipeline_latency_seconds";
const OWN: &str = "ecst_pipeline_before_write_seconds";
const WRITE: &str = "ecst_sink_batch_write_seconds";
const COMMIT: &str = "ecst_source_commit_seconds";
/// Statements per command the sink sends (`src/sink/mongo.rs`): MongoDB, FerretDB.
const COMMAND_STATEMENTS: (usize, usize) = (1_000, 25);

struct Shape {
    users: u64,
    per_user: u64,
    rounds: u64,
}

fn config(name: &str, db: &str, uri: &str, mongo_db: &str, sink_extra: &str) -> Result<Config> {
    let mut s = stack_toml(name, &[format!("{db}.users")], "", (uri, mongo_db));
    s.push_str(&orders_sink_toml(
        name,
        &format!("{name}.{db}.users"),
        sink_extra,
    ));
    Config::from_toml_str(&s, Vec::new()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// A fresh `purchase_order` in `db`: USERS × PER_USER orders embedding the users as they were
/// before the history, indexed on `user.id`.
async fn orders(client: &mongodb::Client, db: &str, shape: &Shape) -> Result<()> {
    let coll = client.database(db).collection::<Document>("purchase_order");
    let n = shape.users * shape.per_user;
    let mut docs = Vec::with_capacity(1_000);
    for i in 0..n {
        let uid = (i % shape.users + 1) as i32;
        docs.push(doc! {
            "user": { "id": uid, "firstname": "Neha", "lastname": "Sharma", "email": format!("u{uid}@gmail.com") },
            "product": { "productId": (i % 3 + 1) as i32, "description": "IPad" },
            "price": 300.0 + (i % 100) as f64,
        });
        if docs.len() == 1_000 {
            coll.insert_many(std::mem::take(&mut docs)).await?;
        }
    }
    if !docs.is_empty() {
        coll.insert_many(docs).await?;
    }
    coll.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! { "user.id": 1 })
            .build(),
    )
    .await?;
    Ok(())
}

/// The bare client: the sink's statement for each change of the history (its filter and
/// update, `src/sink/mapping.rs`), `per_command` to a command, one command at a time.
async fn bare_client(
    client: &mongodb::Client,
    db: &str,
    shape: &Shape,
    per_command: usize,
) -> Result<f64> {
    let version_path = format!("_ecst.{USER_IN_ORDERS}");
    let total = shape.users * (shape.rounds + 1);
    let database = client.database(db);
    let started = Instant::now();
    let mut i = 0;
    while i < total {
        let mut updates = Vec::with_capacity(per_command);
        while updates.len() < per_command && i < total {
            let (round, uid) = (i / shape.users, (i % shape.users + 1) as i32);
            let version = format!("e0000000001.0000000001.{:015}.000000000", i + 1);
            let email = if round == 0 {
                format!("u{uid}@gmail.com")
            } else {
                format!("u{uid}.{round}@hotmail.com")
            };
            updates.push(doc! {
                "q": { "user.id": uid, "$or": [
                    { version_path.as_str(): { "$exists": false } },
                    { version_path.as_str(): { "$lt": version.as_str() } },
                ]},
                "u": { "$set": {
                    "user": { "id": uid, "firstname": "Neha", "lastname": "Sharma", "email": email },
                    version_path.as_str(): version.as_str(),
                }},
                "multi": true,
                "upsert": false,
            });
            i += 1;
        }
        let reply = database
            .run_command(doc! { "update": "purchase_order", "updates": updates, "ordered": true })
            .await?;
        if reply.get_array("writeErrors").is_ok_and(|e| !e.is_empty()) {
            bail!("the bare client's writes failed: {reply}");
        }
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Waits until the applied counter reaches `target`, or `limit` passes; returns whether it did.
async fn applied_by(
    handle: &metrics_exporter_prometheus::PrometheusHandle,
    target: u64,
    limit: Duration,
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if counter_sum(&handle.render(), APPLIED) >= target {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One MariaDB connection sending autocommit updates of the users' emails.
struct Writer {
    c: mysql_async::Conn,
    db: String,
    users: u64,
    /// Updates sent so far. Each one's email is new, and unlike any of the history's: an
    /// `UPDATE` that changes nothing writes no binlog event, and the bench would wait for it.
    seq: u64,
}

impl Writer {
    /// Updates at `rate`/s for `secs`: every 10 ms what the schedule asks (several statements
    /// to a query). Returns the updates sent and the rate reached.
    async fn write_at(&mut self, rate: u64, secs: u64) -> Result<(u64, f64)> {
        let t0 = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut sent = 0u64;
        while t0.elapsed() < Duration::from_secs(secs) {
            tick.tick().await;
            let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
            let n = due.saturating_sub(sent).min(1_000);
            if n == 0 {
                continue;
            }
            let mut q = String::with_capacity(n as usize * 80);
            for _ in 0..n {
                self.seq += 1;
                let (db, seq) = (&self.db, self.seq);
                let uid = seq.wrapping_mul(7_919) % self.users + 1;
                q.push_str(&format!(
                    "UPDATE `{db}`.users SET email = 'w{seq}.u{uid}@hotmail.com' WHERE id = {uid};"
                ));
            }
            self.c.query_drop(q).await?;
            sent += n;
        }
        Ok((sent, sent as f64 / t0.elapsed().as_secs_f64()))
    }
}

/// p50/p99 in ms of a histogram between two renderings.
fn p50_p99(before: &str, after: &str, metric: &str) -> String {
    match delta_quantiles(&buckets(before, metric), &buckets(after, metric)) {
        Some((p50, p99, n)) => format!("{:.1} / {:.1} ms (n={n})", p50 * 1e3, p99 * 1e3),
        None => "-".into(),
    }
}

/// One stretch of updates at a steady rate, drained.
struct Stretch {
    /// The metrics before the first update and after the last was applied.
    before: String,
    after: String,
    /// Every update applied within 1 s of the writer stopping, and the writer reached 95 % of
    /// the rate asked.
    kept_up: bool,
    reached: f64,
}

/// Updates at `rate` for `secs`, then waits until the sink has applied them all.
async fn stretch(
    handle: &metrics_exporter_prometheus::PrometheusHandle,
    w: &mut Writer,
    rate: u64,
    secs: u64,
) -> Result<Stretch> {
    let before = handle.render();
    let applied0 = counter_sum(&before, APPLIED);
    let (sent, reached) = w.write_at(rate, secs).await?;
    let kept = applied_by(handle, applied0 + sent, Duration::from_secs(1)).await;
    if !applied_by(handle, applied0 + sent, Duration::from_secs(600)).await {
        bail!(
            "the sink did not apply {sent} updates at {rate}/s within 600 s of the writer stopping"
        );
    }
    Ok(Stretch {
        before,
        after: handle.render(),
        kept_up: kept && reached >= rate as f64 * 0.95,
        reached,
    })
}

/// Single-row updates at `rate` for `secs`: the latency quantiles of that stretch.
async fn latency_at(
    handle: &metrics_exporter_prometheus::PrometheusHandle,
    w: &mut Writer,
    rate: u64,
    secs: u64,
) -> Result<String> {
    let s = stretch(handle, w, rate, secs).await?;
    let (b, a) = (&s.before, &s.after);
    Ok(format!(
        "| {rate}/s (reached {:.0}/s) | {} | {} | {} | {} |",
        s.reached,
        p50_p99(b, a, PIPELINE),
        p50_p99(b, a, OWN),
        p50_p99(b, a, COMMIT),
        p50_p99(b, a, WRITE),
    ))
}

/// Whether the pipeline keeps up with `rate` for `secs` (see [`Stretch::kept_up`]), and the
/// rate the writer reached.
async fn keeps_up(
    handle: &metrics_exporter_prometheus::PrometheusHandle,
    w: &mut Writer,
    rate: u64,
    secs: u64,
) -> Result<(bool, f64)> {
    let s = stretch(handle, w, rate, secs).await?;
    eprintln!(
        "  {rate}/s for {secs} s (writer reached {:.0}/s): {}",
        s.reached,
        if s.kept_up { "kept up" } else { "fell behind" }
    );
    Ok((s.kept_up, s.reached))
}

async fn server(
    handle: &metrics_exporter_prometheus::PrometheusHandle,
    uri: &str,
    index: usize,
    shape: &Shape,
    (latency_rate, seconds): (u64, u64),
) -> Result<Vec<String>> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let name = format!("bsink{stamp}x{index}");
    let db = format!("bench_sink_{stamp}_{index}");
    let client = mongodb::Client::with_uri_str(uri).await?;
    let build = client
        .database("admin")
        .run_command(doc! { "buildInfo": 1 })
        .await?;
    let ferret = build.contains_key("ferretdbVersion");
    let server_name = if ferret {
        format!(
            "FerretDB {}",
            build.get_str("ferretdbVersion").unwrap_or("?")
        )
    } else {
        format!("MongoDB wire {}", build.get_str("version").unwrap_or("?"))
    };
    let per_command = if ferret {
        COMMAND_STATEMENTS.1
    } else {
        COMMAND_STATEMENTS.0
    };
    eprintln!("== {server_name} at {uri}");

    // 1. The history, in Kafka.
    let mut c = admin().await?;
    c.query_drop(format!("CREATE DATABASE `{db}`")).await?;
    c.query_drop(format!(
        "CREATE TABLE `{db}`.users (id INT PRIMARY KEY, firstname VARCHAR(45), lastname VARCHAR(45), email VARCHAR(45))"
    ))
    .await?;
    let mut rows = String::new();
    for uid in 1..=shape.users {
        if !rows.is_empty() {
            rows.push(',');
        }
        rows.push_str(&format!("({uid}, 'Neha', 'Sharma', 'u{uid}@gmail.com')"));
        if uid % 1_000 == 0 || uid == shape.users {
            c.query_drop(format!("INSERT INTO `{db}`.users VALUES {rows}"))
                .await?;
            rows.clear();
        }
    }
    let history_cfg = config(&name, &db, uri, &format!("{db}_unused"), "")?;
    let source = start(history_cfg.clone(), Components::Source);
    wait_offset(&history_cfg, |o| o.snapshot_completed).await?;
    for round in 1..=shape.rounds {
        let mut q = String::new();
        for uid in 1..=shape.users {
            q.push_str(&format!(
                "UPDATE `{db}`.users SET email = 'u{uid}.{round}@hotmail.com' WHERE id = {uid};"
            ));
            if uid % 200 == 0 || uid == shape.users {
                c.query_drop(std::mem::take(&mut q)).await?;
            }
        }
    }
    let end: (String, u64) = c
        .query_first("SHOW MASTER STATUS")
        .await?
        .map(|r: mysql_async::Row| (r.get(0).unwrap_or_default(), r.get(1).unwrap_or(0)))
        .context("SHOW MASTER STATUS returned nothing")?;
    let end = ecst::offsets::BinlogPosition {
        file: end.0,
        pos: end.1,
    };
    wait_offset(&history_cfg, |o| {
        o.position
            .partial_cmp(&end)
            .is_some_and(|c| c != std::cmp::Ordering::Less)
    })
    .await?;
    source.stop().await?;
    let total = shape.users * (shape.rounds + 1);
    eprintln!("history: {total} changes in Kafka");

    // 2. The bare client.
    let bare_db = format!("{db}_bare");
    orders(&client, &bare_db, shape).await?;
    let bare = bare_client(&client, &bare_db, shape, per_command).await?;
    client.database(&bare_db).drop().await?;
    eprintln!("bare client: {bare:.0} changes/s");

    // 3. The sink alone, catching up with the history.
    let ecst_db = format!("{db}_ecst");
    orders(&client, &ecst_db, shape).await?;
    let sink_cfg = config(
        &name,
        &db,
        uri,
        &ecst_db,
        &format!("batch_size = {}", shape.users.min(10_000)),
    )?;
    let applied0 = counter_sum(&handle.render(), APPLIED);
    let sink = start(sink_cfg, Components::Sink);
    let (mut first, mut last) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(1800);
    while last.is_none() && Instant::now() < deadline {
        let applied = counter_sum(&handle.render(), APPLIED) - applied0;
        if applied > 0 && first.is_none() {
            first = Some((Instant::now(), applied));
        }
        if applied >= total {
            last = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sink.stop().await?;
    let (Some((t_first, n_first)), Some(t_last)) = (first, last) else {
        bail!("the sink did not apply the {total} changes of the history within 30 minutes");
    };
    let secs = (t_last - t_first).as_secs_f64();
    let ecst_rate = if secs > 0.0 {
        (total - n_first) as f64 / secs
    } else {
        f64::NAN
    };
    eprintln!(
        "ecst sink: {ecst_rate:.0} changes/s ({:.2} of the bare client)",
        ecst_rate / bare
    );

    // 4. and 5. Source and sink together, default settings.
    let settings = env_or("ECST_BENCH_SINK_SETTINGS", "");
    let both_cfg = config(&name, &db, uri, &ecst_db, &settings)?;
    let both = start(both_cfg, Components::Both);
    // Both caught up: the first update goes through (start-up, group join).
    let mut w = Writer {
        c,
        db: db.clone(),
        users: shape.users,
        seq: 0,
    };
    // Warm-up: the first updates wait for the sink's group join and the source's start
    // (`stretch` waits up to 600 s for them).
    latency_at(handle, &mut w, 10, 2).await?;
    // Below the server's own limit, or the figure is the backlog's, not the pipeline's.
    let latency_rate = latency_rate.min((bare / 2.0) as u64).max(1);
    let latency = latency_at(handle, &mut w, latency_rate, 30).await?;
    eprintln!("{server_name}, latency {latency}");
    let mut rows_out = Vec::new();
    let mut best = None;
    let mut failed = None;
    // From a rate the server takes (the bare client's fifth, at most 100/s).
    let mut rate = ((bare / 5.0) as u64).clamp(1, 100);
    let ladder = env_or("ECST_BENCH_SINK_SUSTAINED", "on") != "off";
    while ladder && rate <= 25_600 {
        let (kept, _) = keeps_up(handle, &mut w, rate, 20).await?;
        if !kept {
            failed = Some(rate);
            break;
        }
        best = Some(rate);
        rate *= 2;
    }
    // Two halvings of the gap between the last rate kept up with and the first not.
    if let (Some(mut lo), Some(mut hi)) = (best, failed) {
        for _ in 0..2 {
            let mid = (lo + hi) / 2;
            if keeps_up(handle, &mut w, mid, 20).await?.0 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        best = Some(lo);
    }
    let sustained = match best {
        Some(mut r) => {
            // Held for the full length, stepping down by a quarter when it is not.
            loop {
                let (kept, reached) = keeps_up(handle, &mut w, r, seconds).await?;
                if kept || r <= 1 {
                    break Some((r, kept, reached));
                }
                r = r * 3 / 4;
            }
        }
        None => None,
    };
    let half = match sustained {
        Some((r, true, _)) => Some(latency_at(handle, &mut w, r / 2, 30).await?),
        _ => None,
    };
    both.stop().await?;
    client.database(&ecst_db).drop().await?;
    if !settings.is_empty() {
        rows_out.push(format!(
            "{server_name}: sink settings for latency and sustained: {settings}"
        ));
    }

    rows_out.push(format!(
        "| {server_name} | {} × {} orders, {total} changes | {per_command} | {bare:.0} | {ecst_rate:.0} | {:.2} |",
        shape.users,
        shape.per_user,
        ecst_rate / bare
    ));
    rows_out.push(format!("{server_name}, latency {latency}"));
    rows_out.push(match sustained {
        Some((r, true, reached)) => {
            format!("{server_name}, sustained for {seconds} s: {r}/s (writer {reached:.0}/s)")
        }
        Some((r, false, reached)) => format!(
            "{server_name}, sustained: not even {r}/s for {seconds} s (writer {reached:.0}/s)"
        ),
        None if !ladder => format!("{server_name}, sustained: not measured"),
        None => format!("{server_name}, sustained: not even {rate}/s for 20 s"),
    });
    if let Some(h) = half {
        rows_out.push(format!("{server_name}, at half the sustained rate {h}"));
    }
    for l in &rows_out {
        eprintln!("{l}");
    }
    Ok(rows_out)
}

#[tokio::main]
async fn main() -> Result<()> {
    let shape = Shape {
        users: arg(1, 1_000).max(1),
        per_user: arg(2, 10).max(1),
        rounds: arg(3, 9),
    };
    let (latency_rate, seconds) = (arg(4, 100).max(1), arg(5, 60).max(1));
    let uris = env_or(
        "ECST_BENCH_MONGO_URIS",
        &env_or("ECST_MONGO_URI", "mongodb://127.0.0.1:27117/"),
    );
    let _tls = rustls::crypto::ring::default_provider().install_default();
    // ecst's logs on stderr, filtered by RUST_LOG (default: warnings).
    let _logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let handle = ecst::metrics::install().map_err(|e| anyhow::anyhow!(e))?;
    let mut out = Vec::new();
    for (i, uri) in uris.split(',').filter(|u| !u.is_empty()).enumerate() {
        out.extend(server(&handle, uri, i, &shape, (latency_rate, seconds)).await?);
    }
    println!("machine: {}", machine());
    println!(
        "| server | shape | statements per command | bare client, changes/s | ecst sink, changes/s | ratio |"
    );
    println!("|---|---|---|---|---|---|");
    for l in out.iter().filter(|l| l.starts_with('|')) {
        println!("{l}");
    }
    println!();
    println!(
        "latency rows: | rate | binlog read → MongoDB ack p50 / p99 | ecst's own share (read → write began) | of which the source's Kafka commits | batch write (server) |"
    );
    for l in out.iter().filter(|l| !l.starts_with('|')) {
        println!("{l}");
    }
    Ok(())
}
