//! Reproducible benchmark of ecst on the native stack (`dev/bench` runs it; see BENCHMARKS.md).
//!
//! Phases, each on fresh names so runs never interfere:
//! 1. **snapshot**: N rows in MariaDB → Kafka (Avro, registry, transactional): rows/s.
//! 2. **streaming**: M row updates written while the source is stopped, then caught up from the
//!    binlog into Kafka: rows/s (the reader, decoder, encoder and producer at full speed).
//! 3. **sink**: steady updates at R/s for S s into `purchase_order` copies in MongoDB/FerretDB:
//!    applied changes/s and binlog-read → MongoDB-acknowledged latency p50/p99 (histogram).
//!
//! Usage: `cargo run --release --example bench -- [rows] [updates] [rate] [seconds] [orders]`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ecst::app::Components;
use ecst::config::Config;
use mysql_async::prelude::Queryable;

#[path = "support/mod.rs"]
mod support;
use support::{
    admin, arg, buckets, counter_sum, cpu_seconds, delta_quantiles, env_or, machine,
    orders_sink_toml, peak_rss_mb, quantiles, stack_toml, start, wait_offset,
};

/// The same allocator as the `ecst` binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn config(name: &str, db: &str, table: &str, mongo_db: &str, sink: bool) -> Result<Config> {
    let mut s = stack_toml(
        name,
        &[format!("{db}.{table}")],
        &format!(
            "snapshot_chunk_size = 20000\ncommit_interval_ms = {}",
            env_or("ECST_BENCH_COMMIT_INTERVAL_MS", "100")
        ),
        (
            &env_or("ECST_MONGO_URI", "mongodb://127.0.0.1:27117/"),
            mongo_db,
        ),
    );
    if sink {
        s.push_str(&orders_sink_toml(name, &format!("{name}.{db}.{table}"), ""));
    }
    Config::from_toml_str(&s, Vec::new()).map_err(|e| anyhow::anyhow!("{e}"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let rows = arg(1, 1_000_000);
    let updates = arg(2, 1_000_000);
    let rate = arg(3, 200);
    let seconds = arg(4, 30);
    let orders = arg(5, 2_000);
    // The sink phase embeds ORDERS/2 users taken from the ROWS of the users table: with fewer
    // rows it would wait for a catch-up that never comes.
    anyhow::ensure!(
        rows >= orders.div_ceil(2),
        "ROWS ({rows}) must be at least ORDERS/2 ({}): the sink phase's users come from those rows",
        orders.div_ceil(2)
    );
    let _tls = rustls::crypto::ring::default_provider().install_default();
    let handle = ecst::metrics::install().map_err(|e| anyhow::anyhow!(e))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let db = format!("bench_{stamp}");
    let name = format!("bench-{stamp}");
    let mongo_db = format!("bench_{stamp}");
    let mut c = admin().await?;
    c.query_drop(format!("CREATE DATABASE `{db}` CHARACTER SET utf8mb4"))
        .await?;
    c.query_drop(format!(
        "CREATE TABLE `{db}`.users (id INT PRIMARY KEY, firstname VARCHAR(45), lastname VARCHAR(45), email VARCHAR(45), \
         n INT, created DATETIME(6), note VARCHAR(100))"
    ))
    .await?;
    let t = Instant::now();
    let mut done = 0;
    while done < rows {
        let upto = (done + 100_000).min(rows);
        c.query_drop(format!(
            "INSERT INTO `{db}`.users SELECT seq, CONCAT('first', seq), CONCAT('last', seq), CONCAT('user', seq, '@gmail.com'), \
             0, NOW(6), 'note with emoji 😀' FROM `{db}`.seq_{}_to_{upto}",
            done + 1
        ))
        .await?;
        done = upto;
    }
    eprintln!("loaded {rows} rows in {:.1}s", t.elapsed().as_secs_f64());

    // 1. snapshot
    let cfg = config(&name, &db, "users", &mongo_db, false)?;
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let run = start(cfg.clone(), Components::Source);
    wait_offset(&cfg, |o| o.snapshot_completed).await?;
    let snap_s = t0.elapsed().as_secs_f64();
    let snap_cpu = cpu_seconds() - cpu0;
    run.stop().await?;
    eprintln!("snapshot: {rows} rows in {snap_s:.2}s");

    // 2. streaming catch-up
    let t = Instant::now();
    let mut id = 1;
    let mut written = 0;
    while written < updates {
        let hi = (id + 999).min(rows);
        c.query_drop(format!(
            "UPDATE `{db}`.users SET n = n + 1 WHERE id BETWEEN {id} AND {hi}"
        ))
        .await?;
        written += hi - id + 1;
        id = if hi >= rows { 1 } else { hi + 1 };
    }
    let end: mysql_async::Row = c
        .query_first("SHOW MASTER STATUS")
        .await?
        .context("binlog status")?;
    let end_file: String = end.get(0).context("file")?;
    let end_pos: u64 = end.get(1).context("pos")?;
    eprintln!(
        "wrote {written} updates in {:.1}s; streaming them",
        t.elapsed().as_secs_f64()
    );
    let end = ecst::offsets::BinlogPosition {
        file: end_file,
        pos: end_pos,
    };
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let run = start(cfg.clone(), Components::Source);
    wait_offset(&cfg, |o| {
        o.position
            .partial_cmp(&end)
            .is_some_and(|c| c != std::cmp::Ordering::Less)
    })
    .await?;
    let stream_s = t0.elapsed().as_secs_f64();
    let stream_cpu = cpu_seconds() - cpu0;
    run.stop().await?;
    eprintln!("streaming: {written} rows in {stream_s:.2}s");

    // 3. sink at a steady rate
    let client =
        mongodb::Client::with_uri_str(env_or("ECST_MONGO_URI", "mongodb://127.0.0.1:27117/"))
            .await?;
    let coll = client
        .database(&mongo_db)
        .collection::<bson::Document>("purchase_order");
    let users = orders.div_ceil(2).max(1);
    let docs: Vec<bson::Document> = (0..orders)
        .map(|i| bson::doc! { "user": { "id": (i % users + 1) as i32 }, "price": i as f64 })
        .collect();
    coll.insert_many(docs).await?;
    // A table of its own, so the sink's history is just its snapshot.
    c.query_drop(format!("CREATE TABLE `{db}`.small LIKE `{db}`.users"))
        .await?;
    c.query_drop(format!(
        "INSERT INTO `{db}`.small SELECT * FROM `{db}`.users WHERE id <= {users}"
    ))
    .await?;
    let cfg = config(&format!("{name}-sink"), &db, "small", &mongo_db, true)?;
    let run = start(cfg.clone(), Components::Both);
    // Let the sink catch up with the history first (the small table's snapshot), then measure
    // steady state. Applied count, not lag: transaction markers keep the lag gauge at 1.
    let catch_up = Instant::now();
    loop {
        let applied = counter_sum(&handle.render(), "ecst_sink_applied_total");
        if applied >= users || catch_up.elapsed() > Duration::from_secs(1800) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "sink caught up with history in {:.1}s",
        catch_up.elapsed().as_secs_f64()
    );
    let before = quantiles(&handle.render(), "ecst_pipeline_latency_seconds").map_or(0, |q| q.2);
    let before_buckets = buckets(&handle.render(), "ecst_pipeline_latency_seconds");
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut k: u64 = 0;
    while t0.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        k += 1;
        let uid = k % users + 1;
        c.query_drop(format!(
            "UPDATE `{db}`.small SET email = 'u{uid}.{k}@hotmail.com' WHERE id = {uid}"
        ))
        .await?;
    }
    let gen_s = t0.elapsed().as_secs_f64();
    // Drain, then read the histogram.
    let drain = Instant::now();
    loop {
        let n = quantiles(&handle.render(), "ecst_pipeline_latency_seconds").map_or(0, |q| q.2);
        if n >= before + k || drain.elapsed() > Duration::from_secs(600) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let applied_s = gen_s + drain.elapsed().as_secs_f64();
    let render = handle.render();
    run.stop().await?;
    let after_buckets = buckets(&render, "ecst_pipeline_latency_seconds");
    let (p50, p99, _) = delta_quantiles(&before_buckets, &after_buckets).unwrap_or((0.0, 0.0, 0));
    println!("| phase | volume | seconds | rows/s | ecst CPU s |");
    println!("|---|---|---|---|---|");
    println!(
        "| snapshot → Kafka (Avro) | {rows} rows | {snap_s:.2} | {:.0} | {snap_cpu:.2} |",
        rows as f64 / snap_s
    );
    println!(
        "| binlog streaming → Kafka (Avro) | {written} row updates | {stream_s:.2} | {:.0} | {stream_cpu:.2} |",
        written as f64 / stream_s
    );
    println!(
        "| sink, embedded fan-out ({orders} orders, {users} users) at {rate}/s | {k} updates | {applied_s:.2} | {:.0} applied/s | - |",
        k as f64 / applied_s
    );
    println!();
    println!(
        "sink pipeline latency (binlog read → MongoDB ack) at {rate} updates/s: p50 {:.1} ms, p99 {:.1} ms",
        p50 * 1e3,
        p99 * 1e3
    );
    println!(
        "peak RSS of the benchmark process (ecst in-process + driver): {:.0} MB; machine: {}",
        peak_rss_mb(),
        machine()
    );
    Ok(())
}
