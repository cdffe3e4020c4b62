//! Online snapshots (`source::online`): a table added to a running deployment, and
//! `ecst snapshot`, are read chunk by chunk while every captured table streams on; each chunk's
//! rows land in each key's change order exactly where their read view was taken.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, ensure};
use ecst::app::Components;
use ecst::events::Op;
use ecst::sink::decode::DecodedEvent;
use mysql_async::prelude::Queryable;

use crate::common::*;

const T: Duration = Duration::from_secs(120);

/// Rows of the table added while the deployment runs.
const BIG_ROWS: u64 = 3000;

/// `db.big`: `BIG_ROWS` rows keyed by text whose case-insensitive order is not its byte order
/// (`a…` and `B…` alternate), with a counter `n` at 0 and `k` to find a row by number.
async fn add_big_table(db: &str) -> Result<()> {
    sql(format!(
        "CREATE TABLE `{db}`.big (id VARCHAR(40) PRIMARY KEY, k INT NOT NULL UNIQUE, n INT NOT NULL, pad VARCHAR(200) NOT NULL)"
    ))
    .await?;
    sql(format!(
        "INSERT INTO `{db}`.big SELECT CONCAT(IF(seq % 2, 'a', 'B'), MD5(seq)), seq, 0, REPEAT('x', 150) FROM {}",
        numbers(BIG_ROWS)
    ))
    .await?;
    Ok(())
}

/// Writes transactions until `stop`: each adds 1 to `n` of a pseudo-random row of `counter`
/// and, if `big` is set, of `big`. Counts the transactions committed.
async fn write_until(
    db: String,
    big: bool,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
) -> Result<()> {
    let mut c = admin().await?;
    let mut x: u64 = 0x9E37_79B9;
    while !stop.load(Ordering::Relaxed) {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let (a, b) = ((x >> 33) % 100 + 1, (x >> 17) % BIG_ROWS + 1);
        let mut tx = c.start_transaction(mysql_async::TxOpts::default()).await?;
        tx.query_drop(format!(
            "UPDATE `{db}`.counter SET n = n + 1 WHERE id = {a}"
        ))
        .await?;
        if big {
            tx.query_drop(format!("UPDATE `{db}`.big SET n = n + 1 WHERE k = {b}"))
                .await?;
        }
        tx.commit().await?;
        committed.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// `key → n` of every row of `db.table` in MySQL.
async fn mysql_counts(db: &str, table: &str) -> Result<HashMap<String, i32>> {
    let mut c = admin().await?;
    let key = if table == "big" {
        "id"
    } else {
        "CAST(id AS CHAR)"
    };
    let rows: Vec<(String, i32)> = c
        .query(format!("SELECT {key}, n FROM `{db}`.`{table}`"))
        .await?;
    Ok(rows.into_iter().collect())
}

fn key_text(e: &DecodedEvent) -> String {
    match e.key.get("id") {
        Some(bson::Bson::String(s)) => s.clone(),
        Some(bson::Bson::Int32(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

fn n_of(e: &DecodedEvent) -> Option<i32> {
    e.after.as_ref().and_then(|a| a.get_i32("n").ok())
}

/// Reads every event of `topic` once the table is quiet: one read per row (`reads`) and one
/// update per committed `n`, then checks each key's events in topic order:
/// * every update adds exactly 1 to the value before it: each change exactly once, in order;
/// * a read shows exactly the value the key's changes had reached where it stands: a snapshot
///   row never moves a key backwards and never skips a change;
/// * the last value is MySQL's; each row is read a number of times in `reads_per_row` (a
///   chunk placed by watermarks leaves out the rows changed between them: 0 or 1).
async fn assert_changes_and_reads_in_place(
    topic: &str,
    finals: &HashMap<String, i32>,
    reads_per_row: std::ops::RangeInclusive<usize>,
) -> Result<Vec<DecodedEvent>> {
    let updates: usize = finals.values().map(|n| *n as usize).sum();
    let (least, most) = (
        finals.len() * reads_per_row.start() + updates,
        finals.len() * reads_per_row.end() + updates,
    );
    wait_events(topic, least, T).await?;
    let evs = events_of(topic, most + 1, Duration::from_secs(3)).await?;
    ensure!(
        (least..=most).contains(&evs.len()),
        "{topic}: {} events, expected {least} to {most}",
        evs.len()
    );
    let mut last: HashMap<String, i32> = HashMap::new();
    let mut reads: HashMap<String, usize> = HashMap::new();
    for e in &evs {
        let k = key_text(e);
        let n = n_of(e).ok_or_else(|| anyhow::anyhow!("{topic}: an event without n: {e:?}"))?;
        let before = last.get(&k).copied();
        match e.op {
            Op::Update => ensure!(
                n == before.unwrap_or(0) + 1,
                "{topic} key {k}: update to {n} after {before:?}"
            ),
            Op::Read => {
                ensure!(
                    n == before.unwrap_or(0),
                    "{topic} key {k}: a snapshot row with n = {n} after the change to {before:?}"
                );
                *reads.entry(k.clone()).or_default() += 1;
            }
            other => anyhow::bail!("{topic} key {k}: unexpected {other:?}"),
        }
        last.insert(k, n);
    }
    for (k, n) in finals {
        ensure!(
            last.get(k) == Some(n),
            "{topic} key {k}: Kafka ends at {:?}, MySQL at {n}",
            last.get(k)
        );
        ensure!(
            reads_per_row.contains(&reads.get(k).copied().unwrap_or(0)),
            "{topic} key {k}: read {:?} times, expected {reads_per_row:?}",
            reads.get(k)
        );
    }
    Ok(evs)
}

/// Lets ecst's user create and write tables in `db` (the watermark table's database).
async fn grant_watermark_writes(db: &str) -> Result<()> {
    let user = endpoints().mysql_user;
    let hosts: Vec<String> = admin()
        .await?
        .exec(
            "SELECT Host FROM mysql.user WHERE User = ?",
            (user.clone(),),
        )
        .await?;
    for host in hosts {
        sql(format!(
            "GRANT CREATE, INSERT, UPDATE ON `{db}`.* TO '{user}'@'{host}'"
        ))
        .await?;
    }
    Ok(())
}

/// `read` was read online, not before the stream: at more than 10 places of the stream, with
/// changes of `other` streamed between the first and the last of them.
fn assert_read_online(read: &[DecodedEvent], other: &[DecodedEvent]) -> Result<()> {
    let places: std::collections::BTreeSet<&str> = read
        .iter()
        .filter(|e| e.op == Op::Read)
        .map(|e| e.version.as_str())
        .collect();
    ensure!(places.len() > 10, "{} read places", places.len());
    let (first, last) = (
        places.first().copied().unwrap_or_default(),
        places.last().copied().unwrap_or_default(),
    );
    ensure!(
        other
            .iter()
            .any(|e| e.op == Op::Update && e.version.as_str() > first && e.version.as_str() < last),
        "no change of the other table streamed during the snapshot"
    );
    Ok(())
}

/// The source still runs (it rode everything out by itself); then it is killed.
async fn runs_on_then_kill(mut run: Captured) -> Result<()> {
    assert!(
        run.child.try_wait()?.is_none(),
        "the source runs on:\n{}",
        run.output()
    );
    run.child.kill().await?;
    Ok(())
}

/// [`write_until`] running in the background.
struct Writer {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Writer {
    /// Starts writing to `db.counter` (and `db.big` if `big`).
    fn start(db: &str, big: bool) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(write_until(
            db.to_string(),
            big,
            stop.clone(),
            committed.clone(),
        ));
        Writer {
            stop,
            committed,
            task,
        }
    }

    /// Waits until it has committed `more` transactions after now.
    async fn written(&self, more: u64) -> Result<()> {
        let target = self.committed.load(Ordering::Relaxed) + more;
        wait_for("the writer's transactions", T, || async {
            Ok((self.committed.load(Ordering::Relaxed) >= target).then_some(()))
        })
        .await
    }

    /// Stops it and returns its outcome.
    async fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

/// Kills `run` (-9) mid-snapshot, restarts the source while `writer` goes on, waits until the
/// online snapshot finished, then stops the writer after 20 more transactions.
async fn kill_and_restart_until_online_finished(
    mut run: Captured,
    cfg: &std::path::Path,
    writer: Writer,
) -> Result<Captured> {
    run.child.kill().await?;
    writer.written(20).await?;
    let run = spawn_captured(cfg, "source", &[], "info")?;
    run.wait_for_output("online snapshot of table finished", T)
        .await?;
    writer.written(20).await?;
    writer.stop().await?;
    Ok(run)
}

/// A source of `counter` that has streamed (its position stored, then killed), and `big`
/// beside it, not captured yet: the configuration to restart with adds it. Chunks of 50 rows,
/// so its 3000 rows are read in many chunks between which the stream goes on.
async fn counter_streamed_and_big_to_add() -> Result<(String, TestConfig)> {
    let db = crate::ops::counter_table().await?;
    add_big_table(&db).await?;
    let mut tc = TestConfig::new(&db, &["counter"]);
    tc.extra_source = "snapshot_chunk_size = 50".into();
    let cfg = write_config(&tc, true, None)?;
    let run = spawn_captured(&cfg, "source", &[], "info")?;
    wait_events(&tc.topic("counter"), 100, T).await?;
    drop(run);
    tc.tables.push(format!("{db}.big"));
    Ok((db, tc))
}

#[tokio::test]
async fn a_table_added_to_a_running_deployment_is_snapshotted_online_while_both_tables_change_and_kill_9_mid_snapshot_loses_and_doubles_nothing()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let (db, tc) = counter_streamed_and_big_to_add().await?;
    // Both tables change from now on, while ecst restarts with `big` added.
    let writer = Writer::start(&db, true);
    writer.written(20).await?;
    let cfg = write_config(&tc, true, None)?;
    let (pause, reached) = failpoint("online.rows", 1000);
    let run = spawn_captured(&cfg, "source", &pause, "info")?;
    run.wait_for_output("snapshotting them online", T).await?;
    wait_for_failpoint(&reached, T).await?;
    // `ecst check` shows the snapshot running, from the stored position.
    wait_for("`ecst check` to show the online snapshot", T, || async {
        let out = tokio::process::Command::new(ecst_bin())
            .args(["--config", &cfg.to_string_lossy(), "check"])
            .output()
            .await?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        Ok(text
            .lines()
            .any(|l| {
                l.starts_with("PASS")
                    && l.contains("online snapshots")
                    && l.contains(&format!("running: {db}.big ("))
            })
            .then_some(()))
    })
    .await?;
    // Mid-snapshot, a chunk handed over and maybe committed: kill -9.
    let run = kill_and_restart_until_online_finished(run, &cfg, writer).await?;
    let counter = assert_changes_and_reads_in_place(
        &tc.topic("counter"),
        &mysql_counts(&db, "counter").await?,
        1..=1,
    )
    .await?;
    let big = assert_changes_and_reads_in_place(
        &tc.topic("big"),
        &mysql_counts(&db, "big").await?,
        1..=1,
    )
    .await?;
    // Online, not before the stream.
    assert_read_online(&big, &counter)?;
    runs_on_then_kill(run).await
}

#[tokio::test]
async fn ecst_snapshot_reads_a_captured_table_again_online_while_it_changes() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = crate::ops::counter_table().await?;
    let mut tc = TestConfig::new(&db, &["counter"]);
    tc.extra_source = "snapshot_chunk_size = 10".into();
    let cfg = tc.config(true)?;
    let run = start(cfg.clone(), Components::Source);
    wait_events(&tc.topic("counter"), 100, T).await?;
    let writer = Writer::start(&db, false);
    writer.written(20).await?;
    // A table not captured is refused, naming it; nothing is written.
    let refused = ecst::source::signal::request_snapshot(&cfg, &[format!("{db}.nope")])
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        refused.contains(&format!("`{db}.nope` is not captured")),
        "{refused}"
    );
    let asked = ecst::source::signal::request_snapshot(&cfg, &[format!("{db}.counter")]).await?;
    assert!(asked.contains("offset 0"), "{asked}");
    // The second read of every row arrives while the writer goes on.
    wait_for("100 more snapshot rows", T, || async {
        let evs = events_of(&tc.topic("counter"), 100_000, Duration::from_secs(2)).await?;
        Ok((evs.iter().filter(|e| e.op == Op::Read).count() >= 200).then_some(()))
    })
    .await?;
    writer.written(20).await?;
    writer.stop().await?;
    assert_changes_and_reads_in_place(
        &tc.topic("counter"),
        &mysql_counts(&db, "counter").await?,
        2..=2,
    )
    .await?;
    // A restart does not read the signal again: its offset is stored with the position.
    run.stop().await?;
    let stored = ecst::source::load_offset(&cfg, &cfg.offsets_topic())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no stored offset"))?;
    assert_eq!(stored.online.signals_next, Some(1));
    assert!(stored.online.tables.is_empty(), "{:?}", stored.online);
    let run = start(cfg, Components::Source);
    sql(format!("UPDATE `{db}`.counter SET n = n + 1 WHERE id = 1")).await?;
    assert_changes_and_reads_in_place(
        &tc.topic("counter"),
        &mysql_counts(&db, "counter").await?,
        2..=2,
    )
    .await?;
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_table_dropped_during_its_online_snapshot_ends_that_snapshot_and_the_other_tables_stream_on()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let (db, tc) = counter_streamed_and_big_to_add().await?;
    let cfg = write_config(&tc, true, None)?;
    // Paused after 100 rows of `big`, then released once the table is dropped.
    let (env, reached, release) = failpoint_released_by_file("online.rows", 100);
    let run = spawn_captured(&cfg, "source", &env, "info")?;
    wait_for_failpoint(&reached, T).await?;
    sql(format!("DROP TABLE `{db}`.big")).await?;
    std::fs::write(&release, b"")?;
    run.wait_for_output("its snapshot ends unfinished", T)
        .await?;
    // The other table streams on, and the stored state has no snapshot left to run.
    sql(format!("UPDATE `{db}`.counter SET n = n + 1 WHERE id = 7")).await?;
    let evs = wait_events(&tc.topic("counter"), 101, T).await?;
    assert_eq!(evs[100].op, Op::Update);
    let stored = wait_for("the end of the snapshot stored", T, || async {
        Ok(committed_offset(&tc)
            .await?
            .filter(|o| o.online.tables.is_empty()))
    })
    .await?;
    assert!(stored.tables.contains(&format!("{db}.big")));
    runs_on_then_kill(run).await
}

#[tokio::test]
async fn a_table_keyed_by_text_in_the_first_snapshot_is_read_online_in_checkpointed_chunks_and_kill_9_mid_table_loses_and_doubles_nothing()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = crate::ops::counter_table().await?;
    add_big_table(&db).await?;
    let mut tc = TestConfig::new(&db, &["counter", "big"]);
    tc.extra_source = "snapshot_chunk_size = 50".into();
    let cfg = write_config(&tc, true, None)?;
    let (pause, reached) = failpoint("online.rows", 1000);
    let run = spawn_captured(&cfg, "source", &pause, "info")?;
    run.wait_for_output("tables keyed by text are snapshotted online", T)
        .await?;
    // `counter` is read before the stream, as ever; both tables change from then on.
    wait_events(&tc.topic("counter"), 100, T).await?;
    let writer = Writer::start(&db, true);
    wait_for_failpoint(&reached, T).await?;
    // The progress inside `big` is stored chunk by chunk (the initial snapshot could store it
    // only at the table's end): a kill now loses only what is not committed.
    let big = format!("{db}.big");
    wait_for("a checkpoint inside big", T, || async {
        Ok(committed_offset(&tc)
            .await?
            .filter(|o| o.snapshot_completed)
            .and_then(|o| o.online.tables.first().cloned())
            .filter(|t| t.table == big && t.last_key.is_some() && t.rows_done < BIG_ROWS))
    })
    .await?;
    writer.written(20).await?;
    let mut run = kill_and_restart_until_online_finished(run, &cfg, writer).await?;
    for table in ["counter", "big"] {
        assert_changes_and_reads_in_place(
            &tc.topic(table),
            &mysql_counts(&db, table).await?,
            1..=1,
        )
        .await?;
    }
    run.child.kill().await?;
    Ok(())
}

#[tokio::test]
async fn with_a_watermark_table_the_first_snapshot_takes_no_lock_reads_every_table_online_leaves_out_rows_changed_between_the_watermarks_and_kill_9_mid_table_loses_and_doubles_nothing()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = crate::ops::counter_table().await?;
    add_big_table(&db).await?;
    let mut tc = TestConfig::new(&db, &["counter", "big"]);
    // MySQL's way (no read view position needed), run here on MariaDB by choosing it.
    tc.extra_source = format!(
        "snapshot_chunk_size = 50\nsnapshot_locking = \"online\"\nwatermark_table = \"{db}.ecst_watermarks\""
    );
    // ecst's user may not write yet: the source stops at its first chunk, naming the table,
    // the server's refusal and the statement that creates it.
    let refused = tokio::time::timeout(T, start(tc.config(true)?, Components::Source).join_error())
        .await?
        .unwrap_or_default();
    ensure!(
        refused.contains(&format!(
            "cannot write its watermark to `{db}.ecst_watermarks`"
        )) && refused.contains("CREATE TABLE IF NOT EXISTS")
            && refused.contains("grant"),
        "{refused}"
    );
    grant_watermark_writes(&db).await?;
    let cfg = write_config(&tc, true, None)?;
    let text = check_text(&cfg).await?;
    ensure!(
        text.lines().any(|l| l.starts_with("PASS")
            && l.contains("mysql snapshot method")
            && l.contains("no lock and no consistent read")
            && l.contains(&format!("watermarks written to {db}.ecst_watermarks"))),
        "{text}"
    );
    ensure!(
        text.lines().any(|l| l.starts_with("PASS")
            && l.contains("mysql watermark table")
            && l.contains("is missing: ecst creates it")),
        "{text}"
    );
    // The first chunk (of `counter`) pauses after its read, before its high watermark; later,
    // `big` pauses for good after 1000 rows, to be killed there.
    let (mut env, paused, release) = failpoint_released_by_file("online.between_watermarks", 0);
    env.push(("ECST_FAILPOINT_ONLINE_ROWS".into(), "1000".into()));
    let run = spawn_captured(&cfg, "source", &env, "info")?;
    run.wait_for_output("online snapshot running while the stream goes on", T)
        .await?;
    wait_for_failpoint(&paused, T).await?;
    // Committed after the chunk's read view and before its high watermark: the chunk shows
    // n = 0 for row 1, the stream n = 1 before the chunk goes in. Placed anyway, the chunk
    // would move row 1 back; it must leave it to the stream.
    sql(format!("UPDATE `{db}`.counter SET n = n + 1 WHERE id = 1")).await?;
    std::fs::remove_file(&paused)?;
    std::fs::write(&release, b"")?;
    run.wait_for_output("test failpoint released", T).await?;
    // That chunk is committed before the kill below (else the restart reads it again, at a
    // later read, which is right too but shows nothing of the watermarks).
    let config = tc.config(true)?;
    let counter_table = format!("{db}.counter");
    wait_for("the first chunk stored", T, || async {
        let stored = ecst::source::load_offset(&config, &config.offsets_topic()).await?;
        Ok(stored
            .filter(|o| {
                o.online
                    .tables
                    .first()
                    .is_some_and(|t| t.table != counter_table || t.rows_done > 0)
            })
            .map(|_| ()))
    })
    .await?;
    let writer = Writer::start(&db, true);
    writer.written(20).await?;
    wait_for_failpoint(&paused, T).await?;
    let run = kill_and_restart_until_online_finished(run, &cfg, writer).await?;
    let counter = assert_changes_and_reads_in_place(
        &tc.topic("counter"),
        &mysql_counts(&db, "counter").await?,
        0..=1,
    )
    .await?;
    let row_1: Vec<(Op, Option<i32>)> = counter
        .iter()
        .filter(|e| key_text(e) == "1")
        .map(|e| (e.op, n_of(e)))
        .take(1)
        .collect();
    ensure!(
        row_1 == [(Op::Update, Some(1))]
            && !counter
                .iter()
                .any(|e| key_text(e) == "1" && e.op == Op::Read),
        "row 1 changed between the watermarks: streamed, never read ({row_1:?})"
    );
    let big = assert_changes_and_reads_in_place(
        &tc.topic("big"),
        &mysql_counts(&db, "big").await?,
        0..=1,
    )
    .await?;
    assert_read_online(&big, &counter)?;
    runs_on_then_kill(run).await
}

#[tokio::test]
async fn with_a_watermark_table_a_table_added_to_a_running_deployment_and_ecst_snapshot_are_read_online_while_both_tables_change()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let (db, mut tc) = counter_streamed_and_big_to_add().await?;
    grant_watermark_writes(&db).await?;
    tc.extra_source =
        format!("snapshot_chunk_size = 50\nwatermark_table = \"{db}.ecst_watermarks\"");
    let writer = Writer::start(&db, true);
    writer.written(20).await?;
    let cfg = write_config(&tc, true, None)?;
    let run = spawn_captured(&cfg, "source", &[], "info")?;
    run.wait_for_output("snapshotting them online", T).await?;
    run.wait_for_output("online snapshot of table finished", T)
        .await?;
    // `ecst snapshot` (MySQL refuses it without a watermark table) reads `counter` again.
    let config = tc.config(true)?;
    let asked = ecst::source::signal::request_snapshot(&config, &[format!("{db}.counter")]).await?;
    ensure!(asked.contains("offset 0"), "{asked}");
    wait_for(
        "the signalled snapshot to be stored as finished",
        T,
        || async {
            let stored = ecst::source::load_offset(&config, &config.offsets_topic()).await?;
            Ok(stored
                .filter(|o| o.online.signals_next == Some(1) && o.online.tables.is_empty())
                .map(|_| ()))
        },
    )
    .await?;
    writer.written(20).await?;
    writer.stop().await?;
    // `counter`: read by the first snapshot, then at most once more (rows changed between a
    // chunk's watermarks are left to the stream); `big`: at most once.
    assert_changes_and_reads_in_place(
        &tc.topic("counter"),
        &mysql_counts(&db, "counter").await?,
        1..=2,
    )
    .await?;
    assert_changes_and_reads_in_place(&tc.topic("big"), &mysql_counts(&db, "big").await?, 0..=1)
        .await?;
    runs_on_then_kill(run).await
}
