//! Sink scenarios on the real stack: change topics → embedded copies in MongoDB (FerretDB 1.24
//! on PostgreSQL here; none depends on a deviation of it from MongoDB).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use bson::{Bson, Document, doc};
use ecst::app::Components;
use futures::TryStreamExt;
use mysql_async::prelude::Queryable;
use rdkafka::Message;
use rdkafka::message::Headers;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use crate::common::*;

const T: Duration = Duration::from_secs(90);

async fn orders(db: &mongodb::Database) -> Result<Vec<Document>> {
    let docs: Vec<Document> = db
        .collection::<Document>("purchase_order")
        .find(doc! {})
        .await?
        .try_collect()
        .await?;
    Ok(docs)
}

fn user_email(d: &Document) -> Option<String> {
    d.get_document("user")
        .ok()?
        .get_str("email")
        .ok()
        .map(str::to_string)
}

fn user_id(d: &Document) -> Option<i64> {
    match d.get_document("user").ok()?.get("id")? {
        Bson::Int32(i) => Some(i64::from(*i)),
        Bson::Int64(i) => Some(*i),
        _ => None,
    }
}

/// Waits until every order's user copy has been written by the mapping (snapshot applied).
pub(crate) async fn wait_all_versioned(db: &mongodb::Database, mapping: &str) -> Result<()> {
    wait_for("snapshot applied to every order", T, || async {
        let docs = orders(db).await?;
        Ok(
            if !docs.is_empty()
                && docs.iter().all(|d| {
                    d.get_document("_ecst")
                        .is_ok_and(|v| v.contains_key(mapping))
                })
            {
                Some(())
            } else {
                None
            },
        )
    })
    .await
}

#[tokio::test]
async fn nehas_email_update_reaches_every_embedded_copy_and_nothing_else() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 3).await?;
    let run = start(tc.config(true)?, Components::Both);
    wait_all_versioned(&mdb, "user_in_orders").await?;
    wait_all_versioned(&mdb, "product_in_orders").await?;
    sql(format!(
        "UPDATE `{db}`.users SET email = 'neha.parate@hotmail.com' WHERE id = 1"
    ))
    .await?;
    wait_for("neha's copies updated", T, || async {
        let docs = orders(&mdb).await?;
        let neha: Vec<_> = docs.iter().filter(|d| user_id(d) == Some(1)).collect();
        Ok(
            if neha.len() == 3
                && neha
                    .iter()
                    .all(|d| user_email(d).as_deref() == Some("neha.parate@hotmail.com"))
            {
                Some(())
            } else {
                None
            },
        )
    })
    .await?;
    let docs = orders(&mdb).await?;
    for d in &docs {
        let id = user_id(d).context("user id")?;
        if id != 1 {
            assert!(
                user_email(d).is_some_and(|e| e.ends_with("@gmail.com")),
                "other users untouched: {d}"
            );
        }
        let product = d.get_document("product")?;
        let keys: Vec<&String> = product.keys().collect();
        assert_eq!(
            keys,
            vec!["productId", "description"],
            "product copy holds only productId and description"
        );
        assert!(d.get("price").is_some(), "the order's own fields stay");
    }
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn copies_converge_after_the_sink_was_down_during_changes_and_a_replay_changes_nothing()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 2).await?;
    // Only the source runs: the order-service side is "down".
    let source = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    wait_events(&tc.topic("product"), 3, T).await?;
    sql(format!(
        "UPDATE `{db}`.users SET email = 'aravind@hotmail.com' WHERE id = 2"
    ))
    .await?;
    sql(format!(
        "UPDATE `{db}`.users SET lastname = 'D.' WHERE id = 2"
    ))
    .await?;
    sql(format!(
        "UPDATE `{db}`.product SET description = 'iPad Air' WHERE id = 1"
    ))
    .await?;
    wait_events(&tc.topic("users"), 6, T).await?;
    wait_events(&tc.topic("product"), 4, T).await?;
    let sink = start(tc.config(false)?, Components::Sink);
    wait_for("copies converge", T, || async {
        let docs = orders(&mdb).await?;
        let ok = docs.iter().filter(|d| user_id(d) == Some(2)).all(|d| {
            let u = d.get_document("user").ok();
            u.and_then(|u| u.get_str("email").ok()) == Some("aravind@hotmail.com")
                && u.and_then(|u| u.get_str("lastname").ok()) == Some("D.")
        }) && docs
            .iter()
            .filter(|d| {
                d.get_document("product")
                    .ok()
                    .and_then(|p| p.get("productId"))
                    .is_some_and(|v| v.as_i64() == Some(1) || v.as_i32() == Some(1))
            })
            .all(|d| {
                d.get_document("product")
                    .ok()
                    .and_then(|p| p.get_str("description").ok())
                    == Some("iPad Air")
            });
        Ok(if ok { Some(()) } else { None })
    })
    .await?;
    sink.stop().await?;
    let before = orders(&mdb).await?;
    // Replay both topics from offset 0 with a new consumer group: the version guard keeps every
    // document as it is.
    let mut replay = tc.clone();
    replay.sink = replay
        .sink
        .map(|s| s.replace(&format!("{}-sink", tc.name), &format!("{}-replay", tc.name)));
    let sink = start(replay.config(false)?, Components::Sink);
    wait_for("replay group caught up", T, || async {
        Ok(group_caught_up(
            &format!("{}-replay", tc.name),
            &[tc.topic("users"), tc.topic("product")],
        )
        .await?
        .then_some(()))
    })
    .await?;
    sink.stop().await?;
    let after = orders(&mdb).await?;
    assert_eq!(
        before, after,
        "a replay from offset 0 must not change any document"
    );
    source.stop().await?;
    Ok(())
}

/// Whether a consumer group has committed offsets at the end of every partition of `topics`.
/// The consumer group of a sink configured by `mapping_toml`: one per MongoDB database, so that
/// sinks of one source writing to different databases each read every change.
fn sink_group(tc: &TestConfig) -> String {
    format!("{}-{}-sink", tc.name, tc.mongo_db)
}

fn mapping_toml(tc: &TestConfig, name: &str, kind: &str, on_delete: &str, extra: &str) -> String {
    format!(
        r#"
        [sink]
        group_id = "{g}"
        batch_timeout_ms = 10
        [[sink.mappings]]
        name = "{name}"
        topic = "{topic}"
        kind = "{kind}"
        collection = "{coll}"
        on_delete = "{on_delete}"
        {extra}
        "#,
        g = sink_group(tc),
        topic = tc.topic("users"),
        coll = if kind == "embedded" {
            "purchase_order"
        } else {
            "users"
        },
    )
}

#[tokio::test]
async fn delete_policies_unset_and_mark_the_copies_and_keep_leaves_them() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let embedded = "match_path = \"user.id\"\ntarget_path = \"user\"";
    let mut runs = Vec::new();
    let mut dbs = HashMap::new();
    for policy in ["unset", "mark", "keep"] {
        let mut t = tc.clone();
        t.mongo_db = unique("m");
        t.sink = Some(mapping_toml(&t, "u", "embedded", policy, embedded));
        let mdb = mongo_db(&t.mongo_db).await?;
        seed_orders(&mdb, 1).await?;
        runs.push(start(t.config(false)?, Components::Sink));
        dbs.insert(policy, mdb);
    }
    let source = start(tc.config(true)?, Components::Source);
    for mdb in dbs.values() {
        wait_all_versioned(mdb, "u").await?;
    }
    sql(format!("DELETE FROM `{db}`.users WHERE id = 3")).await?;
    // unset: the copy is reduced to its key, so the parent still knows whom it embedded.
    wait_for("unset applied", T, || async {
        let docs = orders(&dbs["unset"]).await?;
        Ok(docs
            .iter()
            .any(|d| d.get_document("user").is_ok_and(|u| *u == doc! { "id": 3 }))
            .then_some(()))
    })
    .await?;
    wait_for("mark applied", T, || async {
        let docs = orders(&dbs["mark"]).await?;
        Ok(docs
            .iter()
            .find(|d| user_id(d) == Some(3))
            .and_then(|d| d.get_document("user").ok()?.get_bool("__deleted").ok())
            .filter(|b| *b)
            .map(|_| ()))
    })
    .await?;
    // keep: Mayur's copy is unchanged (checked after the other two policies were applied, which
    // come from the same event).
    let kept = orders(&dbs["keep"]).await?;
    let m = kept
        .iter()
        .find(|d| user_id(d) == Some(3))
        .context("kept copy")?;
    assert_eq!(user_email(m).as_deref(), Some("mayur.devghare@gmail.com"));
    // The row comes back (a re-insert with the same key): under unset its copy returns.
    sql(format!(
        "INSERT INTO `{db}`.users VALUES (3, 'Mayur', 'Devghare', 'mayur.back@x')"
    ))
    .await?;
    wait_for(
        "the re-inserted row's copy back in its order",
        T,
        || async {
            let docs = orders(&dbs["unset"]).await?;
            Ok(docs
                .iter()
                .any(|d| user_email(d).as_deref() == Some("mayur.back@x"))
                .then_some(()))
        },
    )
    .await?;
    for r in runs {
        r.stop().await?;
    }
    source.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_primary_key_change_moves_the_copies_to_the_new_key() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 2).await?;
    let run = start(tc.config(true)?, Components::Both);
    wait_all_versioned(&mdb, "user_in_orders").await?;
    sql(format!("UPDATE `{db}`.users SET id = 40 WHERE id = 4")).await?;
    wait_for("copies follow the key", T, || async {
        let docs = orders(&mdb).await?;
        let moved = docs.iter().filter(|d| user_id(d) == Some(40)).count();
        let left = docs.iter().filter(|d| user_id(d) == Some(4)).count();
        Ok(if moved == 2 && left == 0 {
            Some(())
        } else {
            None
        })
    })
    .await?;
    run.stop().await?;
    Ok(())
}

/// The seed's users mirrored into collection `users` by a document mapping (`on_delete =
/// "unset"`), once all 4 are there: the MySQL database, the config, the pipeline, the collection.
async fn filled_users_replica()
-> Result<(String, TestConfig, Running, mongodb::Collection<Document>)> {
    let db = seed_database().await?;
    let mut tc = TestConfig::new(&db, &["users"]);
    tc.sink = Some(mapping_toml(&tc, "users_replica", "document", "unset", ""));
    let mdb = mongo_db(&tc.mongo_db).await?;
    let run = start(tc.config(true)?, Components::Both);
    let users = mdb.collection::<Document>("users");
    wait_for("replica filled", T, || async {
        Ok((users.count_documents(doc! {}).await? == 4).then_some(()))
    })
    .await?;
    Ok((db, tc, run, users))
}

#[tokio::test]
async fn a_document_mapping_keeps_a_plain_replica_with_upserts_and_deletes() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let (db, _tc, run, users) = filled_users_replica().await?;
    sql(format!(
        "INSERT INTO `{db}`.users VALUES (9, 'New', 'Person', 'new@x')"
    ))
    .await?;
    sql(format!("DELETE FROM `{db}`.users WHERE id = 2")).await?;
    sql(format!(
        "UPDATE `{db}`.users SET email = 'neha@x' WHERE id = 1"
    ))
    .await?;
    wait_for("replica follows", T, || async {
        let ids: Vec<Bson> = users
            .find(doc! {})
            .await?
            .try_collect::<Vec<Document>>()
            .await?
            .iter()
            .filter_map(|d| d.get("_id").cloned())
            .collect();
        let neha = users.find_one(doc! { "_id": 1 }).await?;
        let ok = ids.len() == 4
            && ids.contains(&Bson::Int32(9))
            && !ids.contains(&Bson::Int32(2))
            && neha.as_ref().and_then(|d| d.get_str("email").ok()) == Some("neha@x");
        Ok(ok.then_some(()))
    })
    .await?;
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_document_mapping_replaces_documents_so_a_dropped_column_and_an_old_key_leave_nothing()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let mut tc = TestConfig::new(&db, &["users"]);
    // Deletes are kept: only a key change may remove a document.
    tc.sink = Some(mapping_toml(&tc, "users_replica", "document", "keep", ""));
    let mdb = mongo_db(&tc.mongo_db).await?;
    let run = start(tc.config(true)?, Components::Both);
    let users = mdb.collection::<Document>("users");
    wait_for("replica filled", T, || async {
        Ok((users
            .count_documents(doc! { "lastname": { "$exists": true } })
            .await?
            == 4)
            .then_some(()))
    })
    .await?;
    sql(format!("ALTER TABLE `{db}`.users DROP COLUMN lastname")).await?;
    sql(format!(
        "UPDATE `{db}`.users SET email = 'neha@x' WHERE id = 1"
    ))
    .await?;
    sql(format!("UPDATE `{db}`.users SET id = 10 WHERE id = 2")).await?;
    wait_for("the new rows, whole", T, || async {
        let neha = users.find_one(doc! { "_id": 1 }).await?;
        let moved = users.find_one(doc! { "_id": 10 }).await?;
        Ok(
            (neha.as_ref().and_then(|d| d.get_str("email").ok()) == Some("neha@x")
                && moved.is_some())
            .then_some((neha, moved)),
        )
    })
    .await
    .map(|(neha, moved)| {
        let neha = neha.unwrap_or_default();
        assert!(
            !neha.contains_key("lastname"),
            "the dropped column's field is gone: {neha}"
        );
        let moved = moved.unwrap_or_default();
        assert_eq!(
            moved.get_str("email").ok(),
            Some("aravind.dekate@gmail.com")
        );
    })?;
    assert_eq!(
        users.count_documents(doc! { "_id": 2 }).await?,
        0,
        "no ghost under the old key"
    );
    assert_eq!(users.count_documents(doc! {}).await?, 4);
    run.stop().await?;
    Ok(())
}

/// Produces `records` (key, value) to the users topic, then changes user 2's email to `email`
/// in MySQL, waits for it to reach the copies (a broken record holds nothing up), and returns
/// the dead letters, one per record.
async fn broken_records_then_a_change(
    tc: &TestConfig,
    mdb: &mongodb::Database,
    records: &[(&[u8], &[u8])],
    email: &str,
) -> Result<Vec<rdkafka::message::OwnedMessage>> {
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", endpoints().kafka)
        .create()?;
    let topic = tc.topic("users");
    for (key, payload) in records {
        producer
            .send(BaseRecord::to(&topic).key(*key).payload(*payload))
            .map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(20))?;
    let db = tc.tables[0]
        .split('.')
        .next()
        .context("the test database")?;
    sql(format!(
        "UPDATE `{db}`.users SET email = '{email}' WHERE id = 2"
    ))
    .await?;
    wait_for("the change after the broken records applied", T, || async {
        let docs = orders(mdb).await?;
        Ok(docs
            .iter()
            .any(|d| user_email(d).as_deref() == Some(email))
            .then_some(()))
    })
    .await?;
    let dlq = read_topic(&format!("{}.dlq", tc.name), records.len(), T).await?;
    assert_eq!(dlq.len(), records.len(), "each broken record dead-lettered");
    Ok(dlq)
}

/// A header of a dead letter, as text.
fn dlq_header(m: &rdkafka::message::OwnedMessage, k: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == k)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[tokio::test]
async fn poison_messages_go_to_the_dead_letter_topic_with_context_and_later_changes_still_apply()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 1).await?;
    let run = start(tc.config(true)?, Components::Both);
    wait_all_versioned(&mdb, "user_in_orders").await?;
    let topic = tc.topic("users");
    let unknown_id: &[u8] = &[0, 0x7f, 0xff, 0xff, 0xf0, 1, 2, 3];
    let dlq = broken_records_then_a_change(
        &tc,
        &mdb,
        &[(b"junk", b"\x13\x37 random bytes"), (b"junk2", unknown_id)],
        "after.poison@x",
    )
    .await?;
    let header = dlq_header;
    assert_eq!(
        dlq[0].payload(),
        Some(&b"\x13\x37 random bytes"[..]),
        "original bytes kept"
    );
    assert_eq!(
        header(&dlq[0], "ecst.dlq.topic").as_deref(),
        Some(topic.as_str())
    );
    assert!(
        header(&dlq[0], "ecst.dlq.offset").is_some()
            && header(&dlq[0], "ecst.dlq.partition").is_some()
    );
    assert_eq!(
        header(&dlq[0], "ecst.dlq.error.class").as_deref(),
        Some("definite")
    );
    assert!(
        header(&dlq[0], "ecst.dlq.error.message")
            .is_some_and(|m| m.contains("value") && m.contains("magic byte")),
        "{:?}",
        header(&dlq[0], "ecst.dlq.error.message")
    );
    assert!(
        header(&dlq[1], "ecst.dlq.error.message").is_some_and(|m| m.contains("2147483632")),
        "{:?}",
        header(&dlq[1], "ecst.dlq.error.message")
    );
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_truncated_record_and_one_that_does_not_match_its_schema_are_dead_lettered_with_context()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 1).await?;
    let run = start(tc.config(true)?, Components::Both);
    wait_all_versioned(&mdb, "user_in_orders").await?;
    let topic = tc.topic("users");
    // A real change record of the topic: its framing names a schema the registry has.
    let real = read_topic(&topic, 1, T).await?;
    let (key, value) = real
        .first()
        .and_then(|m| Some((m.key()?.to_vec(), m.payload()?.to_vec())))
        .context("a record of the users topic")?;
    let truncated = value[..value.len() / 2].to_vec();
    let mut mismatched = value[..5].to_vec();
    // A union index the value schema does not have, then noise: bytes that are not this schema.
    mismatched.extend_from_slice(&[0x7f, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3]);
    let dlq = broken_records_then_a_change(
        &tc,
        &mdb,
        &[(&key, &truncated), (&key, &mismatched)],
        "after.broken@x",
    )
    .await?;
    let header = dlq_header;
    for (m, original) in dlq.iter().zip([&truncated, &mismatched]) {
        assert_eq!(m.payload(), Some(&original[..]), "original bytes kept");
        assert_eq!(
            header(m, "ecst.dlq.error.class").as_deref(),
            Some("definite")
        );
        let message = header(m, "ecst.dlq.error.message").unwrap_or_default();
        let id = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
        assert!(
            message.contains("value") && message.contains(&id.to_string()),
            "the message names the part and the schema id {id}: {message}"
        );
    }
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn ten_thousand_random_updates_over_1000_users_converge_to_the_mysql_table() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = unique("conv");
    sql(format!("CREATE DATABASE `{db}` CHARACTER SET utf8mb4")).await?;
    sql(format!("CREATE TABLE `{db}`.users (id INT PRIMARY KEY, firstname VARCHAR(45), lastname VARCHAR(45), email VARCHAR(45))")).await?;
    sql(format!("INSERT INTO `{db}`.users SELECT seq, CONCAT('f', seq), CONCAT('l', seq), CONCAT('u', seq, '@gmail.com') FROM `{db}`.seq_1_to_1000")).await?;
    let mut tc = TestConfig::new(&db, &["users"]);
    tc.sink = Some(mapping_toml(
        &tc,
        "user_in_orders",
        "embedded",
        "keep",
        "match_path = \"user.id\"\ntarget_path = \"user\"",
    ));
    let mdb = mongo_db(&tc.mongo_db).await?;
    let coll = mdb.collection::<Document>("purchase_order");
    let n_orders: i32 = std::env::var("ECST_CONVERGE_ORDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let run = start(tc.config(true)?, Components::Both);
    // The order-service takes its orders while ecst runs: each embeds the user as it was then.
    // (Inserted after the sink consumed the snapshot, as an order-service would; the seed
    // scenario tests cover refreshing copies from the snapshot.)
    let group = sink_group(&tc);
    wait_for("the sink consumed the snapshot", T, || async {
        Ok(group_caught_up(&group, &[tc.topic("users")])
            .await?
            .then_some(()))
    })
    .await?;
    let docs: Vec<Document> = (0..n_orders)
        .map(|i| {
            let id = (i % 1000) + 1;
            doc! {
                "user": { "id": id, "firstname": format!("f{id}"), "lastname": format!("l{id}"), "email": format!("u{id}@gmail.com") },
                "price": f64::from(i),
            }
        })
        .collect();
    coll.insert_many(docs).await?;
    // Deterministic pseudo-random updates (xorshift), 100 statements per transaction.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut c = admin().await?;
    for _batch in 0..100 {
        let mut tx = c.start_transaction(mysql_async::TxOpts::default()).await?;
        for _ in 0..100 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = x % 1000 + 1;
            tx.query_drop(format!("UPDATE `{db}`.users SET email = CONCAT('u{id}.', {}, '@x'), lastname = '{}' WHERE id = {id}", x % 100_000, x % 977)).await?;
        }
        tx.commit().await?;
    }
    let expected: HashMap<i64, (String, String)> = c
        .query::<(i64, String, String), _>(format!("SELECT id, lastname, email FROM `{db}`.users"))
        .await?
        .into_iter()
        .map(|(id, l, e)| (id, (l, e)))
        .collect();
    wait_for_every(
        "every copy equals the table",
        Duration::from_secs(1800),
        Duration::from_secs(5),
        || async {
            let docs: Vec<Document> = coll.find(doc! {}).await?.try_collect().await?;
            let mismatched = docs
                .iter()
                .filter(|d| {
                    let Some(id) = user_id(d) else { return true };
                    let u = d.get_document("user").ok();
                    let got = (
                        u.and_then(|u| u.get_str("lastname").ok()).unwrap_or(""),
                        u.and_then(|u| u.get_str("email").ok()).unwrap_or(""),
                    );
                    expected
                        .get(&id)
                        .is_none_or(|(l, e)| (l.as_str(), e.as_str()) != got)
                })
                .count();
            Ok((docs.len() == n_orders as usize && mismatched == 0).then_some(()))
        },
    )
    .await?;
    run.stop().await?;
    Ok(())
}

#[tokio::test]
async fn mongodb_stopped_mid_stream_then_restarted_loses_no_change_and_keeps_the_group_membership()
-> Result<()> {
    let _exclusive = STACK_LOCK.write().await;
    let db = seed_database().await?;
    let mut tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    // A short poll interval: the outage below holds one batch for longer than it. librdkafka
    // leaves the group when the consumer is not polled within it (session.timeout.ms is the
    // broker's minimum; the poll interval may not be shorter).
    if let Some(sink) = tc.sink.as_mut() {
        sink.push_str(
            "\n[kafka.properties]\n\"max.poll.interval.ms\" = \"7000\"\n\"session.timeout.ms\" = \"6000\"\n",
        );
    }
    let group = format!("{}-sink", tc.name);
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 2).await?;
    let run = start(tc.config(true)?, Components::Both);
    wait_all_versioned(&mdb, "user_in_orders").await?;
    stack(&["stop", "mongo"]).await?;
    for i in 0..20 {
        sql(format!(
            "UPDATE `{db}`.users SET email = 'during.outage.{i}@x' WHERE id = {}",
            i % 4 + 1
        ))
        .await?;
    }
    wait_events(&tc.topic("users"), 24, T).await?;
    // The batch with those changes now waits for MongoDB; twice the poll interval later the
    // sink must still be the group's one member.
    let held = std::time::Instant::now();
    while held.elapsed() < Duration::from_secs(15) {
        let (state, members) = group_state(&group).await?;
        assert!(
            state == "Stable" && members == 1,
            "after {:?} of outage the group is {state} with {members} members",
            held.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stack(&["start", "mongo"]).await?;
    wait_for("copies converge after the outage", T, || async {
        let docs = orders(&mdb).await?;
        let ok = docs.iter().all(|d| {
            let id = user_id(d).unwrap_or(0);
            let last = (0..20).filter(|i| i % 4 + 1 == id).max().unwrap_or(0);
            user_email(d).as_deref() == Some(format!("during.outage.{last}@x").as_str())
        });
        Ok(ok.then_some(()))
    })
    .await?;
    assert!(!run.is_finished(), "the worker resumed by itself");
    assert_eq!(group_state(&group).await?, ("Stable".to_string(), 1));
    run.stop().await?;
    Ok(())
}

/// The state of a consumer group and its number of members, as the coordinator sees them.
async fn group_state(group: &str) -> Result<(String, usize)> {
    let e = endpoints();
    let group = group.to_string();
    tokio::task::spawn_blocking(move || -> Result<(String, usize)> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &e.kafka)
            .create()?;
        let list = c.fetch_group_list(Some(&group), Duration::from_secs(5))?;
        let g = list
            .groups()
            .first()
            .with_context(|| format!("group {group} unknown"))?;
        Ok((g.state().to_string(), g.members().len()))
    })
    .await?
}

#[tokio::test]
async fn a_sink_pointed_at_a_wrong_registry_path_stops_naming_it_and_dead_letters_nothing()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 1).await?;
    let source = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    // The registry answers, but not at this path: every id "is unknown". That is the
    // environment (a wrong URL), not four poison messages.
    let wrong = tc
        .toml(false)
        .replace("/apis/ccompat/v7", "/apis/ccompat/v7/no/such/path");
    let cfg = ecst::config::Config::from_toml_str(&wrong, Vec::new())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let sink = start(cfg, Components::Sink);
    let stopped = tokio::time::timeout(T, sink.join_error())
        .await
        .context("the sink stops instead of dead-lettering")?
        .context("the sink stops with an error")?;
    assert!(stopped.contains("registry"), "{stopped}");
    let dead = read_topic(&format!("{}.dlq", tc.name), 1, Duration::from_secs(3))
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    assert_eq!(dead, 0, "nothing diverted to the dead-letter topic");
    source.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_date_primary_key_change_moves_the_copies_to_the_new_key() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = unique("datekey");
    sql(format!("CREATE DATABASE `{db}`")).await?;
    sql(format!(
        "CREATE TABLE `{db}`.sku (code DATE PRIMARY KEY, name VARCHAR(20))"
    ))
    .await?;
    sql(format!(
        "INSERT INTO `{db}`.sku VALUES ('2026-12-01', 'bolt'), ('2026-01-07', 'nut')"
    ))
    .await?;
    let mut tc = TestConfig::new(&db, &["sku"]);
    tc.sink = Some(format!(
        r#"
        [sink]
        group_id = "{name}-sink"
        batch_timeout_ms = 10
        [[sink.mappings]]
        name = "sku_in_items"
        topic = "{topic}"
        kind = "embedded"
        collection = "items"
        match_path = "sku.code"
        target_path = "sku"
        "#,
        name = tc.name,
        topic = tc.topic("sku"),
    ));
    let source = start(tc.config(true)?, Components::Source);
    // The parents embed the key as the sink writes it (a BSON date), as an order-service
    // that took its copy from the topic would. (A JSON header carried it as a day number.)
    let snap = wait_events(&tc.topic("sku"), 2, T).await?;
    let code = snap
        .iter()
        .find_map(|e| {
            e.key
                .get("code")
                .cloned()
                .filter(|c| c.to_string().contains("2026-12-01"))
        })
        .context("the bolt's key")?;
    let mdb = mongo_db(&tc.mongo_db).await?;
    let items = mdb.collection::<Document>("items");
    items
        .insert_many(vec![
            doc! { "sku": { "code": code.clone(), "name": "bolt" }, "qty": 1 },
            doc! { "sku": { "code": code.clone(), "name": "bolt" }, "qty": 2 },
        ])
        .await?;
    let sink = start(tc.config(false)?, Components::Sink);
    sql(format!(
        "UPDATE `{db}`.sku SET code = '2026-12-02', name = 'big bolt' WHERE code = '2026-12-01'"
    ))
    .await?;
    wait_for("both copies follow the date key", T, || async {
        let docs: Vec<Document> = items.find(doc! {}).await?.try_collect().await?;
        let moved = docs
            .iter()
            .filter(|d| {
                d.get_document("sku")
                    .is_ok_and(|s| s.get_str("name") == Ok("big bolt"))
            })
            .count();
        Ok((moved == 2).then_some(()))
    })
    .await?;
    let left = items.count_documents(doc! { "sku.code": code }).await?;
    assert_eq!(left, 0, "no copy left under the old key");
    sink.stop().await?;
    source.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_truncate_applies_each_mappings_policy_and_rows_written_after_it_stay() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let mut replica = tc.clone();
    replica.mongo_db = unique("m");
    replica.sink = Some(mapping_toml(
        &replica,
        "users_doc",
        "document",
        "unset",
        "on_truncate = \"unset\"",
    ));
    let mut marked = tc.clone();
    marked.mongo_db = unique("m");
    marked.sink = Some(mapping_toml(
        &marked,
        "u",
        "embedded",
        "keep",
        "match_path = \"user.id\"\ntarget_path = \"user\"\non_truncate = \"mark\"",
    ));
    let marked_db = mongo_db(&marked.mongo_db).await?;
    seed_orders(&marked_db, 1).await?;
    let source = start(tc.config(true)?, Components::Source);
    let sinks = [
        start(replica.config(false)?, Components::Sink),
        start(marked.config(false)?, Components::Sink),
    ];
    let replica_db = mongo_db(&replica.mongo_db).await?;
    let users = replica_db.collection::<Document>("users");
    wait_for("the replica holds the 4 users", T, || async {
        Ok((users.count_documents(doc! {}).await? == 4).then_some(()))
    })
    .await?;
    wait_all_versioned(&marked_db, "u").await?;
    sql(format!("TRUNCATE TABLE `{db}`.users")).await?;
    sql(format!(
        "INSERT INTO `{db}`.users VALUES (9, 'After', 'Truncate', 'after@x')"
    ))
    .await?;
    wait_for(
        "unset: only the row written after the TRUNCATE is left",
        T,
        || async {
            let docs: Vec<Document> = users.find(doc! {}).await?.try_collect().await?;
            Ok((docs.len() == 1 && docs[0].get_str("email") == Ok("after@x")).then_some(()))
        },
    )
    .await?;
    wait_for("mark: every copy is marked deleted", T, || async {
        let docs = orders(&marked_db).await?;
        Ok(docs
            .iter()
            .all(|d| {
                d.get_document("user")
                    .is_ok_and(|u| u.get_bool("__deleted") == Ok(true))
            })
            .then_some(()))
    })
    .await?;
    let evs = events_of(&tc.topic("users"), 10, Duration::from_secs(3)).await?;
    assert!(
        evs.iter().any(|e| e.op == ecst::events::Op::Truncate),
        "a truncate event is in the topic"
    );
    for s in sinks {
        s.stop().await?;
    }
    source.stop().await?;
    Ok(())
}

/// The descriptions of `order`'s lines, in order, with their quantities.
async fn lines_of(coll: &mongodb::Collection<Document>, order: i32) -> Result<Vec<(String, i32)>> {
    let d = coll
        .find_one(doc! { "_id": order })
        .await?
        .with_context(|| format!("order {order}"))?;
    d.get_array("items")?
        .iter()
        .map(|e| {
            let e = e.as_document().context("a line")?;
            Ok((
                e.get_document("product")?
                    .get_str("description")
                    .unwrap_or("-")
                    .to_string(),
                e.get_i32("qty")?,
            ))
        })
        .collect()
}

#[tokio::test]
async fn a_product_copied_into_order_lines_refreshes_every_matching_line_or_is_refused_where_array_filters_are_missing()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let mut tc = TestConfig::new(&db, &["product"]);
    tc.sink = Some(format!(
        r#"
        [sink]
        group_id = "{g}"
        batch_timeout_ms = 10
        [[sink.mappings]]
        name = "product_in_lines"
        topic = "{topic}"
        kind = "embedded"
        collection = "order_lines"
        match_path = "items.product.productId"
        target_path = "items.$[].product"
        fields = ["id", "description"]
        rename = {{ id = "productId" }}
        on_delete = "mark"
        "#,
        g = sink_group(&tc),
        topic = tc.topic("product"),
    ));
    let mdb = mongo_db(&tc.mongo_db).await?;
    let ferretdb = mdb
        .run_command(doc! { "buildInfo": 1 })
        .await?
        .contains_key("ferretdbVersion");
    let coll = mdb.collection::<Document>("order_lines");
    let line = |id: i32, qty: i32| doc! { "product": { "productId": id, "description": "old" }, "qty": qty };
    coll.insert_many([
        // The same product twice, another beside it.
        doc! { "_id": 1, "items": [line(1, 1), line(2, 2), line(1, 3)] },
        doc! { "_id": 2, "items": [line(2, 5)] },
        doc! { "_id": 3, "items": [line(3, 7)] },
    ])
    .await?;
    // `ecst check` says the same before anything runs.
    let cfg = write_config(&tc, true, None)?;
    let out = tokio::process::Command::new(ecst_bin())
        .args(["--config", &cfg.to_string_lossy(), "check"])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let refused = text.lines().any(|l| {
        l.starts_with("FAIL") && l.contains("product_in_lines") && l.contains("arrayFilters")
    });
    assert_eq!(refused, ferretdb, "{text}");
    let run = start(tc.config(true)?, Components::Both);
    if ferretdb {
        // FerretDB 1.x has no `arrayFilters`: a loud stop naming the mapping and the fix,
        // never copies left unrefreshed.
        let err = tokio::time::timeout(T, run.join_error())
            .await
            .context("the sink stops by itself on FerretDB")?
            .context("with an error")?;
        assert!(
            err.contains("product_in_lines")
                && err.contains("arrayFilters")
                && err.contains("FerretDB"),
            "{err}"
        );
        assert_eq!(lines_of(&coll, 1).await?[0].0, "old", "nothing written");
        return Ok(());
    }
    wait_for("the snapshot in every line", T, || async {
        Ok((lines_of(&coll, 1).await?
            == [("IPad".into(), 1), ("IPhone".into(), 2), ("IPad".into(), 3)]
            && lines_of(&coll, 2).await? == [("IPhone".to_string(), 5)]
            && lines_of(&coll, 3).await? == [("Sony TV".to_string(), 7)])
        .then_some(()))
    })
    .await?;
    sql(format!(
        "UPDATE `{db}`.product SET description = 'IPad Pro' WHERE id = 1"
    ))
    .await?;
    sql(format!("DELETE FROM `{db}`.product WHERE id = 3")).await?;
    wait_for(
        "both lines of product 1 changed, and product 3 marked",
        T,
        || async {
            let three = coll.find_one(doc! { "_id": 3 }).await?.unwrap_or_default();
            let marked = three
                .get_array("items")
                .ok()
                .and_then(|a| a.first())
                .and_then(Bson::as_document)
                .and_then(|e| e.get_document("product").ok())
                .is_some_and(|p| p.get_bool("__deleted") == Ok(true));
            Ok((lines_of(&coll, 1).await?
                == [
                    ("IPad Pro".into(), 1),
                    ("IPhone".into(), 2),
                    ("IPad Pro".into(), 3),
                ]
                && marked)
                .then_some(()))
        },
    )
    .await?;
    assert_eq!(
        lines_of(&coll, 2).await?,
        [("IPhone".to_string(), 5)],
        "another product's line is left alone"
    );
    // Each line carries its own version: the changed lines the update's, the other the
    // snapshot's.
    let one = coll.find_one(doc! { "_id": 1 }).await?.unwrap_or_default();
    let versions: Vec<String> = one
        .get_array("items")?
        .iter()
        .filter_map(Bson::as_document)
        .filter_map(|e| {
            e.get_document("_ecst")
                .ok()?
                .get_str("product_in_lines")
                .ok()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(versions.len(), 3, "{one}");
    assert!(
        versions[0] == versions[2] && versions[0] > versions[1],
        "{versions:?}"
    );
    assert!(!one.contains_key("_ecst"), "the version is per line: {one}");
    // The guard is per line: a line holding a newer version than the next change keeps its copy
    // while the other line of the same product takes the change.
    coll.update_one(
        doc! { "_id": 1 },
        doc! { "$set": { "items.0._ecst.product_in_lines": "z-newer-than-any" } },
    )
    .await?;
    sql(format!(
        "UPDATE `{db}`.product SET description = 'IPad Air' WHERE id = 1"
    ))
    .await?;
    wait_for("the unguarded line changed", T, || async {
        Ok((lines_of(&coll, 1).await?[2].0 == "IPad Air").then_some(()))
    })
    .await?;
    assert_eq!(
        lines_of(&coll, 1).await?,
        [
            ("IPad Pro".into(), 1),
            ("IPhone".into(), 2),
            ("IPad Air".into(), 3)
        ],
        "the line with the newer version is left alone"
    );
    // Reconcile sees lines too: one restored without its version, one edited by hand.
    coll.update_one(
        doc! { "_id": 1 },
        doc! {
            "$unset": { "items.0._ecst": "" },
            "$set": { "items.1.product.description": "hand edit" },
        },
    )
    .await?;
    let (code, text) = reconcile(&cfg, &["--repair"]).await?;
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("copies 5: ok 3, stale 2, missing 0, orphaned 0")
            && text.contains("after the repair, copies 5: ok 5,"),
        "{text}"
    );
    assert_eq!(
        lines_of(&coll, 1).await?,
        [
            ("IPad Air".into(), 1),
            ("IPhone".into(), 2),
            ("IPad Air".into(), 3)
        ]
    );
    run.stop().await?;
    Ok(())
}

/// `ecst reconcile` with `args`: its exit code and what it printed.
async fn reconcile(cfg: &std::path::Path, args: &[&str]) -> Result<(Option<i32>, String)> {
    let out = tokio::process::Command::new(ecst_bin())
        .args(["--config", &cfg.to_string_lossy(), "reconcile"])
        .args(args)
        .output()
        .await?;
    Ok((
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

#[tokio::test]
async fn reconcile_finds_planted_stale_missing_and_orphaned_copies_and_repair_leaves_only_what_no_row_explains()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let mut tc = TestConfig::new(&db, &["users"]);
    tc.sink = Some(mapping_toml(
        &tc,
        "user_in_orders",
        "embedded",
        "mark",
        "match_path = \"user.id\"\ntarget_path = \"user\"\nfields = [\"id\", \"firstname\", \"lastname\", \"email\"]",
    ));
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 2).await?;
    let run = start(tc.config(true)?, Components::Both);
    wait_all_versioned(&mdb, "user_in_orders").await?;
    run.stop().await?;
    // Changes the sink never applies (it is down), as a DLQ'd change or a restored backup
    // would leave them.
    let source = start(tc.config(true)?, Components::Source);
    sql(format!(
        "UPDATE `{db}`.users SET email = 'aravind@new.example' WHERE id = 2"
    ))
    .await?;
    sql(format!("DELETE FROM `{db}`.users WHERE id = 4")).await?;
    wait_events(&tc.topic("users"), 6, T).await?;
    source.stop().await?;
    // Drift planted behind ecst's back: a copy edited (its version kept), a parent inserted
    // with no copy, a parent naming a user that never existed.
    let coll = mdb.collection::<Document>("purchase_order");
    coll.update_one(
        doc! { "user.id": 1 },
        doc! { "$set": { "user.email": "drift@x" } },
    )
    .await?;
    coll.insert_many([
        doc! { "_id": 900, "user": { "id": 3 } },
        doc! { "_id": 901, "user": { "id": 77, "firstname": "Ghost" } },
    ])
    .await?;
    let cfg = write_config(&tc, true, None)?;
    let (code, text) = reconcile(&cfg, &[]).await?;
    assert_eq!(code, Some(1), "drift found is exit status 1:\n{text}");
    // 10 copies: user 1's two (one drifted), user 2's two (behind), user 3's two and order 900
    // (no copy), user 4's two (deleted, not marked), order 901 (no such user).
    assert!(
        text.contains("copies 10: ok 3, stale 3, missing 1, orphaned 3"),
        "{text}"
    );
    assert!(
        text.contains("_id 900") && text.contains("_id 901"),
        "samples: {text}"
    );
    // Snapshot of 4, the update, the delete and its tombstone; user 4's key is gone, not absent.
    assert!(
        text.contains("4 keys in the topic (7 messages, 0 undecodable"),
        "{text}"
    );
    let untouched = coll
        .count_documents(doc! { "user.email": "drift@x" })
        .await?;
    assert_eq!(untouched, 1, "without --repair nothing is written");

    let (code, text) = reconcile(&cfg, &["--repair"]).await?;
    assert_eq!(
        code,
        Some(1),
        "order 901 is left, so drift is left:\n{text}"
    );
    assert!(
        text.contains("after the repair, copies 10: ok 9, stale 0, missing 0, orphaned 1"),
        "{text}"
    );
    let docs = orders(&mdb).await?;
    let email_of = |uid: i64| -> Vec<String> {
        docs.iter()
            .filter(|d| user_id(d) == Some(uid))
            .filter_map(user_email)
            .collect()
    };
    assert_eq!(email_of(1), ["neha.parate@gmail.com"; 2], "the edit undone");
    assert_eq!(
        email_of(2),
        ["aravind@new.example"; 2],
        "the missed change applied"
    );
    assert_eq!(
        email_of(3),
        ["mayur.devghare@gmail.com"; 3],
        "order 900 got its copy"
    );
    for d in docs.iter().filter(|d| user_id(d) == Some(4)) {
        assert_eq!(
            d.get_document("user")?.get_bool("__deleted"),
            Ok(true),
            "the delete applied by the mapping's policy: {d}"
        );
    }
    let ghost = coll
        .find_one(doc! { "_id": 901 })
        .await?
        .unwrap_or_default();
    assert_eq!(
        ghost.get_document("user")?,
        &doc! { "id": 77, "firstname": "Ghost" },
        "nothing says what a copy of user 77 is: left alone"
    );
    // Clean once the unexplained parent is gone; a wrong mapping name is an error (status 2).
    coll.delete_one(doc! { "_id": 901 }).await?;
    let (code, text) = reconcile(&cfg, &["--mapping", "user_in_orders"]).await?;
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = reconcile(&cfg, &["--mapping", "nope"]).await?;
    assert!(
        code == Some(2) && text.contains("no mapping named `nope`"),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn reconcile_of_a_document_mapping_restores_a_deleted_and_an_edited_document_and_reports_a_foreign_one()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let (_db, tc, run, users) = filled_users_replica().await?;
    run.stop().await?;
    users.delete_one(doc! { "_id": 3 }).await?;
    users
        .update_one(
            doc! { "_id": 1 },
            doc! { "$set": { "email": "drift@x" }, "$unset": { "lastname": "" } },
        )
        .await?;
    users
        .insert_one(doc! { "_id": 99, "email": "who@x" })
        .await?;
    let cfg = write_config(&tc, true, None)?;
    let (code, text) = reconcile(&cfg, &["--repair"]).await?;
    assert_eq!(code, Some(1), "document 99 is left:\n{text}");
    // Documents 1 (edited), 2, 4, 99 (no such row) and row 3 without its document.
    assert!(
        text.contains("documents 5: ok 2, stale 1, missing 1, orphaned 1"),
        "{text}"
    );
    assert!(
        text.contains("after the repair, documents 5: ok 4, stale 0, missing 0, orphaned 1"),
        "{text}"
    );
    let neha = users.find_one(doc! { "_id": 1 }).await?.unwrap_or_default();
    assert_eq!(neha.get_str("email")?, "neha.parate@gmail.com");
    assert_eq!(neha.get_str("lastname")?, "Parate");
    assert!(
        users.find_one(doc! { "_id": 3 }).await?.is_some(),
        "row 3's document back"
    );
    assert!(
        users.find_one(doc! { "_id": 99 }).await?.is_some(),
        "left alone"
    );
    Ok(())
}

#[tokio::test]
async fn a_mapping_added_to_a_group_already_past_its_topics_snapshot_is_backfilled_by_reconcile_without_a_snapshot()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let mut tc = TestConfig::new(&db, &["users"]);
    let first = mapping_toml(
        &tc,
        "user_in_orders",
        "embedded",
        "keep",
        "match_path = \"user.id\"\ntarget_path = \"user\"",
    );
    tc.sink = Some(first.clone());
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 1).await?;
    let run = start(tc.config(true)?, Components::Both);
    wait_all_versioned(&mdb, "user_in_orders").await?;
    run.stop().await?;
    // A second mapping of the same topic, into invoices the billing side created with only
    // the user's id: the group's offsets are past the snapshot, so the sink alone would fill
    // an invoice only when its user next changes.
    let invoices = mdb.collection::<Document>("invoice");
    invoices
        .insert_many((1..=4).map(|id| doc! { "_id": id * 10, "user": { "id": id } }))
        .await?;
    tc.sink = Some(format!(
        "{first}\n[[sink.mappings]]\nname = \"user_in_invoices\"\ntopic = \"{}\"\nkind = \"embedded\"\ncollection = \"invoice\"\nmatch_path = \"user.id\"\ntarget_path = \"user\"\nfields = [\"id\", \"email\"]\n",
        tc.topic("users")
    ));
    let cfg = write_config(&tc, true, None)?;
    let (code, text) = reconcile(&cfg, &["--mapping", "user_in_invoices", "--repair"]).await?;
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("copies 4: ok 0, stale 0, missing 4, orphaned 0")
            && text.contains("after the repair, copies 4: ok 4,"),
        "{text}"
    );
    let neha = invoices
        .find_one(doc! { "_id": 10 })
        .await?
        .unwrap_or_default();
    assert_eq!(
        neha.get_document("user")?,
        &doc! { "id": 1, "email": "neha.parate@gmail.com" }
    );
    assert_eq!(
        events_of(&tc.topic("users"), 5, Duration::from_secs(5))
            .await?
            .len(),
        4,
        "no snapshot was taken again: the topic still holds the 4 snapshot rows"
    );
    // The sink then carries the new mapping on, beside the old one.
    let run = start(tc.config(true)?, Components::Both);
    sql(format!(
        "UPDATE `{db}`.users SET email = 'neha@new.example' WHERE id = 1"
    ))
    .await?;
    wait_for("the next change in both collections", T, || async {
        let inv = invoices
            .count_documents(doc! { "user.email": "neha@new.example" })
            .await?;
        let ord = mdb
            .collection::<Document>("purchase_order")
            .count_documents(doc! { "user.email": "neha@new.example" })
            .await?;
        Ok((inv == 1 && ord == 1).then_some(()))
    })
    .await?;
    run.stop().await?;
    Ok(())
}

/// The value of `series` (name and labels, exactly as exposed) on `/metrics`.
async fn metric(port: u16, series: &str) -> Result<Option<f64>> {
    let body = http_get(port, "/metrics").await?;
    Ok(body.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }))
}

/// Creates `topic` with one partition and `config`.
async fn create_topic(topic: &str, config: &[(&str, &str)]) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", endpoints().kafka)
        .create()?;
    let mut t = NewTopic::new(topic, 1, TopicReplication::Fixed(1));
    for (k, v) in config {
        t = t.set(k, v);
    }
    for r in admin.create_topics(&[t], &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn a_dead_letter_topic_refusing_records_holds_only_them_and_the_batchs_writes_are_not_sent_again()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let mut tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    // A batch waits up to 3 s: the two records produced below land in one batch.
    tc.sink = tc
        .sink
        .map(|s| s.replace("batch_timeout_ms = 10", "batch_timeout_ms = 3000"));
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 1).await?;
    // The dead-letter topic exists already and takes no record of a dead letter's size.
    let dlq = format!("{}.dlq", tc.name);
    create_topic(&dlq, &[("max.message.bytes", "64")]).await?;
    let port = free_port()?;
    let cfg = write_config(&tc, true, Some(port))?;
    let run = spawn_captured(&cfg, "run", &[], "warn")?;
    wait_all_versioned(&mdb, "user_in_orders").await?;
    // Batches written to MongoDB (the histogram records each write of a batch once it is
    // acknowledged).
    let writes = "ecst_sink_batch_write_seconds_count";
    let writes_before = metric(port, writes).await?.unwrap_or(0.0);
    // One batch: a replayed change (a guarded write MongoDB answers) and a poison record.
    let topic = tc.topic("users");
    let replayed = read_topic(&topic, 1, T).await?;
    let (key, value) = replayed
        .first()
        .and_then(|m| Some((m.key()?.to_vec(), m.payload()?.to_vec())))
        .context("a record of the users topic")?;
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", endpoints().kafka)
        .set("linger.ms", "50")
        .create()?;
    producer
        .send(BaseRecord::to(&topic).key(&key[..]).payload(&value[..]))
        .map_err(|(e, _)| e)?;
    producer
        .send(
            BaseRecord::to(&topic)
                .key(&b"junk"[..])
                .payload(&b"\x13\x37 poison"[..]),
        )
        .map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(20))?;
    let refusals = r#"ecst_component_errors_total{component="sink",kind="dead_letter_topic"}"#;
    wait_for("three refused dead-letter sends", T, || async {
        Ok(metric(port, refusals)
            .await?
            .filter(|n| *n >= 3.0)
            .map(|_| ()))
    })
    .await?;
    assert_eq!(
        metric(port, writes).await?.unwrap_or(0.0) - writes_before,
        1.0,
        "the batch was written to MongoDB once, not once per dead-letter attempt"
    );
    // The topic takes records again: the dead letter is delivered once, and the stream goes on.
    {
        use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
        let admin: AdminClient<_> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", endpoints().kafka)
            .create()?;
        let alter =
            AlterConfig::new(ResourceSpecifier::Topic(&dlq)).set("max.message.bytes", "1048576");
        for r in admin.alter_configs(&[alter], &AdminOptions::new()).await? {
            r.map_err(|(t, e)| anyhow::anyhow!("altering {t:?}: {e}"))?;
        }
    }
    sql(format!(
        "UPDATE `{db}`.users SET email = 'after.dlq.refusal@x' WHERE id = 2"
    ))
    .await?;
    wait_for("the change after the refusal applied", T, || async {
        let docs = orders(&mdb).await?;
        Ok(docs
            .iter()
            .any(|d| user_email(d).as_deref() == Some("after.dlq.refusal@x"))
            .then_some(()))
    })
    .await?;
    let dead = read_topic(&dlq, 1, T).await?;
    assert_eq!(dead.len(), 1, "the poison record dead-lettered once");
    assert_eq!(dead[0].payload(), Some(&b"\x13\x37 poison"[..]));
    assert_eq!(
        metric(port, writes).await?.unwrap_or(0.0) - writes_before,
        2.0,
        "the held batch once, then the update's batch: the delivery wrote nothing again"
    );
    sigterm(&run.child)?;
    Ok(())
}

/// `ecst check`'s output for `cfg`.
async fn check_output(cfg: &std::path::Path) -> Result<String> {
    let out = tokio::process::Command::new(ecst_bin())
        .args(["--config", &cfg.to_string_lossy(), "check"])
        .output()
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// How many records the test's dead-letter topic holds (it may not exist: none).
async fn dead_letters(tc: &TestConfig) -> usize {
    read_topic(&format!("{}.dlq", tc.name), 1, Duration::from_secs(3))
        .await
        .map(|m| m.len())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_typo_in_a_mappings_fields_stops_the_sink_naming_it_check_reports_it_and_nothing_is_dead_lettered()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let mut tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    tc.sink = tc.sink.map(|s| {
        s.replace(
            r#"fields = ["id", "firstname", "lastname", "email"]"#,
            r#"fields = ["id", "firstname", "lastname", "emial"]"#,
        )
    });
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 1).await?;
    // The first start: the topic has no schema yet, so its first change is judged.
    let run = start(tc.config(true)?, Components::Both);
    let err = tokio::time::timeout(T, run.join_error())
        .await
        .context("the sink stops by itself")?
        .context("with an error")?;
    assert!(
        err.contains("user_in_orders") && err.contains("`emial`") && err.contains("email"),
        "names the mapping, the field and the columns there are: {err}"
    );
    assert_eq!(dead_letters(&tc).await, 0, "nothing diverted");
    assert!(
        orders(&mdb).await?.iter().all(|d| !d.contains_key("_ecst")),
        "no copy written"
    );
    // `check` now judges the registered schema.
    let cfg = write_config(&tc, true, None)?;
    let text = check_output(&cfg).await?;
    assert!(
        text.lines().any(|l| l.starts_with("FAIL")
            && l.contains("mapping user_in_orders fits")
            && l.contains("`emial`")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("PASS") && l.contains("mapping product_in_orders fits")),
        "{text}"
    );
    // The same config again: refused at start, before consuming.
    let again = start(tc.config(false)?, Components::Sink);
    let err = tokio::time::timeout(T, again.join_error())
        .await
        .context("refused at start")?
        .context("with an error")?;
    assert!(err.contains("`emial`"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_column_dropped_under_a_mapping_stops_the_sink_and_after_the_fix_every_change_lands_rows_before_a_new_column_without_it()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 1).await?;
    let source = start(tc.config(true)?, Components::Source);
    let sink = start(tc.config(false)?, Components::Sink);
    wait_all_versioned(&mdb, "user_in_orders").await?;
    sql(format!("ALTER TABLE `{db}`.users DROP COLUMN lastname")).await?;
    sql(format!(
        "UPDATE `{db}`.users SET email = 'after.drop@x' WHERE id = 2"
    ))
    .await?;
    let err = tokio::time::timeout(T, sink.join_error())
        .await
        .context("the sink stops at the first row without the column")?
        .context("with an error")?;
    assert!(
        err.contains("user_in_orders") && err.contains("`lastname`"),
        "{err}"
    );
    assert_eq!(dead_letters(&tc).await, 0, "nothing diverted");
    // Meanwhile a column is added, and row 1 gets a value in it.
    sql(format!(
        "ALTER TABLE `{db}`.users ADD COLUMN phone VARCHAR(20) NULL"
    ))
    .await?;
    sql(format!(
        "UPDATE `{db}`.users SET phone = '555-0101', email = 'with.phone@x' WHERE id = 1"
    ))
    .await?;
    // The source has seen the new column (4 snapshot rows, then the two updates): the fix is
    // deployed after the migration, as `fields` may name only columns the rows have.
    wait_events(&tc.topic("users"), 6, T).await?;
    // The fix: the mapping copies the columns the rows have now.
    let mut fixed = tc.clone();
    fixed.sink = fixed.sink.map(|s| {
        s.replace(
            r#"fields = ["id", "firstname", "lastname", "email"]"#,
            r#"fields = ["id", "firstname", "email", "phone"]"#,
        )
    });
    let sink = start(fixed.config(false)?, Components::Sink);
    wait_for("both changes applied after the fix", T, || async {
        let docs = orders(&mdb).await?;
        let email = |id| {
            docs.iter()
                .find(|d| user_id(d) == Some(id))
                .and_then(user_email)
        };
        Ok((email(1).as_deref() == Some("with.phone@x")
            && email(2).as_deref() == Some("after.drop@x"))
        .then_some(()))
    })
    .await?;
    let docs = orders(&mdb).await?;
    let user = |id| {
        docs.iter()
            .find(|d| user_id(d) == Some(id))
            .and_then(|d| d.get_document("user").ok().cloned())
            .unwrap_or_default()
    };
    assert_eq!(
        user(1).get_str("phone").ok(),
        Some("555-0101"),
        "{}",
        user(1)
    );
    assert!(
        !user(2).contains_key("phone") && !user(2).contains_key("lastname"),
        "user 2's row was written between the drop and the new column: {}",
        user(2)
    );
    assert_eq!(dead_letters(&tc).await, 0);
    sink.stop().await?;
    source.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_mapping_set_to_stop_on_errors_stops_at_a_poison_message_and_after_the_switch_to_dead_letter_nothing_is_lost()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let mut tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let dead_letter = tc.clone();
    tc.sink = tc.sink.map(|s| {
        s.replace(
            "name = \"user_in_orders\"",
            "name = \"user_in_orders\"\n            on_error = \"stop\"",
        )
    });
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 1).await?;
    let source = start(tc.config(true)?, Components::Source);
    let sink = start(tc.config(false)?, Components::Sink);
    wait_all_versioned(&mdb, "user_in_orders").await?;
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", endpoints().kafka)
        .create()?;
    producer
        .send(
            BaseRecord::to(&tc.topic("users"))
                .key(&b"junk"[..])
                .payload(&b"\x13\x37 poison"[..]),
        )
        .map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(20))?;
    sql(format!(
        "UPDATE `{db}`.users SET email = 'after.stop@x' WHERE id = 2"
    ))
    .await?;
    let err = tokio::time::timeout(T, sink.join_error())
        .await
        .context("the sink stops at the poison message")?
        .context("with an error")?;
    let at = format!("{}/0@", tc.topic("users"));
    assert!(
        err.contains("user_in_orders")
            && err.contains("on_error = \"stop\"")
            && err.contains(&at)
            && err.contains("magic byte"),
        "names the mapping, the message and its error: {err}"
    );
    assert_eq!(dead_letters(&tc).await, 0, "nothing diverted");
    assert!(
        orders(&mdb)
            .await?
            .iter()
            .all(|d| user_email(d).as_deref() != Some("after.stop@x")),
        "nothing after the poison message applied"
    );
    // Switched to dead_letter: the poison message is diverted and the change behind it lands.
    let sink = start(dead_letter.config(false)?, Components::Sink);
    wait_for(
        "the change behind the poison message applied",
        T,
        || async {
            Ok(orders(&mdb)
                .await?
                .iter()
                .any(|d| user_email(d).as_deref() == Some("after.stop@x"))
                .then_some(()))
        },
    )
    .await?;
    assert_eq!(dead_letters(&tc).await, 1);
    sink.stop().await?;
    source.stop().await?;
    Ok(())
}

/// The value of `name` (summed over its labels) in a /metrics body.
fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_message_counts_once_per_mapping_of_its_topic_toward_the_batch_bounds() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    // 200 users on one topic, 10 mappings of it, batches of at most 20 statements: 2,000
    // statements take at least 100 batches. Counted once per message, a batch held up to 20
    // messages, 200 statements (with 100 mappings and the default bounds: 635 MB of RSS).
    let db = unique("fan");
    sql(format!("CREATE DATABASE `{db}`")).await?;
    sql(format!(
        "CREATE TABLE `{db}`.users (id INT PRIMARY KEY, email VARCHAR(45))"
    ))
    .await?;
    let values: Vec<String> = (1..=200).map(|i| format!("({i}, 'u{i}@x')")).collect();
    sql(format!(
        "INSERT INTO `{db}`.users VALUES {}",
        values.join(", ")
    ))
    .await?;
    let mut tc = TestConfig::new(&db, &["users"]);
    let mut sink = format!(
        "\n[sink]\ngroup_id = \"{}-sink\"\nbatch_size = 20\n",
        tc.name
    );
    for j in 0..10 {
        sink.push_str(&format!(
            "[[sink.mappings]]\nname = \"m{j}\"\ntopic = \"{}\"\nkind = \"document\"\ncollection = \"users_{j}\"\n",
            tc.topic("users")
        ));
    }
    tc.sink = Some(sink);
    let port = free_port()?;
    let cfg = write_config(&tc, true, Some(port))?;
    let mut child = spawn(&cfg, "run")?;
    let body = wait_for("2,000 statements applied", T, || async {
        let body = http_get(port, "/metrics").await.unwrap_or_default();
        Ok((metric_sum(&body, "ecst_sink_applied_total") >= 2000.0).then_some(body))
    })
    .await;
    let _ = child.kill().await;
    let body = body?;
    let batches = metric_sum(&body, "ecst_sink_batch_write_seconds_count");
    assert!(
        batches >= 100.0,
        "2,000 statements in batches of at most 20 take at least 100 batches, not {batches}"
    );
    let mdb = mongo_db(&tc.mongo_db).await?;
    for j in 0..10 {
        let n = mdb
            .collection::<Document>(&format!("users_{j}"))
            .count_documents(doc! {})
            .await?;
        assert_eq!(n, 200, "collection users_{j}");
    }
    Ok(())
}
