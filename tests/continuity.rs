//! Copies keep updating across what operators do to the database: RESET MASTER, a re-snapshot,
//! a position written by another server.

use std::time::Duration;

use anyhow::Result;
use bson::{Document, doc};
use ecst::app::Components;
use futures::TryStreamExt;

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
