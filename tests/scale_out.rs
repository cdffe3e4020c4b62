//! Scale-out: several sink processes in one consumer group over change topics with several
//! partitions, on the real stack. Runs on FerretDB and on mongo-java-server (no server
//! deviation matters here).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bson::{Bson, Document, doc};
use ecst::app::Components;
use futures::TryStreamExt;
use mysql_async::prelude::Queryable;

use crate::common::*;

const T: Duration = Duration::from_secs(120);
const USERS: i64 = 200;
const ORDERS_PER_USER: i64 = 2;

/// One sink process of the group, with its own metrics port.
struct Instance {
    label: String,
    port: u16,
    run: Captured,
}

impl Instance {
    fn start(tc: &TestConfig, label: &str) -> Result<Instance> {
        let port = free_port()?;
        let toml = tc
            .toml(false)
            .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
        let path = std::env::temp_dir().join(format!("{}-{label}.toml", tc.name));
        std::fs::write(&path, toml)?;
        let run = spawn_captured(&path, "sink", &[], "warn")?;
        Ok(Instance {
            label: label.to_string(),
            port,
            run,
        })
    }

    /// Changes this process applied to the users mapping so far.
    async fn applied(&self) -> f64 {
        let Ok(body) = http_get(self.port, "/metrics").await else {
            return 0.0;
        };
        body.lines()
            .find_map(|l| {
                l.strip_prefix(r#"ecst_sink_applied_total{mapping="user_in_orders"} "#)
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// Waits until this process has applied more than `above` (it owns partitions and works).
    async fn applies_beyond(&self, above: f64) -> Result<f64> {
        wait_for(&format!("sink {} applying", self.label), T, || async {
            let n = self.applied().await;
            Ok((n > above).then_some(n))
        })
        .await
    }

    /// SIGTERM, and the exit status: a graceful leave (it commits what it applied).
    async fn stop(mut self) -> Result<()> {
        sigterm(&self.run.child)?;
        let status = tokio::time::timeout(T, self.run.child.wait())
            .await
            .with_context(|| format!("sink {} exits after SIGTERM", self.label))??;
        anyhow::ensure!(status.success(), "sink {} exited {status}", self.label);
        Ok(())
    }
}

/// `(order _id, user id, email, version)` of every purchase order.
async fn copies(mdb: &mongodb::Database) -> Result<Vec<(Bson, i64, String, String)>> {
    let docs: Vec<Document> = mdb
        .collection::<Document>("purchase_order")
        .find(doc! {})
        .await?
        .try_collect()
        .await?;
    Ok(docs
        .iter()
        .filter_map(|d| {
            let user = d.get_document("user").ok()?;
            let id = match user.get("id")? {
                Bson::Int32(i) => i64::from(*i),
                Bson::Int64(i) => *i,
                _ => return None,
            };
            let version = d
                .get_document("_ecst")
                .ok()
                .and_then(|v| v.get_str("user_in_orders").ok())
                .unwrap_or_default()
                .to_string();
            Some((
                d.get("_id")?.clone(),
                id,
                user.get_str("email").unwrap_or_default().to_string(),
                version,
            ))
        })
        .collect())
}

#[tokio::test]
async fn three_sinks_in_one_group_through_a_scale_out_and_a_rolling_restart_lose_no_change_and_never_regress_a_copy()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    // The users table and its mapping alone: every member's partitions carry its changes.
    let mut tc = TestConfig::new(&db, &["users"]).with_seed_mappings();
    tc.sink = tc.sink.map(|s| match s.rfind("[[sink.mappings]]") {
        Some(product) => s[..product].to_string(),
        None => s,
    });
    tc.extra_source = "topic_partitions = 4".into();
    let rows: Vec<String> = (5..=USERS)
        .map(|i| format!("({i}, 'f{i}', 'l{i}', 'u{i}@x')"))
        .collect();
    sql(format!(
        "INSERT INTO `{db}`.users VALUES {}",
        rows.join(", ")
    ))
    .await?;
    let mdb = mongo_db(&tc.mongo_db).await?;
    let orders: Vec<Document> = (1..=USERS)
        .flat_map(|u| {
            (0..ORDERS_PER_USER).map(move |k| {
                doc! {
                    "_id": u * 100 + k,
                    "user": { "id": u, "email": "old" },
                    "product": { "productId": 1, "description": "IPad" },
                }
            })
        })
        .collect();
    mdb.collection::<Document>("purchase_order")
        .insert_many(orders)
        .await?;
    let source = start(tc.config(true)?, Components::Source);
    let a = Instance::start(&tc, "a")?;
    let b = Instance::start(&tc, "b")?;
    wait_for("the snapshot in every copy", T, || async {
        let c = copies(&mdb).await?;
        Ok(
            (c.len() as i64 == USERS * ORDERS_PER_USER && c.iter().all(|x| !x.3.is_empty()))
                .then_some(()),
        )
    })
    .await?;

    // Every copy's version, watched all along: a copy whose version goes down regressed.
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicU64::new(0));
    let watch = tokio::spawn({
        let (mdb, stop, samples) = (mdb.clone(), stop.clone(), samples.clone());
        async move {
            let mut seen: HashMap<String, String> = HashMap::new();
            let mut regressions = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for (id, _, _, version) in copies(&mdb).await? {
                    let key = id.to_string();
                    if let Some(before) = seen.get(&key)
                        && *before > version
                    {
                        regressions.push(format!("order {key}: {before} then {version}"));
                    }
                    seen.insert(key, version);
                }
                samples.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(regressions)
        }
    });
    // MySQL is written all along: each update a new email for a pseudo-random user.
    let writes = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn({
        let (db, stop, writes) = (db.clone(), stop.clone(), writes.clone());
        async move {
            let mut c = admin().await?;
            let mut x: i64 = 7;
            while !stop.load(Ordering::Relaxed) {
                x = (x * 1_103_515_245 + 12_345) % 2_147_483_648;
                let id = 1 + x % USERS;
                let n = writes.fetch_add(1, Ordering::Relaxed);
                c.query_drop(format!(
                    "UPDATE `{db}`.users SET email = 'w{n}.u{id}@x' WHERE id = {id}"
                ))
                .await?;
            }
            c.disconnect().await?;
            anyhow::Ok(())
        }
    });
    let outcome = async {
        // Scale out: a third member joins while batches are written.
        let c = Instance::start(&tc, "c")?;
        c.applies_beyond(0.0).await?;
        // Rolling restart: one member at a time leaves and comes back.
        a.stop().await?;
        let a2 = Instance::start(&tc, "a2")?;
        a2.applies_beyond(0.0).await?;
        b.stop().await?;
        let b2 = Instance::start(&tc, "b2")?;
        b2.applies_beyond(0.0).await?;
        // Scale in: the third member leaves mid-stream.
        c.stop().await?;
        let a_now = a2.applied().await;
        a2.applies_beyond(a_now).await?;
        anyhow::Ok((a2, b2))
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await??;
    let (a2, b2) = outcome?;
    let written = writes.load(Ordering::Relaxed);
    // Nothing lost: every copy converges to its row in MySQL.
    let mut conn = admin().await?;
    let truth: HashMap<i64, String> = conn
        .query::<(i64, String), _>(format!("SELECT id, email FROM `{db}`.users"))
        .await?
        .into_iter()
        .collect();
    conn.disconnect().await?;
    let wrong = |c: &[(Bson, i64, String, String)]| -> Vec<String> {
        c.iter()
            .filter(|(_, u, email, _)| truth.get(u) != Some(email))
            .map(|(id, u, email, _)| format!("order {id} (user {u}): {email}"))
            .collect()
    };
    let converged = wait_for("every copy equal to its row", T, || async {
        Ok(wrong(&copies(&mdb).await?).is_empty().then_some(()))
    })
    .await;
    let regressions = watch.await??;
    eprintln!(
        "scale-out: {written} updates, {} samples of {} copies, {} regressions",
        samples.load(Ordering::Relaxed),
        USERS * ORDERS_PER_USER,
        regressions.len()
    );
    if converged.is_err() {
        let left = wrong(&copies(&mdb).await?);
        anyhow::bail!(
            "{} copies never got their row's last change: {left:?}",
            left.len()
        );
    }
    assert!(regressions.is_empty(), "copies went back: {regressions:?}");
    assert!(
        written > 100,
        "the stream ran all along ({written} updates)"
    );
    assert!(samples.load(Ordering::Relaxed) > 10);
    assert_eq!(
        read_topic(&format!("{}.dlq", tc.name), 1, Duration::from_secs(3))
            .await
            .map(|m| m.len())
            .unwrap_or(0),
        0,
        "nothing dead-lettered"
    );
    a2.stop().await?;
    b2.stop().await?;
    source.stop().await?;
    Ok(())
}
