//! Copies keep updating across what operators do to the database: RESET MASTER, a re-snapshot,
//! a position written by another server.

use std::time::Duration;

use anyhow::Result;
use bson::{Document, doc};
use ecst::app::Components;
use futures::TryStreamExt;
use rdkafka::Message;
use rdkafka::message::Headers;

use crate::common::*;

const T: Duration = Duration::from_secs(90);

/// The email of every order of user `id`.
async fn emails_of(db: &mongodb::Database, id: i32) -> Result<Vec<String>> {
    let docs: Vec<Document> = db
        .collection::<Document>("purchase_order")
        .find(doc! { "user.id": id })
        .await?
        .try_collect()
        .await?;
    Ok(docs
        .iter()
        .filter_map(|d| d.get_document("user").ok()?.get_str("email").ok())
        .map(str::to_string)
        .collect())
}

/// Waits until every order of user `id` holds `email`.
async fn wait_email(db: &mongodb::Database, id: i32, email: &str) -> Result<()> {
    wait_for(
        &format!("every order of user {id} to hold {email}"),
        T,
        || async {
            let e = emails_of(db, id).await?;
            Ok((!e.is_empty() && e.iter().all(|x| x == email)).then_some(()))
        },
    )
    .await
}

/// The seed scenario with `snapshot_mode = when_needed`, snapshotted and applied.
async fn seed_scenario() -> Result<(String, TestConfig, mongodb::Database)> {
    let db = seed_database().await?;
    let mut tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    tc.extra_source = "snapshot_mode = \"when_needed\"".into();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 2).await?;
    Ok((db, tc, mdb))
}

async fn set_email(db: &str, id: i32, email: &str) -> Result<()> {
    sql(format!(
        "UPDATE `{db}`.users SET email = '{email}' WHERE id = {id}"
    ))
    .await
}

#[tokio::test]
async fn after_reset_master_the_copies_keep_updating() -> Result<()> {
    let _exclusive = STACK_LOCK.write().await;
    let (db, tc, mdb) = seed_scenario().await?;
    let run = start(tc.config(true)?, Components::Both);
    set_email(&db, 1, "before.reset@x").await?;
    wait_email(&mdb, 1, "before.reset@x").await?;
    run.stop().await?;
    // The binlog starts again at file 1: every position (and version) the source and the
    // copies know is ahead of the new numbering.
    sql("RESET MASTER").await?;
    set_email(&db, 1, "while.down@x").await?;
    let run = start(tc.config(true)?, Components::Both);
    wait_email(&mdb, 1, "while.down@x").await?;
    set_email(&db, 1, "neha.parate@hotmail.com").await?;
    set_email(&db, 2, "after.reset@x").await?;
    wait_email(&mdb, 1, "neha.parate@hotmail.com").await?;
    wait_email(&mdb, 2, "after.reset@x").await?;
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_resnapshot_with_snapshot_mode_always_keeps_the_copies_updating_and_none_regresses()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let (db, mut tc, mdb) = seed_scenario().await?;
    let run = start(tc.config(true)?, Components::Both);
    set_email(&db, 1, "first@x").await?;
    wait_email(&mdb, 1, "first@x").await?;
    run.stop().await?;
    tc.extra_source = "snapshot_mode = \"always\"".into();
    set_email(&db, 1, "second@x").await?;
    let run = start(tc.config(true)?, Components::Both);
    wait_email(&mdb, 1, "second@x").await?;
    set_email(&db, 1, "third@x").await?;
    wait_email(&mdb, 1, "third@x").await?;
    // The old stream's events are still in the topic; a replay of it must change nothing.
    run.stop().await?;
    tc.sink = tc
        .sink
        .map(|s| s.replace(&format!("{}-sink", tc.name), &format!("{}-replay", tc.name)));
    let replay = start(tc.config(false)?, Components::Sink);
    let topics = vec![tc.topic("users"), tc.topic("product")];
    let group = format!("{}-replay", tc.name);
    wait_for(
        "the replaying group to read both topics to their end",
        T,
        || async { Ok(group_caught_up(&group, &topics).await?.then_some(())) },
    )
    .await?;
    assert_eq!(emails_of(&mdb, 1).await?, vec!["third@x", "third@x"]);
    replay.stop().await?;
    Ok(())
}

/// Sets the server's `server_id` (as a failover to another server would change it).
async fn set_server_id(id: u32) -> Result<()> {
    sql(format!("SET GLOBAL server_id = {id}")).await
}

#[tokio::test]
async fn a_position_written_by_another_server_stops_initial_and_resnapshots_when_needed()
-> Result<()> {
    let _exclusive = STACK_LOCK.write().await;
    let (db, mut tc, mdb) = seed_scenario().await?;
    let run = start(tc.config(true)?, Components::Both);
    set_email(&db, 1, "on.server.one@x").await?;
    wait_email(&mdb, 1, "on.server.one@x").await?;
    run.stop().await?;
    let mut admin_conn = admin().await?;
    let original: Option<u32> =
        mysql_async::prelude::Queryable::query_first(&mut admin_conn, "SELECT @@server_id").await?;
    admin_conn.disconnect().await?;
    let original = original.unwrap_or(1);
    // Another server's lineage: its GTIDs are in a domain this server never had, so no GTID
    // state finds the position here either.
    let cfg = tc.config(true)?;
    let mut stored = ecst::source::load_offset(&cfg, &cfg.offsets_topic())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no stored position"))?;
    stored.gtid_set = Some("99-7-5".into());
    store_offset(&tc, &stored).await?;
    set_server_id(original + 100).await?;
    let outcome = async {
        // snapshot_mode = initial: a clear stop, naming both servers.
        tc.extra_source = "snapshot_mode = \"initial\"".into();
        let refused = start(tc.config(true)?, Components::Source);
        let err = tokio::time::timeout(T, refused.join_error())
            .await?
            .unwrap_or_default();
        assert!(
            err.contains("another server") && err.contains(&format!("server_id {original}")),
            "{err}"
        );
        // when_needed: a new snapshot in a new epoch, and the copies go on updating.
        tc.extra_source = "snapshot_mode = \"when_needed\"".into();
        set_email(&db, 1, "on.server.two@x").await?;
        let run = start(tc.config(true)?, Components::Both);
        wait_email(&mdb, 1, "on.server.two@x").await?;
        set_email(&db, 1, "later@x").await?;
        wait_email(&mdb, 1, "later@x").await?;
        run.stop().await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    set_server_id(original).await?;
    outcome
}

#[tokio::test]
async fn truncate_drop_and_rename_of_a_captured_table_are_counted_and_logged_not_ignored()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]);
    let port = free_port()?;
    let cfg = write_config(&tc, true, Some(port))?;
    let run = spawn_captured(&cfg, "source", &[], "warn")?;
    wait_events(&tc.topic("users"), 4, T).await?;
    sql(format!("TRUNCATE TABLE `{db}`.users")).await?;
    sql(format!("RENAME TABLE `{db}`.product TO `{db}`.product_old")).await?;
    for op in ["truncate", "rename"] {
        let table = if op == "truncate" { "users" } else { "product" };
        let line =
            format!("ecst_source_table_lifecycle_total{{table=\"{db}.{table}\",op=\"{op}\"}} 1");
        wait_for(&format!("the {op} counted"), T, || async {
            let m = http_get(port, "/metrics").await?;
            Ok(m.lines().any(|l| l == line).then_some(()))
        })
        .await?;
    }
    run.wait_for_output("a captured table was truncated", Duration::from_secs(5))
        .await?;
    assert!(
        run.output()
            .contains("a truncate event (op t) is published")
    );
    Ok(())
}

/// The GTID replica of `dev/stack up mysql-replica`.
fn replica_port() -> u16 {
    std::env::var("ECST_MYSQL_REPLICA_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(13308)
}

async fn replica_conn() -> Result<mysql_async::Conn> {
    let e = endpoints();
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(e.mysql_host)
        .tcp_port(replica_port())
        .user(Some(e.mysql_admin_user))
        .pass(Some(e.mysql_admin_password))
        .prefer_socket(false);
    Ok(mysql_async::Conn::new(opts).await?)
}

async fn on_replica(stmt: &str) -> Result<()> {
    let mut c = replica_conn().await?;
    mysql_async::prelude::Queryable::query_drop(&mut c, stmt).await?;
    c.disconnect().await?;
    Ok(())
}

async fn primary_gtid_pos() -> Result<String> {
    let mut c = admin().await?;
    let pos: Option<String> =
        mysql_async::prelude::Queryable::query_first(&mut c, "SELECT @@gtid_binlog_pos").await?;
    c.disconnect().await?;
    Ok(pos.unwrap_or_default())
}

/// (Re)attaches the replica to the primary from the primary's position of now, with an empty
/// binlog of its own, so that earlier tests (a RESET MASTER, an earlier failover) leave nothing
/// behind. Earlier data is not copied: the test's database is created afterwards.
async fn attach_replica() -> Result<()> {
    if on_replica("DO 1").await.is_err() {
        stack(&["start", "mysql-replica"]).await?;
    }
    let e = endpoints();
    let pos = primary_gtid_pos().await?;
    on_replica(&format!(
        "STOP SLAVE; RESET SLAVE ALL; RESET MASTER; SET GLOBAL gtid_slave_pos = '{pos}'; \
         CHANGE MASTER TO MASTER_HOST = '{host}', MASTER_PORT = {port}, MASTER_USER = '{user}', \
         MASTER_PASSWORD = '{pw}', MASTER_USE_GTID = slave_pos, MASTER_CONNECT_RETRY = 1; START SLAVE",
        host = e.mysql_host,
        port = e.mysql_port,
        user = e.mysql_user,
        pw = e.mysql_password,
    ))
    .await
}

/// Waits until the replica has applied everything the primary has written so far.
async fn replica_caught_up() -> Result<()> {
    let pos = primary_gtid_pos().await?;
    let mut c = replica_conn().await?;
    let waited: Option<i64> = mysql_async::prelude::Queryable::query_first(
        &mut c,
        format!("SELECT MASTER_GTID_WAIT('{pos}', 60)"),
    )
    .await?;
    c.disconnect().await?;
    anyhow::ensure!(
        waited == Some(0),
        "the replica did not reach {pos} within 60 s"
    );
    Ok(())
}

/// The test configuration pointed at the promoted replica instead of the primary.
fn on_the_replica(tc: &TestConfig) -> Result<ecst::config::Config> {
    let e = endpoints();
    let toml = tc.toml(true).replace(
        &format!("port = {}\n", e.mysql_port),
        &format!("port = {}\n", replica_port()),
    );
    anyhow::ensure!(toml.contains(&format!("port = {}", replica_port())));
    ecst::config::Config::from_toml_str(&toml, Vec::new()).map_err(|e| anyhow::anyhow!("{e}"))
}

#[tokio::test]
async fn after_a_failover_to_a_promoted_replica_the_copies_keep_updating_from_its_gtids()
-> Result<()> {
    // Exclusive: it uses the one replica, and must not see another test's RESET MASTER.
    let _exclusive = STACK_LOCK.write().await;
    attach_replica().await?;
    let (db, mut tc, mdb) = seed_scenario().await?;
    // Not when_needed: a failover must not be mistaken for a reason to re-snapshot.
    tc.extra_source = "snapshot_mode = \"initial\"".into();
    let run = start(tc.config(true)?, Components::Both);
    wait_events(&tc.topic("users"), 4, T).await?;
    set_email(&db, 1, "on.the.primary@x").await?;
    wait_email(&mdb, 1, "on.the.primary@x").await?;
    run.stop().await?;
    // Written while ecst is down, replicated before the primary is lost.
    set_email(&db, 1, "replicated@x").await?;
    replica_caught_up().await?;
    on_replica("STOP SLAVE; RESET SLAVE ALL").await?;
    // The promoted replica takes writes under its own server_id.
    on_replica(&format!(
        "UPDATE `{db}`.users SET email = 'on.the.new.primary@x' WHERE id = 2"
    ))
    .await?;
    let run = start(on_the_replica(&tc)?, Components::Both);
    wait_email(&mdb, 1, "replicated@x").await?;
    wait_email(&mdb, 2, "on.the.new.primary@x").await?;
    on_replica(&format!(
        "UPDATE `{db}`.users SET email = 'neha.parate@hotmail.com' WHERE id = 1"
    ))
    .await?;
    wait_email(&mdb, 1, "neha.parate@hotmail.com").await?;
    run.stop().await?;
    // Resumed, not re-snapshotted: the users topic holds the one snapshot (4 reads) and the
    // four updates, each once.
    let evs = wait_events(&tc.topic("users"), 8, T).await?;
    let ops: Vec<ecst::events::Op> = evs.iter().map(|e| e.op).collect();
    use ecst::events::Op::{Read, Update};
    assert_eq!(
        ops,
        [Read, Read, Read, Read, Update, Update, Update, Update],
        "{evs:?}"
    );
    // The replica's positions are in a new epoch, so they sort after the primary's.
    let raw = read_topic(&tc.topic("users"), 8, T).await?;
    let epochs: Vec<u64> = raw
        .iter()
        .map(|m| {
            m.headers()
                .expect("headers")
                .iter()
                .find(|h| h.key == ecst::events::HEADER_EPOCH)
                .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
                .expect("an epoch header")
        })
        .collect();
    assert!(epochs[..5].iter().all(|e| *e == epochs[0]), "{epochs:?}");
    assert!(epochs[5..].iter().all(|e| *e > epochs[0]), "{epochs:?}");
    Ok(())
}

#[tokio::test]
async fn a_failover_to_a_replica_that_lacks_transactions_stops_the_source_naming_both_servers()
-> Result<()> {
    let _exclusive = STACK_LOCK.write().await;
    attach_replica().await?;
    let (db, mut tc, mdb) = seed_scenario().await?;
    tc.extra_source = "snapshot_mode = \"initial\"".into();
    replica_caught_up().await?;
    // The replica stops applying: what the primary writes now, it never gets.
    on_replica("STOP SLAVE").await?;
    let run = start(tc.config(true)?, Components::Both);
    set_email(&db, 1, "never.replicated@x").await?;
    wait_email(&mdb, 1, "never.replicated@x").await?;
    run.stop().await?;
    on_replica("RESET SLAVE ALL").await?;
    let refused = start(on_the_replica(&tc)?, Components::Source);
    let err = tokio::time::timeout(T, refused.join_error())
        .await?
        .unwrap_or_default();
    assert!(err.contains("another server"), "{err}");
    // The copies keep what the lost primary wrote; nothing moved them back.
    assert_eq!(
        emails_of(&mdb, 1).await?,
        vec!["never.replicated@x", "never.replicated@x"]
    );
    Ok(())
}

#[tokio::test]
async fn a_table_added_to_source_tables_is_snapshotted_online_after_the_changes_before_it_and_both_replay_exactly()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let mut tc = TestConfig::new(&db, &["users"]);
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    run.stop().await?;
    // While ecst is down: a change to the table about to be added, and one to the captured one.
    sql(format!(
        "UPDATE `{db}`.product SET price = 299 WHERE id = 1"
    ))
    .await?;
    set_email(&db, 1, "while.down@x").await?;
    tc.tables.push(format!("{db}.product"));
    let run = start(tc.config(true)?, Components::Source);
    // The added table's rows (MariaDB: after the change made while ecst was down, streamed).
    wait_events(&tc.topic("product"), 3, T).await?;
    sql(format!(
        "UPDATE `{db}`.product SET price = 650 WHERE id = 1"
    ))
    .await?;
    set_email(&db, 1, "after.add@x").await?;
    let product = wait_for("the change after the read", T, || async {
        let evs = events_of(&tc.topic("product"), 10, Duration::from_secs(2)).await?;
        let price = evs
            .last()
            .and_then(|e| e.after.as_ref())
            .and_then(|a| a.get_i32("price").ok());
        Ok((price == Some(650)).then_some(evs))
    })
    .await?;
    let users = wait_events(&tc.topic("users"), 6, T).await?;
    run.stop().await?;
    use ecst::events::Op::{Read, Update};
    let ops =
        |evs: &[ecst::sink::decode::DecodedEvent]| evs.iter().map(|e| e.op).collect::<Vec<_>>();
    // The other table resumed at its stored position: no second snapshot, no lost change.
    assert_eq!(
        ops(&users),
        [Read, Read, Read, Read, Update, Update],
        "{users:?}"
    );
    let price = |e: &ecst::sink::decode::DecodedEvent| {
        e.after.as_ref().and_then(|a| a.get_i32("price").ok())
    };
    let expected = if server_is_mariadb().await? {
        // Online: the change made while ecst was down is streamed, then the rows are read at
        // a read view after it.
        assert_eq!(
            ops(&product),
            [Update, Read, Read, Read, Update],
            "{product:?}"
        );
        assert_eq!(price(&product[0]), Some(299));
        assert_eq!(
            price(&product[1]),
            Some(299),
            "the read shows the change before it"
        );
        // Versions follow the order of the changes: a sink never lets the read undo the
        // change after it, nor the change before it undo the read.
        assert!(product[0].version < product[1].version);
        5
    } else {
        // MySQL (the compat workflow): read before the stream resumes; its stream admits only
        // changes after the read, so the change made while ecst was down is in the read only.
        assert_eq!(ops(&product), [Read, Read, Read, Update], "{product:?}");
        assert_eq!(price(&product[0]), Some(299));
        4
    };
    let last = &product[expected - 1];
    assert_eq!(price(last), Some(650));
    assert!(product[expected - 2].version < last.version);
    // Both topics hold exactly the tables' rows (no event beyond those counted).
    let more = events_of(&tc.topic("product"), expected + 1, Duration::from_secs(3)).await?;
    assert_eq!(more.len(), expected);
    Ok(())
}

#[tokio::test]
async fn a_position_stored_by_another_server_whose_gtids_this_one_has_is_resumed_after_them_with_nothing_lost_or_doubled()
-> Result<()> {
    use ecst::events::Op;
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let topic = tc.topic("users");
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&topic, 4, T).await?;
    set_email(&db, 1, "before@x").await?;
    wait_events(&topic, 5, T).await?;
    run.stop().await?;
    // As a promoted replica sees it: the position was written by another server (MySQL: another
    // server_uuid), and this one has every transaction of its GTID state.
    let mut stored = committed_offset(&tc)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no stored position"))?;
    anyhow::ensure!(
        stored.gtid_set.is_some(),
        "a GTID state is stored: {stored:?}"
    );
    stored.server_id = stored.server_id.map(|id| id + 100);
    if stored.server_uuid.is_some() {
        stored.server_uuid = Some("00000000-0000-0000-0000-00000000e057".into());
    }
    store_offset(&tc, &stored).await?;
    set_email(&db, 2, "while.stopped@x").await?;
    let cfg_path = write_config(&tc, true, None)?;
    let mut run = spawn_captured(&cfg_path, "source", &[], "info")?;
    run.wait_for_output("resuming after its GTIDs", T).await?;
    set_email(&db, 3, "after@x").await?;
    wait_events(&topic, 7, T).await?;
    let evs = events_of(&topic, 8, Duration::from_secs(3)).await?;
    run.child.kill().await?;
    // No new snapshot, nothing lost or repeated: the 4 reads, then each update once, in order.
    let ops: Vec<(Op, i32)> = evs
        .iter()
        .map(|e| (e.op, e.key.get_i32("id").unwrap_or(-1)))
        .collect();
    assert_eq!(
        ops,
        vec![
            (Op::Read, 1),
            (Op::Read, 2),
            (Op::Read, 3),
            (Op::Read, 4),
            (Op::Update, 1),
            (Op::Update, 2),
            (Op::Update, 3),
        ]
    );
    Ok(())
}
