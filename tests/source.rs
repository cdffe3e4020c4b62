//! Source scenarios on the real stack: MariaDB binlog → Avro in Kafka.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bson::Bson;
use ecst::app::Components;
use ecst::events::Op;
use mysql_async::prelude::Queryable;
use rdkafka::Message;

use crate::common::*;

const T: Duration = Duration::from_secs(60);

fn email(ev: &ecst::sink::decode::DecodedEvent, image: &str) -> Option<String> {
    let d = if image == "before" {
        ev.before.as_ref()
    } else {
        ev.after.as_ref()
    }?;
    d.get_str("email").ok().map(str::to_string)
}

#[tokio::test]
async fn seed_rows_are_snapshotted_then_nehas_email_update_is_one_u_event() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]);
    let run = start(tc.config(true)?, Components::Source);
    let snap = wait_events(&tc.topic("users"), 4, T).await?;
    assert!(
        snap.iter().all(|e| e.op == Op::Read),
        "snapshot events are reads"
    );
    let ids: Vec<i32> = snap
        .iter()
        .filter_map(|e| e.key.get_i32("id").ok())
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    assert_eq!(wait_events(&tc.topic("product"), 3, T).await?.len(), 3);
    sql(format!(
        "UPDATE `{db}`.users SET email = 'neha.parate@hotmail.com' WHERE id = 1"
    ))
    .await?;
    let evs = wait_events(&tc.topic("users"), 5, T).await?;
    assert_eq!(evs.len(), 5, "exactly one new event");
    let u = &evs[4];
    assert_eq!(u.op, Op::Update);
    assert_eq!(email(u, "before").as_deref(), Some("neha.parate@gmail.com"));
    assert_eq!(
        email(u, "after").as_deref(),
        Some("neha.parate@hotmail.com")
    );
    assert!(
        u.version > snap[3].version,
        "stream versions sort after the snapshot's"
    );
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn inserts_updates_deletes_and_tombstones_are_streamed_in_order() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    sql(format!(
        "INSERT INTO `{db}`.users VALUES (5, 'Test', 'User', 'test@example.com')"
    ))
    .await?;
    sql(format!(
        "UPDATE `{db}`.users SET lastname = 'Changed' WHERE id = 5"
    ))
    .await?;
    sql(format!("DELETE FROM `{db}`.users WHERE id = 5")).await?;
    let evs = wait_events(&tc.topic("users"), 7, T).await?;
    let ops: Vec<Op> = evs[4..].iter().map(|e| e.op).collect();
    assert_eq!(ops, vec![Op::Create, Op::Update, Op::Delete]);
    assert_eq!(
        evs[6]
            .before
            .as_ref()
            .and_then(|b| b.get_str("lastname").ok()),
        Some("Changed")
    );
    let raw = read_topic(&tc.topic("users"), 8, T).await?;
    let last = raw.last().context("messages")?;
    assert!(last.payload().is_none(), "a tombstone follows the delete");
    assert_eq!(
        last.key(),
        raw[raw.len() - 2].key(),
        "tombstone has the deleted key"
    );
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_multi_statement_transaction_arrives_whole_and_in_commit_order() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    let mut c = admin().await?;
    let mut tx = c.start_transaction(mysql_async::TxOpts::default()).await?;
    tx.query_drop(format!(
        "UPDATE `{db}`.users SET firstname = CONCAT(firstname, '!') WHERE id IN (1, 2, 3)"
    ))
    .await?;
    tx.query_drop(format!(
        "UPDATE `{db}`.users SET firstname = 'Neha?' WHERE id = 1"
    ))
    .await?;
    tx.commit().await?;
    let evs = wait_events(&tc.topic("users"), 8, T).await?;
    let after: Vec<(i32, String)> = evs[4..]
        .iter()
        .map(|e| {
            (
                e.key.get_i32("id").unwrap_or(-1),
                e.after
                    .as_ref()
                    .and_then(|a| a.get_str("firstname").ok())
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        after,
        vec![
            (1, "Neha!".into()),
            (2, "Aravind!".into()),
            (3, "Mayur!".into()),
            (1, "Neha?".into())
        ]
    );
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn alter_table_mid_stream_registers_a_new_schema_and_events_continue() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    sql(format!(
        "ALTER TABLE `{db}`.users ADD COLUMN phone VARCHAR(20) NULL"
    ))
    .await?;
    sql(format!(
        "UPDATE `{db}`.users SET phone = '+91-98765' WHERE id = 2"
    ))
    .await?;
    sql(format!("ALTER TABLE `{db}`.users DROP COLUMN lastname")).await?;
    sql(format!(
        "UPDATE `{db}`.users SET firstname = 'Mayur2' WHERE id = 3"
    ))
    .await?;
    let evs = wait_events(&tc.topic("users"), 6, T).await?;
    let after = evs[4].after.as_ref().context("after")?;
    assert_eq!(after.get_str("phone").ok(), Some("+91-98765"));
    let after = evs[5].after.as_ref().context("after")?;
    assert!(after.get("lastname").is_none() && after.get_str("firstname").ok() == Some("Mayur2"));
    let raw = read_topic(&tc.topic("users"), 6, T).await?;
    let ids: Vec<u32> = raw
        .iter()
        .filter_map(|m| m.payload())
        .filter_map(|p| ecst::events::registry::unframe(p).ok().map(|(id, _)| id))
        .collect();
    assert_eq!(
        ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
        3,
        "three value schema versions: {ids:?}"
    );
    assert!(!run.is_finished());
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn add_column_not_null_with_a_constant_default_continues_under_backward_compatibility()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    sql(format!(
        "ALTER TABLE `{db}`.users ADD COLUMN tier INT NOT NULL DEFAULT 1, \
         ADD COLUMN plan VARCHAR(10) NOT NULL DEFAULT 'it''s free'"
    ))
    .await?;
    sql(format!("UPDATE `{db}`.users SET tier = 2 WHERE id = 4")).await?;
    let evs = wait_events(&tc.topic("users"), 5, T).await?;
    let after = evs[4].after.as_ref().context("after image")?;
    assert_eq!(after.get_i32("tier")?, 2);
    assert_eq!(after.get_str("plan")?, "it's free");
    assert!(!run.is_finished(), "the source goes on");
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_not_null_column_without_a_constant_default_is_refused_and_stops_the_source_naming_it()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    sql(format!(
        "ALTER TABLE `{db}`.users ADD COLUMN tier INT NOT NULL"
    ))
    .await?;
    sql(format!("UPDATE `{db}`.users SET tier = 2 WHERE id = 4")).await?;
    let err = tokio::time::timeout(T, run.join_error())
        .await?
        .context("the source must stop")?;
    assert!(
        err.contains("tier") && err.contains("refused") && err.contains("BACKWARD"),
        "names the column, the refusal and the compatibility mode: {err}"
    );
    // Nothing after the refused change was written.
    let evs = events_of(&tc.topic("users"), 5, Duration::from_secs(3)).await?;
    assert_eq!(evs.len(), 4);
    Ok(())
}

#[tokio::test]
async fn every_type_has_identical_values_and_schema_from_snapshot_and_binlog() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = unique("types");
    sql(format!("CREATE DATABASE `{db}` CHARACTER SET utf8mb4")).await?;
    sql(format!(
        "CREATE TABLE `{db}`.t (id INT PRIMARY KEY, ti TINYINT, tiu TINYINT UNSIGNED, si SMALLINT, mi MEDIUMINT, \
         miu MEDIUMINT UNSIGNED, i INT, iu INT UNSIGNED, bi BIGINT, biu BIGINT UNSIGNED, dec1 DECIMAL(12,4), \
         dec2 DECIMAL(40,10), f FLOAT, d DOUBLE, dt DATE, dtt DATETIME(6), ts TIMESTAMP(6) NULL, tm TIME(3), y YEAR, \
         c CHAR(5), vc VARCHAR(50), l1 VARCHAR(20) CHARACTER SET latin1, tx TEXT, bin BINARY(4), vb VARBINARY(10), \
         bl BLOB, e ENUM('small','medium','large'), s SET('a','b','c'), b1 BIT(1), b10 BIT(10), j JSON, n INT NULL)"
    ))
    .await?;
    let values = "-3, 250, -32768, -5, 16777215, -2147483648, 4294967295, -9223372036854775808, 18446744073709551615, \
        -1234.5678, 123456789012345678901234567890.0123456789, 1.5, -2.25, '2024-02-29', '2024-02-29 12:34:56.123456', \
        '2024-01-01 00:00:00.123000', '-12:34:56.789', 2024, 'ab', 'Emoji 😀🚀', 'café', 'Ünïcödé', X'00FF0102', X'DEADBEEF', \
        X'0001', 'medium', 'a,c', b'1', b'1010101010', '{\"k\": [1, 2]}', NULL";
    sql(format!(
        "SET time_zone = '+00:00'; INSERT INTO `{db}`.t VALUES (1, {values})"
    ))
    .await?;
    let tc = TestConfig::new(&db, &["t"]);
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("t"), 1, T).await?;
    sql(format!(
        "SET time_zone = '+00:00'; INSERT INTO `{db}`.t VALUES (2, {values})"
    ))
    .await?;
    let evs = wait_events(&tc.topic("t"), 2, T).await?;
    let (snap, stream) = (&evs[0], &evs[1]);
    assert_eq!((snap.op, stream.op), (Op::Read, Op::Create));
    let mut a = snap.after.clone().context("after")?;
    let mut b = stream.after.clone().context("after")?;
    a.remove("id");
    b.remove("id");
    assert_eq!(a, b, "snapshot and binlog values differ");
    // Spot-check the mapping itself.
    match b.get("biu") {
        Some(Bson::Decimal128(d)) => assert_eq!(
            d.to_string(),
            "18446744073709551615",
            "BIGINT UNSIGNED is exact"
        ),
        other => bail!("biu is {other:?}"),
    }
    assert_eq!(b.get("mi"), Some(&Bson::Int32(-5)));
    assert_eq!(b.get("tm"), Some(&Bson::Int64(-45_296_789_000)));
    assert_eq!(b.get_str("l1").ok(), Some("café"));
    assert_eq!(b.get_str("vc").ok(), Some("Emoji 😀🚀"));
    assert_eq!(b.get_str("e").ok(), Some("medium"));
    assert_eq!(b.get_str("s").ok(), Some("a,c"));
    assert_eq!(b.get("b1"), Some(&Bson::Boolean(true)));
    assert_eq!(b.get("y"), Some(&Bson::Int32(2024)));
    assert_eq!(b.get("n"), Some(&Bson::Null));
    match b.get("dec1") {
        Some(Bson::Decimal128(d)) => assert_eq!(d.to_string(), "-1234.5678"),
        other => bail!("dec1 is {other:?}"),
    }
    // Same Avro schema id for both paths: the binlog-derived shape equals the snapshot one.
    let raw = read_topic(&tc.topic("t"), 2, T).await?;
    let ids: Vec<u32> = raw
        .iter()
        .filter_map(|m| m.payload())
        .filter_map(|p| ecst::events::registry::unframe(p).ok().map(|(id, _)| id))
        .collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(
        ids[0], ids[1],
        "snapshot and binlog registered different schemas"
    );
    run.stop().await?;
    Ok(())
}

/// Inserts the same row as id 1 before the source starts (snapshot) and as id 2 after (binlog);
/// returns both after images without `id`.
async fn snapshot_and_binlog_images(
    db: &str,
    columns: &str,
    values: &str,
    session: &str,
) -> Result<(bson::Document, bson::Document)> {
    sql(format!(
        "CREATE TABLE `{db}`.t (id INT PRIMARY KEY, {columns})"
    ))
    .await?;
    sql(format!(
        "{session} INSERT INTO `{db}`.t VALUES (1, {values})"
    ))
    .await?;
    let tc = TestConfig::new(db, &["t"]);
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("t"), 1, T).await?;
    sql(format!(
        "{session} INSERT INTO `{db}`.t VALUES (2, {values})"
    ))
    .await?;
    let evs = wait_events(&tc.topic("t"), 2, T).await?;
    run.stop().await?;
    assert_eq!((evs[0].op, evs[1].op), (Op::Read, Op::Create));
    let mut a = evs[0].after.clone().context("after")?;
    let mut b = evs[1].after.clone().context("after")?;
    a.remove("id");
    b.remove("id");
    Ok((a, b))
}

#[tokio::test]
async fn every_server_charset_is_decoded_from_the_binlog_as_the_snapshot_reads_it() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = unique("charsets");
    sql(format!("CREATE DATABASE `{db}` CHARACTER SET utf8mb4")).await?;
    // (column, charset, text in its repertoire)
    let cases = [
        ("u8", "utf8mb4", "Emoji 😀 and 漢字"),
        ("l1", "latin1", "café €"),
        ("l2", "latin2", "Příliš žluťoučký kůň"),
        ("c1251", "cp1251", "Привет, мир"),
        ("gbk", "gbk", "你好，世界"),
        ("sjis", "sjis", "こんにちは世界"),
        ("big5", "big5", "你好世界"),
        ("u16", "utf16", "Ünïcödé 😀"),
        ("ucs2", "ucs2", "Ünïcödé Ж"),
        ("u32", "utf32", "𝄞 clef"),
        ("k8", "koi8r", "Съешь же ещё"),
    ];
    let columns: Vec<String> = cases
        .iter()
        .map(|(c, cs, _)| format!("{c} VARCHAR(40) CHARACTER SET {cs}"))
        .collect();
    let values: Vec<String> = cases.iter().map(|(_, _, v)| format!("'{v}'")).collect();
    let (snap, stream) =
        snapshot_and_binlog_images(&db, &columns.join(", "), &values.join(", "), "").await?;
    for (c, cs, want) in cases {
        assert_eq!(snap.get_str(c).ok(), Some(want), "snapshot, {cs}");
        assert_eq!(stream.get_str(c).ok(), Some(want), "binlog, {cs}");
    }
    Ok(())
}

#[tokio::test]
async fn edge_values_are_identical_from_snapshot_and_binlog() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = unique("edges");
    sql(format!("CREATE DATABASE `{db}` CHARACTER SET utf8mb4")).await?;
    let columns = "b16 BINARY(16), zd DATE NOT NULL, zdt DATETIME NOT NULL, zdn DATE NULL, \
        d65 DECIMAL(65,30), tmax TIME, tmin TIME, dtmax DATETIME(6), c5 CHAR(5)";
    let values = "X'0102030000000000000000000000000000', '0000-00-00', '0000-00-00 00:00:00', \
        '0000-00-00', '-12345678901234567890123456789012345.123456789012345678901234567890', \
        '838:59:59', '-838:59:59', '9999-12-31 23:59:59.999999', 'ab'";
    let session = "SET SESSION sql_mode = '', time_zone = '+00:00';";
    let (snap, stream) = snapshot_and_binlog_images(&db, columns, values, session).await?;
    assert_eq!(snap, stream, "snapshot and binlog values differ");
    match stream.get("b16") {
        Some(Bson::Binary(b)) => assert_eq!(
            b.bytes,
            [1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            "BINARY(16) keeps its trailing zero bytes"
        ),
        other => bail!("b16 is {other:?}"),
    }
    assert_eq!(stream.get("tmax"), Some(&Bson::Int64(3_020_399_000_000)));
    assert_eq!(stream.get("tmin"), Some(&Bson::Int64(-3_020_399_000_000)));
    assert_eq!(
        stream.get("zdn"),
        Some(&Bson::Null),
        "a NULL-able zero date is NULL"
    );
    // 65 digits do not fit a Decimal128 (34): the sink writes the exact text.
    match stream.get("d65") {
        Some(Bson::String(s)) => assert_eq!(
            s,
            "-12345678901234567890123456789012345.123456789012345678901234567890"
        ),
        other => bail!("d65 is {other:?}"),
    }
    assert_eq!(stream.get_str("c5").ok(), Some("ab"));
    Ok(())
}

#[tokio::test]
async fn a_20_mb_row_and_a_100000_row_transaction_go_through() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = unique("big");
    sql(format!("CREATE DATABASE `{db}` CHARACTER SET utf8mb4")).await?;
    sql(format!(
        "CREATE TABLE `{db}`.t (id INT PRIMARY KEY, body LONGTEXT)"
    ))
    .await?;
    let tc = TestConfig::new(&db, &["t"]);
    let run = start(tc.config(true)?, Components::Source);
    // Nothing to snapshot; make sure streaming started before writing.
    wait_for("source ready", T, || async {
        Ok(
            if read_topic(&format!("{}.offsets", tc.name), 1, Duration::from_secs(2))
                .await?
                .is_empty()
            {
                None
            } else {
                Some(())
            },
        )
    })
    .await?;
    sql(format!(
        "INSERT INTO `{db}`.t VALUES (1, REPEAT('x', 20971520))"
    ))
    .await?;
    sql(format!(
        "INSERT INTO `{db}`.t SELECT 1 + seq, 'row' FROM `{db}`.seq_1_to_100000"
    ))
    .await?;
    let evs = wait_events(&tc.topic("t"), 100_001, Duration::from_secs(180)).await?;
    assert_eq!(evs.len(), 100_001);
    let big = evs[0]
        .after
        .as_ref()
        .and_then(|a| a.get_str("body").ok())
        .map(str::len);
    assert_eq!(big, Some(20_971_520));
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_killed_dump_connection_is_resumed_without_loss_or_duplicates() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    sql(format!(
        "UPDATE `{db}`.users SET email = 'one@x' WHERE id = 1"
    ))
    .await?;
    wait_events(&tc.topic("users"), 5, T).await?;
    let mut c = admin().await?;
    let ids: Vec<(u64, Option<String>)> = c
        .query(
            "SELECT ID, USER FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'",
        )
        .await?;
    // Kill only ours: the one whose replica server id matches (MariaDB shows it in SHOW SLAVE HOSTS).
    let hosts: Vec<mysql_async::Row> = c.query("SHOW SLAVE HOSTS").await?;
    assert!(
        hosts
            .iter()
            .any(|h| h.get::<u32, _>(0) == Some(tc.server_id)),
        "our replica is registered"
    );
    for (id, _) in ids {
        // Killing another test's dump connection is harmless too: every reader resumes.
        let _ignored = c.query_drop(format!("KILL {id}")).await;
    }
    sql(format!(
        "UPDATE `{db}`.users SET email = 'two@x' WHERE id = 2"
    ))
    .await?;
    let evs = wait_events(&tc.topic("users"), 6, T).await?;
    let extra = events_of(&tc.topic("users"), 7, Duration::from_secs(3)).await?;
    assert_eq!(extra.len(), 6, "no duplicate after the reconnect");
    assert_eq!(email(&evs[5], "after").as_deref(), Some("two@x"));
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_second_source_with_the_same_name_fences_the_first() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let first = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    let mut tc2 = tc.clone();
    tc2.server_id = unique_server_id();
    let second = start(tc2.config(true)?, Components::Source);
    // The second one's init_transactions fences the first; its next commit fails definitively.
    wait_for("second source streaming", T, || async {
        sql(format!(
            "UPDATE `{db}`.users SET email = CONCAT(email, '.') WHERE id = 3"
        ))
        .await?;
        Ok(if first.is_finished() { Some(()) } else { None })
    })
    .await?;
    let err = first.join_error().await.unwrap_or_default();
    assert!(
        err.to_lowercase().contains("fenc"),
        "first source must report being fenced: {err}"
    );
    sql(format!(
        "UPDATE `{db}`.users SET email = 'final@x' WHERE id = 4"
    ))
    .await?;
    let evs = wait_for("final event", T, || async {
        let evs = events_of(&tc.topic("users"), 1000, Duration::from_secs(3)).await?;
        Ok(
            if evs
                .iter()
                .any(|e| email(e, "after").as_deref() == Some("final@x"))
            {
                Some(evs)
            } else {
                None
            },
        )
    })
    .await?;
    // Each email state of user 3 appears once: no change written twice.
    let user3: Vec<String> = evs
        .iter()
        .filter(|e| e.key.get_i32("id") == Ok(3) && e.op == Op::Update)
        .filter_map(|e| email(e, "after"))
        .collect();
    let unique_states: std::collections::HashSet<&String> = user3.iter().collect();
    assert_eq!(
        unique_states.len(),
        user3.len(),
        "duplicated change: {user3:?}"
    );
    second.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_source_fenced_while_it_commits_stops_and_the_newer_instance_streams_on_without_duplicates()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let cfg = write_config(&tc, true, None)?;
    let topic = tc.topic("users");
    // The first instance pauses inside the commit of its first streamed change, its records
    // and position produced; the second starts meanwhile and fences it.
    let (pause, reached, release) = failpoint_released_by_file("source.commit", 1);
    let mut first = spawn_captured(&cfg, "source", &pause, "info")?;
    wait_events(&topic, 4, T).await?;
    sql(format!(
        "UPDATE `{db}`.users SET email = 'one@x' WHERE id = 3"
    ))
    .await?;
    wait_for_failpoint(&reached, T).await?;
    let mut tc2 = tc.clone();
    tc2.server_id = unique_server_id();
    let cfg2 = write_config(&tc2, true, None)?;
    let mut second = spawn_captured(&cfg2, "source", &[], "info")?;
    second.wait_for_output("binlog stream started", T).await?;
    std::fs::write(&release, "go")?;
    // The first meets the fence in its commit, whatever error the broker gives it there, and
    // stops: it must not take the transactional id back from the newer instance.
    let status = tokio::time::timeout(T, first.child.wait())
        .await
        .context("the fenced instance stops")??;
    assert!(!status.success(), "{}", first.output());
    assert!(
        first.output().to_lowercase().contains("fenced"),
        "it says it was fenced:\n{}",
        first.output()
    );
    sql(format!(
        "UPDATE `{db}`.users SET email = 'two@x' WHERE id = 3"
    ))
    .await?;
    wait_for("the newer instance to stream on", T, || async {
        let evs = events_of(&topic, 100, Duration::from_secs(2)).await?;
        Ok(evs
            .iter()
            .any(|e| email(e, "after").as_deref() == Some("two@x"))
            .then_some(evs))
    })
    .await?;
    let evs = events_of(&topic, 100, Duration::from_secs(2)).await?;
    let user3: Vec<String> = evs
        .iter()
        .filter(|e| e.key.get_i32("id") == Ok(3) && e.op == Op::Update)
        .filter_map(|e| email(e, "after"))
        .collect();
    assert_eq!(user3, vec!["one@x".to_string(), "two@x".to_string()]);
    assert!(
        second.child.try_wait()?.is_none(),
        "the newer instance runs on:\n{}",
        second.output()
    );
    second.child.kill().await?;
    Ok(())
}

#[tokio::test]
async fn a_purged_position_resnapshots_with_when_needed_and_fails_clearly_with_initial()
-> Result<()> {
    let _exclusive = STACK_LOCK.write().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    run.stop().await?;
    let mut c = admin().await?;
    c.query_drop("FLUSH BINARY LOGS").await?;
    c.query_drop("FLUSH BINARY LOGS").await?;
    let row: mysql_async::Row = c
        .query_first("SHOW MASTER STATUS")
        .await?
        .context("status")?;
    let current: String = row.get(0).context("file")?;
    // MariaDB keeps a log that another replica still reads ("a purgeable log is in use"), e.g.
    // a reader of another process that has not followed the rotation yet: purge until it is gone.
    wait_for("the older binlogs to be purged", T, || async {
        let mut c = admin().await?;
        c.query_drop(format!("PURGE BINARY LOGS TO '{current}'"))
            .await?;
        let logs: Vec<mysql_async::Row> = c.query("SHOW BINARY LOGS").await?;
        let first: Option<String> = logs.first().and_then(|r| r.get(0));
        Ok((first.as_deref() == Some(current.as_str())).then_some(()))
    })
    .await?;
    // initial: a clear error naming the fix.
    let failing = start(tc.config(true)?, Components::Source);
    let err = tokio::time::timeout(T, failing.join_error())
        .await?
        .context("must fail")?;
    assert!(
        err.contains("purged") && err.contains("when_needed"),
        "{err}"
    );
    // when_needed: a new snapshot.
    let mut tc2 = tc.clone();
    tc2.extra_source = "snapshot_mode = \"when_needed\"".into();
    let run = start(tc2.config(true)?, Components::Source);
    let evs = wait_events(&tc.topic("users"), 8, T).await?;
    assert_eq!(
        evs.iter().filter(|e| e.op == Op::Read).count(),
        8,
        "the table was snapshotted again"
    );
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn the_checked_in_avro_schemas_are_what_the_seed_tables_produce() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let mut c = admin().await?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("avro");
    for table in ["users", "product"] {
        let mut schema =
            ecst::source::table_map::from_information_schema(&mut c, &db, table).await?;
        // The files describe the seed as deployed: database `test`, connector name `ecst`.
        schema.db = "test".into();
        let avro = ecst::events::avro::TableAvro::derive("ecst", &schema)?;
        for (part, json) in [("key", &avro.key_json), ("value", &avro.value_json)] {
            let path = dir.join(format!("ecst.test.{table}-{part}.avsc"));
            let generated: serde_json::Value = serde_json::from_str(json)?;
            if std::env::var("ECST_WRITE_AVRO").is_ok() {
                std::fs::write(&path, serde_json::to_string_pretty(&generated)? + "\n")?;
            }
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("{} (ECST_WRITE_AVRO=1 regenerates)", path.display()))?;
            let checked_in: serde_json::Value = serde_json::from_str(&text)?;
            assert_eq!(
                checked_in,
                generated,
                "{} differs from what ecst registers",
                path.display()
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn snapshot_mode_never_without_a_stored_position_commits_its_changes_and_resumes_exactly_once()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let mut tc = TestConfig::new(&db, &["users"]);
    tc.extra_source = "snapshot_mode = \"never\"".into();
    let run = start(tc.config(true)?, Components::Source);
    // No snapshot: the stream starts at the binlog's end once the source is up (its topics
    // exist), so the first change is written after that.
    wait_for("the source's offsets topic", T, || async {
        let cfg = tc.config(true)?;
        Ok(
            read_topic(&cfg.offsets_topic(), 0, Duration::from_millis(300))
                .await
                .ok()
                .map(|_| ()),
        )
    })
    .await?;
    let mut inserted = 0;
    let evs = wait_for("a committed change", T, || {
        inserted += 1;
        let id = 100 + inserted;
        let db = db.clone();
        let topic = tc.topic("users");
        async move {
            sql(format!(
                "INSERT INTO `{db}`.users VALUES ({id}, 'N', 'Ever', 'never@x')"
            ))
            .await?;
            let evs = events_of(&topic, 1, Duration::from_secs(2)).await?;
            Ok((!evs.is_empty()).then_some(evs))
        }
    })
    .await?;
    assert!(evs.iter().all(|e| e.op == Op::Create), "no snapshot reads");
    run.stop().await?;
    let before = events_of(&tc.topic("users"), 1_000, Duration::from_secs(2))
        .await?
        .len();
    // Changes while stopped are read after the restart: the stored position was committed.
    sql(format!(
        "INSERT INTO `{db}`.users VALUES (999, 'While', 'Down', 'down@x')"
    ))
    .await?;
    let run = start(tc.config(true)?, Components::Source);
    let evs = wait_events(&tc.topic("users"), before + 1, T).await?;
    assert_eq!(evs.len(), before + 1, "each change exactly once");
    assert_eq!(evs.last().and_then(|e| e.key.get_i32("id").ok()), Some(999));
    run.stop().await?;
    Ok(())
}

/// Runs `stmts` on one admin connection (session settings hold for the statements after them).
async fn in_one_session(stmts: &[String]) -> Result<()> {
    let mut c = admin().await?;
    for s in stmts {
        c.query_drop(s).await.with_context(|| s.clone())?;
    }
    c.disconnect().await?;
    Ok(())
}

/// Runs the seed's users through a source, then Neha's update in a session with `setting`;
/// returns the error the source stopped with, after checking that nothing was published.
async fn a_session_setting_stops_the_source(setting: &str) -> Result<String> {
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    in_one_session(&[
        format!("SET SESSION {setting}"),
        format!("UPDATE `{db}`.users SET email = 'session@x' WHERE id = 1"),
    ])
    .await?;
    let err = tokio::time::timeout(T, run.join_error())
        .await
        .context("the source stops")?
        .context("with an error")?;
    assert!(
        err.contains(&format!("{db}.users")),
        "names the table: {err}"
    );
    let evs = events_of(&tc.topic("users"), 5, Duration::from_secs(3)).await?;
    assert_eq!(evs.len(), 4, "nothing of the refused change was published");
    Ok(err)
}

#[tokio::test]
async fn a_session_writing_minimal_row_images_stops_the_source_instead_of_publishing_nulls()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let err = a_session_setting_stops_the_source("binlog_row_image = MINIMAL").await?;
    assert!(
        err.contains("binlog_row_image") && err.contains("firstname"),
        "names the setting and a missing column: {err}"
    );
    Ok(())
}

#[tokio::test]
async fn a_statement_format_update_of_a_captured_table_stops_the_source_instead_of_being_lost()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let err = a_session_setting_stops_the_source("binlog_format = STATEMENT").await?;
    assert!(err.contains("statement-format"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_table_without_a_primary_key_gets_a_null_kafka_key_and_no_tombstones() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = unique("keyless");
    sql(format!("CREATE DATABASE `{db}`")).await?;
    sql(format!("CREATE TABLE `{db}`.log (msg VARCHAR(20), n INT)")).await?;
    sql(format!("INSERT INTO `{db}`.log VALUES ('a', 1), ('b', 2)")).await?;
    let tc = TestConfig::new(&db, &["log"]);
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("log"), 2, T).await?;
    sql(format!("DELETE FROM `{db}`.log WHERE n = 1")).await?;
    let evs = wait_events(&tc.topic("log"), 3, T).await?;
    assert_eq!(evs.last().map(|e| e.op), Some(Op::Delete));
    let msgs = read_topic(&tc.topic("log"), 10, Duration::from_secs(3)).await?;
    assert_eq!(msgs.len(), 3, "two reads and a delete, no tombstone");
    assert!(
        msgs.iter().all(|m| m.key().is_none()),
        "a null key, never a 5-byte empty record (Confluent's deserializers refuse those)"
    );
    // Confluent's own consumer and Avro deserializer read every record of it.
    let read = confluent_read(&tc.topic("log"), 3).await?;
    let ops: Vec<&str> = read
        .iter()
        .map(|r| r["value"]["op"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(ops, ["r", "r", "d"], "{read:?}");
    assert!(read.iter().all(|r| r["key"].is_null()), "{read:?}");
    assert_eq!(read[2]["value"]["before"]["msg"], "a", "{read:?}");
    assert_eq!(read[2]["value"]["before"]["n"], 1, "{read:?}");
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn confluents_python_avro_deserializer_reads_keys_and_values_of_a_keyed_table() -> Result<()>
{
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    sql(format!(
        "UPDATE `{db}`.users SET email = 'neha.parate@hotmail.com' WHERE id = 1"
    ))
    .await?;
    wait_events(&tc.topic("users"), 5, T).await?;
    run.stop().await?;
    let read = confluent_read(&tc.topic("users"), 5).await?;
    assert_eq!(read[0]["key"]["id"], 1, "{read:?}");
    assert_eq!(read[4]["key"]["id"], 1, "{read:?}");
    assert_eq!(read[4]["value"]["op"], "u", "{read:?}");
    assert_eq!(
        read[4]["value"]["after"]["email"], "neha.parate@hotmail.com",
        "{read:?}"
    );
    assert_eq!(
        read[4]["value"]["before"]["email"], "neha.parate@gmail.com",
        "{read:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_keyless_tables_snapshot_is_handed_over_in_bounded_batches_not_read_whole() -> Result<()>
{
    let _shared = STACK_LOCK.read().await;
    let db = unique("keylessbig");
    sql(format!("CREATE DATABASE `{db}`")).await?;
    sql(format!("CREATE TABLE `{db}`.log (msg VARCHAR(20), n INT)")).await?;
    let rows: Vec<String> = (1..=25).map(|i| format!("('m{i}', {i})")).collect();
    sql(format!("INSERT INTO `{db}`.log VALUES {}", rows.join(", "))).await?;
    let mut tc = TestConfig::new(&db, &["log"]);
    tc.extra_source = "snapshot_chunk_size = 10".into();
    let cfg = write_config(&tc, true, None)?;
    // The snapshot pauses for good after its first batch is handed over; the pause point
    // records how many rows had been handed over by then.
    let (env, reached) = failpoint("snapshot.rows", 1);
    let mut child = spawn_captured(&cfg, "source", &env, "warn")?.child;
    wait_for_failpoint(&reached, T).await?;
    child.kill().await?;
    let note = std::fs::read_to_string(&reached)?;
    let handed: u64 = note
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .context("the pause point's progress")?;
    // (A keyless table is one Kafka transaction: nothing is committed mid-table, so the count
    // is the hand-over's, not the topic's.)
    assert!(
        (1..=10).contains(&handed),
        "the first batch of the scan is handed over before the rest is read: {handed} of 25 rows"
    );
    Ok(())
}

#[tokio::test]
async fn a_snapshot_under_per_table_locks_holds_writers_of_those_tables_until_it_ends_and_loses_nothing()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let mut tc = TestConfig::new(&db, &["users"]);
    // As on a server that refuses FLUSH TABLES WITH READ LOCK (RDS, Aurora).
    tc.extra_source = "snapshot_locking = \"tables\"\nsnapshot_chunk_size = 1".into();
    let cfg = write_config(&tc, true, None)?;
    // Paused mid-snapshot: the table locks are held.
    let (env, reached) = failpoint("snapshot.rows", 1);
    let mut child = spawn_captured(&cfg, "source", &env, "warn")?.child;
    wait_for_failpoint(&reached, T).await?;
    let blocked = sql(format!(
        "SET SESSION lock_wait_timeout = 2; UPDATE `{db}`.users SET email = 'waited@x' WHERE id = 1"
    ))
    .await;
    let free = sql(format!(
        "SET SESSION lock_wait_timeout = 2; UPDATE `{db}`.product SET price = 1 WHERE id = 1"
    ))
    .await;
    child.kill().await?;
    let blocked = format!(
        "{:#}",
        blocked.err().context("the locked table took a write")?
    );
    assert!(
        blocked.contains("1205") || blocked.contains("Lock wait timeout"),
        "{blocked}"
    );
    free.context("a table outside the snapshot is not locked")?;
    // The snapshot resumes after its committed chunk and the stream follows: every row once.
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    sql(format!(
        "UPDATE `{db}`.users SET email = 'after@x' WHERE id = 1"
    ))
    .await?;
    let evs = wait_events(&tc.topic("users"), 5, T).await?;
    run.stop().await?;
    let ops: Vec<Op> = evs.iter().map(|e| e.op).collect();
    assert_eq!(
        ops,
        [Op::Read, Op::Read, Op::Read, Op::Read, Op::Update],
        "{evs:?}"
    );
    Ok(())
}

/// The binlog's current file and position (the admin's view).
async fn binlog_end() -> Result<(String, u64)> {
    let mut c = admin().await?;
    let row: Option<mysql_async::Row> = c.query_first("SHOW MASTER STATUS").await?;
    let row = row.ok_or_else(|| anyhow::anyhow!("no binlog"))?;
    Ok((
        row.get(0).unwrap_or_default(),
        row.get(1).unwrap_or_default(),
    ))
}

#[tokio::test]
async fn mariadb_compressed_binlog_events_are_decoded_like_plain_ones_rows_ddl_and_truncate()
-> Result<()> {
    // log_bin_compress is global: no other test writes while it is on.
    let _exclusive = STACK_LOCK.write().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    let (file, pos) = binlog_end().await?;
    sql("SET GLOBAL log_bin_compress_min_len = 10").await?;
    sql("SET GLOBAL log_bin_compress = ON").await?;
    let written = async {
        let long = "z".repeat(40);
        sql(format!(
            "UPDATE `{db}`.users SET email = '{long}@x' WHERE id = 1"
        ))
        .await?;
        sql(format!(
            "INSERT INTO `{db}`.users VALUES (5, 'Ada', 'Lovelace', 'ada.lovelace@analytical.engine')"
        ))
        .await?;
        sql(format!("DELETE FROM `{db}`.users WHERE id = 2")).await?;
        sql(format!(
            "ALTER TABLE `{db}`.users ADD COLUMN nick VARCHAR(20) NOT NULL DEFAULT 'none' COMMENT '{}'",
            "a column added while the binlog compresses its statements".repeat(4)
        ))
        .await?;
        sql(format!("UPDATE `{db}`.users SET nick = 'neha' WHERE id = 1")).await?;
        sql(format!("TRUNCATE TABLE `{db}`.users")).await
    }
    .await;
    sql("SET GLOBAL log_bin_compress = OFF").await?;
    sql("SET GLOBAL log_bin_compress_min_len = 256").await?;
    written?;
    // The server did write compressed events, of rows and of statements.
    let mut c = admin().await?;
    let kinds: Vec<String> = c
        .exec_map(
            format!("SHOW BINLOG EVENTS IN '{file}' FROM {pos}"),
            (),
            |row: mysql_async::Row| row.get::<String, _>(2).unwrap_or_default(),
        )
        .await?;
    let compressed = |what: &str| {
        kinds
            .iter()
            .any(|k| k.to_lowercase().contains("compressed") && k.to_lowercase().contains(what))
    };
    assert!(compressed("rows") && compressed("query"), "{kinds:?}");
    // Each change as if nothing were compressed.
    let evs = wait_events(&tc.topic("users"), 9, T).await?;
    run.stop().await?;
    let ops: Vec<Op> = evs.iter().map(|e| e.op).collect();
    assert_eq!(
        ops[4..],
        [Op::Update, Op::Create, Op::Delete, Op::Update, Op::Truncate],
        "{evs:?}"
    );
    let after = |i: usize, f: &str| {
        evs[i]
            .after
            .as_ref()
            .and_then(|a| a.get_str(f).ok().map(str::to_string))
    };
    assert_eq!(after(4, "email"), Some(format!("{}@x", "z".repeat(40))));
    assert_eq!(after(5, "firstname").as_deref(), Some("Ada"));
    assert_eq!(evs[6].key.get_i32("id").ok(), Some(2));
    // The compressed ALTER was seen: the next change carries the new column.
    assert_eq!(after(7, "nick").as_deref(), Some("neha"));
    Ok(())
}

#[tokio::test]
async fn a_table_named_in_another_case_than_the_server_stores_it_is_refused_at_start_with_its_spelling()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = unique("lctn");
    sql(format!("CREATE DATABASE `{db}`")).await?;
    sql(format!(
        "CREATE TABLE `{db}`.MixedCase (id INT PRIMARY KEY)"
    ))
    .await?;
    let mut c = admin().await?;
    let lctn: u32 = c
        .query_first("SELECT @@lower_case_table_names")
        .await?
        .unwrap_or(0);
    let stored: Option<String> = c
        .exec_first(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = ?",
            (&db,),
        )
        .await?;
    let stored = stored.unwrap_or_default();
    // lower_case_table_names = 0 keeps `MixedCase`, 1 stores `mixedcase` (the stack's MariaDB
    // 11.4 runs with 1): configure the other spelling, which the server takes in a SELECT
    // under 1 but its binlog never carries.
    assert_eq!(stored == "MixedCase", lctn == 0, "{stored} under {lctn}");
    let other = if lctn == 0 { "mixedcase" } else { "MixedCase" };
    let tc = TestConfig::new(&db, &[other]);
    let err = start(tc.config(true)?, Components::Source)
        .join_error()
        .await
        .unwrap_or_default();
    assert!(
        err.contains(&format!("write `{db}.{stored}` in source.tables")),
        "{err}"
    );
    assert!(
        err.contains(&format!("lower_case_table_names = {lctn}")),
        "{err}"
    );
    // The right spelling streams.
    let tc = TestConfig::new(&db, &[stored.as_str()]);
    let run = start(tc.config(true)?, Components::Source);
    sql(format!("INSERT INTO `{db}`.{stored} VALUES (1)")).await?;
    let evs = wait_events(&tc.topic(&stored), 1, T).await?;
    // (Read or streamed, depending on whether the snapshot ran before the insert.)
    assert!(matches!(evs[0].op, Op::Create | Op::Read), "{evs:?}");
    assert_eq!(evs[0].key.get_i32("id").ok(), Some(1));
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_keyless_table_with_message_key_columns_is_keyed_by_them_with_tombstones_and_a_typo_stops_the_source()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = unique("msgkey");
    sql(format!("CREATE DATABASE `{db}`")).await?;
    sql(format!("CREATE TABLE `{db}`.log (msg VARCHAR(20), n INT)")).await?;
    sql(format!("INSERT INTO `{db}`.log VALUES ('a', 1), ('b', 2)")).await?;
    let mut tc = TestConfig::new(&db, &["log"]);
    // A column the table has not: the source stops naming it before publishing anything.
    tc.extra_source = format!("message_key_columns = {{ \"{db}.log\" = [\"mgs\"] }}");
    let err = start(tc.config(true)?, Components::Source)
        .join_error()
        .await
        .unwrap_or_default();
    assert!(
        err.contains("message_key_columns") && err.contains("`mgs`"),
        "{err}"
    );
    tc.extra_source = format!("message_key_columns = {{ \"{db}.log\" = [\"msg\"] }}");
    let cfg = write_config(&tc, true, None)?;
    let check = tokio::process::Command::new(ecst_bin())
        .args(["--config", &cfg.to_string_lossy(), "check"])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(
        text.lines().any(|l| l.starts_with("PASS")
            && l.contains(&format!("message key of {db}.log"))
            && l.contains("keyed by (msg)")),
        "{text}"
    );
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("log"), 2, T).await?;
    sql(format!("DELETE FROM `{db}`.log WHERE n = 1")).await?;
    wait_events(&tc.topic("log"), 3, T).await?;
    let msgs = read_topic(&tc.topic("log"), 10, Duration::from_secs(3)).await?;
    assert_eq!(msgs.len(), 4, "two reads, a delete and its tombstone");
    assert!(msgs.iter().all(|m| m.key().is_some()));
    assert!(msgs[3].payload().is_none(), "the tombstone");
    // Confluent's own deserializer reads the keys.
    let read = confluent_read(&tc.topic("log"), 4).await?;
    let keys: Vec<&str> = read
        .iter()
        .map(|r| r["key"]["msg"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(keys, ["a", "b", "a", "a"], "{read:?}");
    assert!(read[3]["value"].is_null(), "{read:?}");
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_stored_position_behind_a_thousand_records_of_another_source_is_still_found_and_the_topic_is_compacted_small()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let cfg = tc.config(true)?;
    let run = start(cfg.clone(), Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    run.stop().await?;
    // Another source sharing the offsets topic (source.offsets_topic) fills its tail.
    let topic = cfg.offsets_topic();
    let bootstrap = endpoints().kafka;
    let t = topic.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let p: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()?;
        for i in 0..1500 {
            let payload = format!("{{\"another\":{i}}}");
            p.send(
                BaseRecord::to(&t)
                    .key("another-source".as_bytes())
                    .payload(payload.as_bytes()),
            )
            .map_err(|(e, _)| e)?;
        }
        p.flush(Duration::from_secs(10))?;
        Ok(())
    })
    .await??;
    // The restart finds its own position behind them: it resumes, no second snapshot.
    let run = start(cfg, Components::Source);
    sql(format!(
        "UPDATE `{db}`.users SET email = 'behind.the.tail@x' WHERE id = 1"
    ))
    .await?;
    let evs = wait_events(&tc.topic("users"), 5, T).await?;
    run.stop().await?;
    let more = events_of(&tc.topic("users"), 6, Duration::from_secs(3)).await?;
    assert_eq!(more.len(), 5, "resumed, not snapshotted again: {more:?}");
    assert_eq!(evs[4].op, Op::Update);
    // Small segments that roll and get compacted, so restarts stay quick.
    let e = endpoints();
    let configs = tokio::task::spawn_blocking(move || -> Result<Vec<(String, String)>> {
        use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &e.kafka)
            .create()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let res = rt.block_on(
            admin.describe_configs(&[ResourceSpecifier::Topic(&topic)], &AdminOptions::new()),
        )?;
        let mut out = Vec::new();
        for r in res {
            for entry in r?.entries {
                out.push((entry.name, entry.value.unwrap_or_default()));
            }
        }
        Ok(out)
    })
    .await??;
    let get = |k: &str| {
        configs
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("cleanup.policy"), Some("compact"));
    assert_eq!(get("segment.bytes"), Some("16777216"));
    assert_eq!(get("segment.ms"), Some("600000"));
    assert_eq!(get("min.cleanable.dirty.ratio"), Some("0.1"));
    Ok(())
}

/// `XA START` … `XA END`, `XA PREPARE` of `stmt` as transaction `xid`, on a connection of its own
/// that is then closed (MariaDB keeps the prepared transaction for any session to end).
async fn xa_prepare(xid: &str, stmt: String) -> Result<()> {
    in_one_session(&[
        format!("XA START '{xid}'"),
        stmt,
        format!("XA END '{xid}'"),
        format!("XA PREPARE '{xid}'"),
    ])
    .await
}

#[tokio::test]
async fn xa_transactions_are_published_at_their_commit_across_a_restart_and_rolled_back_ones_never()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let topic = tc.topic("users");
    let run = start(tc.config(true)?, Components::Source);
    wait_events(&topic, 4, T).await?;
    let update =
        |id: i32, email: &str| format!("UPDATE `{db}`.users SET email = '{email}' WHERE id = {id}");
    // Prepared, not committed: nothing is published, while later transactions are.
    xa_prepare("a", update(1, "xa-a@x")).await?;
    sql(update(2, "plain@x")).await?;
    let evs = wait_events(&topic, 5, T).await?;
    assert_eq!(email(&evs[4], "after").as_deref(), Some("plain@x"));
    // The source that read the prepare stops; the one that reads the commit never saw it.
    run.stop().await?;
    let run = start(tc.config(true)?, Components::Source);
    sql("XA COMMIT 'a'").await?;
    xa_prepare("b", update(3, "rolled-back@x")).await?;
    sql("XA ROLLBACK 'b'").await?;
    in_one_session(&[
        "XA START 'c'".into(),
        update(4, "one-phase@x"),
        "XA END 'c'".into(),
        "XA COMMIT 'c' ONE PHASE".into(),
    ])
    .await?;
    xa_prepare("d", update(3, "xa-d@x")).await?;
    sql("XA COMMIT 'd'").await?;
    let evs = wait_events(&topic, 8, T).await?;
    let extra = events_of(&topic, 9, Duration::from_secs(3)).await?;
    assert_eq!(
        extra.len(),
        8,
        "each committed change exactly once: {extra:?}"
    );
    let after: Vec<(i32, Option<String>)> = evs[4..]
        .iter()
        .map(|e| (e.key.get_i32("id").unwrap_or(-1), email(e, "after")))
        .collect();
    assert_eq!(
        after,
        [
            (2, Some("plain@x".into())),
            (1, Some("xa-a@x".into())),
            (4, Some("one-phase@x".into())),
            (3, Some("xa-d@x".into())),
        ],
        "published in commit order, the rolled-back one never"
    );
    assert!(
        evs.windows(2).skip(3).all(|w| w[0].version < w[1].version),
        "versions grow in commit order: a change prepared earlier is placed at its commit"
    );
    run.stop().await?;
    Ok(())
}
