//! Failures name their real cause, retry loops are visible, and shutdown is quiet.

use std::time::Duration;

use anyhow::{Context, Result};
use mysql_async::prelude::Queryable;

use crate::common::*;

const T: Duration = Duration::from_secs(90);

/// The binlog file the server writes now.
async fn current_binlog_file() -> Result<String> {
    let mut c = admin().await?;
    let row: Option<mysql_async::Row> = c.query_first("SHOW MASTER STATUS").await?;
    c.disconnect().await?;
    row.and_then(|r| r.get::<String, _>(0))
        .context("the server reports a binlog file")
}

#[tokio::test]
async fn a_binlog_position_the_server_refuses_stops_the_source_with_the_servers_own_error()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let cfg = write_config(&tc, true, None)?;
    // A stored position inside a file the server has, but not at an event boundary (as a
    // position of another server with the same file names would be, stored before positions
    // carried the server's identity): preflight passes, and the binlog reader's dump request
    // is what the server refuses.
    store_offset(
        &tc,
        &ecst::offsets::SourceOffset {
            position: ecst::offsets::BinlogPosition {
                file: current_binlog_file().await?,
                pos: 5,
            },
            gtid: None,
            gtid_set: None,
            epoch: 0,
            server_id: None,
            server_uuid: None,
            snapshot_completed: true,
            tables: tc.tables.clone(),
            snapshot_segments: Vec::new(),
            online: Default::default(),
            within: None,
        },
    )
    .await?;
    let mut run = spawn_captured(&cfg, "source", &[], "info")?;
    let status = tokio::time::timeout(T, run.child.wait())
        .await
        .context("the source stops instead of retrying for ever")??;
    let out = run.output();
    assert!(!status.success(), "a refused position is a failure: {out}");
    assert!(
        out.contains("1236"),
        "the server's error (1236) is what the source reports:\n{out}"
    );
    assert!(
        !out.contains("internal channel closed"),
        "the symptom seen across the channel is not reported as the cause:\n{out}"
    );
    Ok(())
}

/// Sets an hourly connection quota on every account of ecst's MySQL user (0: none) and
/// resets the counters.
async fn connection_quota(per_hour: u32) -> Result<()> {
    let mut c = admin().await?;
    let hosts: Vec<String> = c
        .exec(
            "SELECT Host FROM mysql.user WHERE User = ?",
            (endpoints().mysql_user,),
        )
        .await?;
    for host in hosts {
        c.query_drop(format!(
            "ALTER USER '{}'@'{host}' WITH MAX_CONNECTIONS_PER_HOUR {per_hour}",
            endpoints().mysql_user
        ))
        .await?;
    }
    c.query_drop("FLUSH USER_RESOURCES").await?;
    c.disconnect().await?;
    Ok(())
}

/// Cuts every connection of ecst's MySQL user (the caller holds the stack exclusively).
async fn kill_ecst_connections() -> Result<()> {
    let mut admin_conn = admin().await?;
    let ids: Vec<u64> = admin_conn
        .exec(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ? AND ID <> CONNECTION_ID()",
            (endpoints().mysql_user,),
        )
        .await?;
    for id in ids {
        // Gone already: fine.
        let _gone = admin_conn.query_drop(format!("KILL {id}")).await;
    }
    admin_conn.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn a_gtid_lookup_cut_after_the_snapshot_is_retried_and_the_positions_keep_their_gtid_state()
-> Result<()> {
    let _exclusive = STACK_LOCK.write().await;
    // A binlog file of its own: one that an earlier test filled with events over
    // max_allowed_packet has no GTID state for the server to give at all.
    sql("FLUSH BINARY LOGS").await?;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let cfg = write_config(&tc, true, None)?;
    // The lookup of the snapshot position's GTID state pauses with its connection open; the
    // connection is cut and the lookup let go, so its query meets a closed connection.
    let (env, reached, release) = failpoint_released_by_file("stream.gtid_lookup", 0);
    let run = spawn_captured(&cfg, "source", &env, "info")?;
    wait_for_failpoint(&reached, T).await?;
    kill_ecst_connections().await?;
    std::fs::write(&release, b"go")?;
    sql(format!(
        "UPDATE `{db}`.users SET email = 'after.the.cut@x' WHERE id = 1"
    ))
    .await?;
    let evs = wait_events(&tc.topic("users"), 5, T).await?;
    assert!(evs.iter().any(|e| {
        e.after.as_ref().and_then(|a| a.get_str("email").ok()) == Some("after.the.cut@x")
    }));
    let parsed = tc.config(true)?;
    let stored = wait_for("the change's position to be stored", T, || async {
        Ok(ecst::source::load_offset(&parsed, &parsed.offsets_topic())
            .await?
            .filter(|o| o.snapshot_completed && o.gtid.is_some()))
    })
    .await?;
    let _removed = std::fs::remove_file(&release);
    let out = run.output();
    assert!(
        stored.gtid_set.as_deref().is_some_and(|g| !g.is_empty()),
        "the stored position carries the server's GTID state, not none: {stored:?}\n{out}"
    );
    Ok(())
}

#[tokio::test]
async fn while_mysql_refuses_the_reader_ready_metrics_and_log_name_the_cause_until_it_recovers()
-> Result<()> {
    let _exclusive = STACK_LOCK.write().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let port = free_port()?;
    let cfg = write_config(&tc, true, Some(port))?;
    let run = spawn_captured(&cfg, "source", &[], "info")?;
    wait_for("ready", T, || async {
        Ok(http_get(port, "/ready")
            .await
            .ok()
            .filter(|r| r.starts_with("HTTP/1.1 200"))
            .map(|_| ()))
    })
    .await?;
    // A quota of one new connection an hour, then ecst's connections cut: the session's
    // preflight connection gets the one, the binlog reader's is refused (1226), and so is
    // every later attempt until the quota is lifted.
    // Ready comes with the snapshot's end and the binlog reader connects just after: its
    // connection must be among those cut, or it would hold the quota's one connection.
    run.wait_for_output("binlog stream started", T).await?;
    connection_quota(1).await?;
    kill_ecst_connections().await?;
    let outcome = async {
        let body = wait_for("/ready to name the refusal", T, || async {
            let r = http_get(port, "/ready").await?;
            Ok((r.starts_with("HTTP/1.1 503") && r.contains("1226")).then_some(r))
        })
        .await?;
        assert!(
            body.contains("source") && body.contains("max_connections_per_hour"),
            "{body}"
        );
        let metrics = http_get(port, "/metrics").await?;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("ecst_component_retrying{component=\"source\"} 1")),
            "retrying gauge:\n{metrics}"
        );
        assert!(
            metrics.lines().any(|l| l.starts_with(
                "ecst_component_errors_total{component=\"source\",kind=\"mysql_1226\"}"
            )),
            "errors by kind:\n{metrics}"
        );
        assert!(metrics.contains("ecst_component_last_error_timestamp_seconds"));
        run.wait_for_output("max_connections_per_hour", Duration::from_secs(5))
            .await?;
        let out = run.output();
        assert!(
            out.lines()
                .any(|l| l.contains("WARN") && l.contains("1226") && l.contains("attempts")),
            "the log line carries the cause and the attempt count:\n{out}"
        );
        assert!(
            !out.contains("internal channel closed"),
            "the reader's own error is reported, not the closed channel:\n{out}"
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    connection_quota(0).await?;
    outcome.with_context(|| format!("ecst's output:\n{}", run.output()))?;
    // Connections allowed again: the source recovers by itself and says so everywhere.
    sql(format!(
        "UPDATE `{db}`.users SET email = 'after@x' WHERE id = 1"
    ))
    .await?;
    let evs = wait_events(&tc.topic("users"), 5, T).await?;
    assert!(
        evs.iter()
            .any(|e| e.after.as_ref().and_then(|a| a.get_str("email").ok()) == Some("after@x"))
    );
    wait_for("ready again", T, || async {
        Ok(http_get(port, "/ready")
            .await
            .ok()
            .filter(|r| r.starts_with("HTTP/1.1 200"))
            .map(|_| ()))
    })
    .await?;
    let metrics = http_get(port, "/metrics").await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ecst_component_retrying{component=\"source\"} 0")),
        "{metrics}"
    );
    Ok(())
}

/// Starts `ecst <cmd>` on the seed scenario, lets it work, sends SIGTERM; returns its output.
async fn run_then_sigterm(cmd: &str) -> Result<String> {
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 2).await?;
    let cfg = write_config(&tc, true, None)?;
    // The sink alone is fed by a source of its own, which is not the process under test.
    let feeder = if cmd == "sink" {
        Some(spawn(&cfg, "source")?)
    } else {
        None
    };
    let mut run = spawn_captured(&cfg, cmd, &[], "info")?;
    if cmd == "source" {
        wait_events(&tc.topic("users"), 4, T).await?;
    } else {
        let orders = mdb.collection::<bson::Document>("purchase_order");
        sql(format!(
            "UPDATE `{db}`.users SET email = 'neha.parate@hotmail.com' WHERE id = 1"
        ))
        .await?;
        wait_for("the new copy in every order", T, || async {
            let n = orders
                .count_documents(bson::doc! { "user.email": "neha.parate@hotmail.com" })
                .await?;
            Ok((n == 2).then_some(()))
        })
        .await?;
    }
    sigterm(&run.child)?;
    let status = tokio::time::timeout(Duration::from_secs(40), run.child.wait())
        .await
        .context("exits within the shutdown deadline")??;
    if let Some(mut f) = feeder {
        f.kill().await?;
    }
    let out = run.output();
    assert!(
        status.success(),
        "`ecst {cmd}` exits 0 on SIGTERM, got {status}:\n{out}"
    );
    assert!(
        !out.contains("panicked"),
        "`ecst {cmd}` prints no panic on shutdown:\n{out}"
    );
    Ok(out)
}

#[tokio::test]
async fn sigterm_stops_ecst_run_with_exit_0_and_no_panic() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let out = run_then_sigterm("run").await?;
    assert!(out.contains("stopped"), "{out}");
    Ok(())
}

#[tokio::test]
async fn sigterm_stops_ecst_sink_with_exit_0_and_no_panic() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    run_then_sigterm("sink").await?;
    Ok(())
}

#[tokio::test]
async fn sigterm_stops_ecst_source_with_exit_0_and_no_panic() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    run_then_sigterm("source").await?;
    Ok(())
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once_while_the_first_one_drains() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let cfg = write_config(&tc, true, None)?;
    // A reader paused for good (test pause point) cannot drain: the first SIGTERM waits for
    // the shutdown deadline (20 s here), the second one must not.
    let (env, reached) = failpoint("snapshot.rows", 1);
    let mut run = spawn_captured(&cfg, "source", &env, "info")?;
    wait_for_failpoint(&reached, T).await?;
    sigterm(&run.child)?;
    run.wait_for_output("shutdown requested", Duration::from_secs(10))
        .await?;
    let sent = std::time::Instant::now();
    sigterm(&run.child)?;
    let status = tokio::time::timeout(Duration::from_secs(10), run.child.wait())
        .await
        .context("a second SIGTERM exits at once")??;
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "exited {:?} after the second signal",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(130), "{}", run.output());
    assert!(!run.output().contains("panicked"), "{}", run.output());
    Ok(())
}

#[tokio::test]
async fn a_change_larger_than_kafka_takes_stops_the_source_naming_its_topic_and_size() -> Result<()>
{
    let _shared = STACK_LOCK.read().await;
    let db = unique("big");
    sql(format!("CREATE DATABASE `{db}`")).await?;
    sql(format!(
        "CREATE TABLE `{db}`.blobs (id INT PRIMARY KEY, b LONGBLOB)"
    ))
    .await?;
    sql(format!("INSERT INTO `{db}`.blobs VALUES (1, 'small')")).await?;
    let tc = TestConfig::new(&db, &["blobs"]);
    let cfg = write_config(&tc, true, None)?;
    let mut run = spawn_captured(&cfg, "source", &[], "info")?;
    wait_events(&tc.topic("blobs"), 1, T).await?;
    // 40 MiB after a small before image fits; then 40 MiB before and 40 MiB after (80 MiB as
    // one record) does not. Built by the server: no client packet carries them.
    let mib40 = 40 * 1024 * 1024;
    sql(format!(
        "UPDATE `{db}`.blobs SET b = REPEAT('x', {mib40}) WHERE id = 1"
    ))
    .await?;
    sql(format!(
        "UPDATE `{db}`.blobs SET b = REPEAT('y', {mib40}) WHERE id = 1"
    ))
    .await?;
    let status = tokio::time::timeout(T, run.child.wait())
        .await
        .context("the source stops instead of retrying for ever")??;
    let out = run.output();
    assert!(!status.success(), "a record too large is a failure: {out}");
    assert!(
        out.contains(&format!("a change on topic `{}`", tc.topic("blobs")))
            && out.contains("more than the 67108864 bytes ecst produces"),
        "the source names the topic, the size and the limit:\n{out}"
    );
    let evs = wait_events(&tc.topic("blobs"), 2, T).await?;
    assert_eq!(
        evs.len(),
        2,
        "the snapshot row and the 40 MiB change, nothing after"
    );
    // Events over max_allowed_packet make the server's BINLOG_GTID_POS NULL for every later
    // position of their file: the tests after this one get a new file.
    sql("FLUSH BINARY LOGS").await?;
    Ok(())
}

#[tokio::test]
async fn a_stored_position_inside_a_split_transaction_that_the_binlog_does_not_hold_stops_the_source_naming_the_fix()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let cfg = write_config(&tc, true, None)?;
    let mut first = spawn(&cfg, "source")?;
    wait_events(&tc.topic("users"), 4, T).await?;
    first.kill().await?;
    first.wait().await?;
    let mut stored = committed_offset(&tc).await?.context("a stored position")?;
    // As if a transaction after it had been split and its first row published; the
    // transaction the binlog then holds there is another one.
    stored.within = Some(ecst::offsets::Within {
        gtid: Some("0-999-1".into()),
        rows: [(format!("{db}.users"), 1)].into_iter().collect(),
        next_row: 1,
    });
    store_offset(&tc, &stored).await?;
    let mut run = spawn_captured(&cfg, "source", &[], "info")?;
    sql(format!(
        "UPDATE `{db}`.users SET email = 'split@example.com' WHERE id = 1"
    ))
    .await?;
    let status = tokio::time::timeout(T, run.child.wait())
        .await
        .context("the source stops instead of guessing which rows are published")??;
    let out = run.output();
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("split across Kafka transactions")
            && out.contains("0-999-1")
            && out.contains("re-snapshot"),
        "the message names the stored transaction and the fix:\n{out}"
    );
    let evs = events_of(&tc.topic("users"), 5, Duration::from_secs(3)).await?;
    assert_eq!(
        evs.len(),
        4,
        "nothing of the other transaction is published"
    );
    Ok(())
}

#[tokio::test]
async fn a_keyless_table_whose_snapshot_outlasts_the_transaction_timeout_stops_the_source_naming_it_and_the_fixes()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = unique("keyless");
    sql(format!("CREATE DATABASE `{db}`")).await?;
    sql(format!("CREATE TABLE `{db}`.log (msg VARCHAR(20), n INT)")).await?;
    sql(format!(
        "INSERT INTO `{db}`.log SELECT 'line', seq FROM {}",
        numbers(50)
    ))
    .await?;
    let mut tc = TestConfig::new(&db, &["log"]);
    tc.extra_source = "snapshot_chunk_size = 10\ntransaction_timeout_ms = 10000".into();
    let cfg = write_config(&tc, true, None)?;
    // The table's one scan pauses after its first rows, as a table too large to read within
    // the transaction timeout would keep its one transaction open. Before, the broker aborted
    // the transaction and the snapshot read the table again, for ever (here: waited for ever).
    let (env, reached) = failpoint("snapshot.rows", 10);
    let mut run = spawn_captured(&cfg, "source", &env, "info")?;
    wait_for_failpoint(&reached, T).await?;
    let status = tokio::time::timeout(T, run.child.wait())
        .await
        .context("the source stops by itself")??;
    let out = run.output();
    assert!(
        !status.success()
            && out.contains("cannot be checkpointed")
            && out.contains(&format!("{db}.log"))
            && out.contains("raise source.transaction_timeout_ms"),
        "a definite stop naming the table and the fixes:\n{out}"
    );
    Ok(())
}
