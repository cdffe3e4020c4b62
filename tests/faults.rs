//! Faults on the wire: Toxiproxy (`dev/stack up toxiproxy`) between ecst and MySQL, and between
//! ecst and MongoDB, with a toxic injected mid-stream while MySQL is written all along, then
//! removed. After each: every change exactly once in Kafka (`read_committed`, counted against
//! what MySQL committed), or every copy equal to MySQL with nothing dead-lettered; and ecst
//! recovered by itself, without a restart.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;

use crate::common::*;
use crate::ops::{assert_exactly_once, counter_table, write_counter_updates};

const T: Duration = Duration::from_secs(180);

/// A Toxiproxy proxy to `upstream`, listening on a free loopback port; deleted when dropped.
pub(crate) struct Proxy {
    api: String,
    name: String,
    port: u16,
    http: reqwest::Client,
}

impl Proxy {
    async fn to(upstream_port: u16) -> Result<Proxy> {
        Self::listening(free_port()?, upstream_port).await
    }

    /// A proxy on a given port (the one a Kafka listener advertises).
    async fn listening(port: u16, upstream_port: u16) -> Result<Proxy> {
        install_tls();
        let api = std::env::var("ECST_TOXIPROXY_URL").context(
            "ECST_TOXIPROXY_URL unset: `dev/stack up toxiproxy` (dev/test starts it) and eval \"$(dev/stack env)\"",
        )?;
        let p = Proxy {
            api,
            name: unique("px"),
            port,
            http: reqwest::Client::builder().no_proxy().build()?,
        };
        p.http
            .post(format!("{}/proxies", p.api))
            .json(&json!({
                "name": p.name,
                "listen": format!("127.0.0.1:{}", p.port),
                "upstream": format!("127.0.0.1:{upstream_port}"),
                "enabled": true,
            }))
            .send()
            .await?
            .error_for_status()?;
        Ok(p)
    }

    /// Adds a toxic of `kind` on the server → client direction; returns its name.
    pub(crate) async fn toxic(&self, kind: &str, attributes: serde_json::Value) -> Result<String> {
        let name = format!("{kind}_down");
        self.http
            .post(format!("{}/proxies/{}/toxics", self.api, self.name))
            .json(&json!({
                "name": name, "type": kind, "stream": "downstream", "toxicity": 1.0,
                "attributes": attributes,
            }))
            .send()
            .await?
            .error_for_status()?;
        Ok(name)
    }

    pub(crate) async fn remove(&self, toxic: &str) -> Result<()> {
        self.http
            .delete(format!("{}/proxies/{}/toxics/{toxic}", self.api, self.name))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("curl")
            .args([
                "-s",
                "-X",
                "DELETE",
                &format!("{}/proxies/{}", self.api, self.name),
            ])
            .output();
    }
}

/// Which connection of ecst a fault is put on.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Link {
    Mysql,
    /// Through the broker's PROXIED listener, which advertises the proxy's address (dev/stack).
    Kafka,
    Mongo,
}

fn port_of_addr(var: &str, default: u16) -> u16 {
    std::env::var(var)
        .ok()
        .and_then(|a| a.rsplit(':').next()?.parse().ok())
        .unwrap_or(default)
}

fn mongo_port() -> Result<u16> {
    endpoints()
        .mongo
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("the MongoDB port")
}

impl Link {
    pub(crate) async fn proxy(self) -> Result<Proxy> {
        match self {
            Link::Mysql => Proxy::to(endpoints().mysql_port).await,
            Link::Kafka => {
                Proxy::listening(
                    port_of_addr("ECST_KAFKA_VIA_PROXY", 19096),
                    port_of_addr("ECST_KAFKA_PROXIED_UPSTREAM", 19095),
                )
                .await
            }
            Link::Mongo => Proxy::to(mongo_port()?).await,
        }
    }

    /// `toml` with this link's address replaced by the proxy's.
    pub(crate) fn through(self, toml: &str, proxy: &Proxy) -> Result<String> {
        let e = endpoints();
        let (from, to) = match self {
            Link::Mysql => (
                format!("port = {}", e.mysql_port),
                format!("port = {}", proxy.port),
            ),
            Link::Kafka => (
                format!("bootstrap_servers = \"{}\"", e.kafka),
                format!("bootstrap_servers = \"127.0.0.1:{}\"", proxy.port),
            ),
            // Short server selection: a stalled MongoDB is noticed in seconds, not 30.
            Link::Mongo => (
                format!(":{}/", mongo_port()?),
                format!(
                    ":{}/?serverSelectionTimeoutMS=3000&connectTimeoutMS=3000",
                    proxy.port
                ),
            ),
        };
        let out = toml.replace(&from, &to);
        anyhow::ensure!(out.contains(&to), "{from} not found in {toml}");
        Ok(out)
    }
}

/// Proxies for `links`, the config `toml` rewritten through them, written to a file; the
/// Kafka link's proxy listens on the port the broker advertises, so a test using it holds the
/// stack exclusively (the returned guard).
///
/// The guard comes first: bound as `let (_stack, proxies, cfg) = …`, it is dropped last (locals
/// drop in reverse order), so the proxies are deleted before another test may take the stack.
/// Dropped first, it let the next Kafka-link test create its proxy on the fixed Kafka proxy
/// port while this one's still listened there (toxiproxy: HTTP 500).
pub(crate) async fn through_proxies(
    links: &[Link],
    toml: String,
    name: &str,
) -> Result<(StackGuard, Vec<Proxy>, std::path::PathBuf)> {
    let guard = if links.iter().any(|l| matches!(l, Link::Kafka)) {
        StackGuard::Exclusive(STACK_LOCK.write().await)
    } else {
        StackGuard::Shared(STACK_LOCK.read().await)
    };
    let mut proxies = Vec::new();
    let mut toml = toml;
    for link in links {
        let proxy = link.proxy().await?;
        toml = link.through(&toml, &proxy)?;
        proxies.push(proxy);
    }
    let cfg = std::env::temp_dir().join(format!("{name}.toml"));
    std::fs::write(&cfg, toml)?;
    Ok((guard, proxies, cfg))
}

/// A held share of the dev stack.
#[allow(dead_code)]
pub(crate) enum StackGuard {
    Shared(tokio::sync::RwLockReadGuard<'static, ()>),
    Exclusive(tokio::sync::RwLockWriteGuard<'static, ()>),
}

/// The same toxic on each proxy; their names.
pub(crate) async fn inject(
    proxies: &[Proxy],
    kind: &str,
    attributes: &serde_json::Value,
) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for p in proxies {
        names.push(p.toxic(kind, attributes.clone()).await?);
    }
    Ok(names)
}

pub(crate) async fn heal(proxies: &[Proxy], toxics: &[String]) -> Result<()> {
    for (p, t) in proxies.iter().zip(toxics) {
        p.remove(t).await?;
    }
    Ok(())
}

/// The counter table's source with `link` through a proxy, while MySQL is written all along
/// (directly, ten one-row updates per transaction). `kind` is injected once 300 changes are in
/// Kafka and stays while the workload commits at least 300 more (and each line of `noticed`
/// appears in its log): the fault meets a stream that has work to do. Then it is removed, the
/// workload goes on a little and stops, and every change MySQL committed must be in Kafka exactly
/// once, the process still running.
async fn fault_on_the_link(
    link: Link,
    kind: &str,
    attributes: serde_json::Value,
    noticed: &[&str],
) -> Result<()> {
    fault_on_links(&[link], kind, attributes, noticed).await
}

/// [`fault_on_the_link`] with the same fault on several links at once.
async fn fault_on_links(
    links: &[Link],
    kind: &str,
    attributes: serde_json::Value,
    noticed: &[&str],
) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let db = counter_table().await?;
    let tc = TestConfig::new(&db, &["counter"]);
    let (_stack, proxies, cfg) = through_proxies(links, tc.toml(true), &tc.name).await?;
    let mut run = spawn_captured(&cfg, "source", &[], "info")?;
    wait_events(&tc.topic("counter"), 100, T).await?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(db.clone(), stop.clone()));
    wait_events(&tc.topic("counter"), 400, T).await?;
    let toxics = inject(&proxies, kind, &attributes).await?;
    let at_fault = committed_updates(&db).await?;
    let during = async {
        for line in noticed {
            run.wait_for_output(line, T).await?;
        }
        wait_for(
            "300 more changes committed in MySQL during the fault",
            T,
            || async { Ok((committed_updates(&db).await? >= at_fault + 300).then_some(())) },
        )
        .await
    }
    .await;
    heal(&proxies, &toxics).await?;
    let during = during.and(Ok(committed_updates(&db).await?));
    let healed = async {
        let at_heal = during?;
        wait_events(&tc.topic("counter"), 100 + at_heal + 100, T).await
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    healed?;
    exactly_once_and_still_running(&mut run, &tc, &db, "fault").await?;
    Ok(())
}

/// How many one-row updates MySQL has committed to the counter table so far.
pub(crate) async fn committed_updates(db: &str) -> Result<usize> {
    use mysql_async::prelude::Queryable;
    let mut c = admin().await?;
    let sum: Option<i64> = c
        .query_first(format!("SELECT CAST(SUM(n) AS SIGNED) FROM `{db}`.counter"))
        .await?;
    Ok(usize::try_from(sum.unwrap_or(0))?)
}

#[tokio::test]
async fn two_seconds_of_latency_on_the_mysql_link_mid_stream_delays_but_loses_and_repeats_no_change()
-> Result<()> {
    fault_on_the_link(
        Link::Mysql,
        "latency",
        json!({ "latency": 2000, "jitter": 0 }),
        &[],
    )
    .await
}

#[tokio::test]
async fn the_mysql_link_cut_to_10_kb_per_second_mid_stream_loses_and_repeats_no_change()
-> Result<()> {
    fault_on_the_link(Link::Mysql, "bandwidth", json!({ "rate": 10 }), &[]).await
}

#[tokio::test]
async fn a_blackholed_mysql_link_mid_stream_is_noticed_and_after_it_every_change_arrives_exactly_once()
-> Result<()> {
    // Data goes nowhere and no connection is closed: the half-open stream that only the
    // heartbeat watchdog can notice.
    fault_on_the_link(
        Link::Mysql,
        "timeout",
        json!({ "timeout": 0 }),
        &["source interrupted"],
    )
    .await
}

#[tokio::test]
async fn a_mysql_link_reset_mid_stream_resumes_by_itself_exactly_once() -> Result<()> {
    fault_on_the_link(
        Link::Mysql,
        "reset_peer",
        json!({ "timeout": 0 }),
        &["source interrupted"],
    )
    .await
}

/// The seed's pipeline (`ecst run`: source and sink) with `links` through proxies, while the
/// users' emails change all along (about 50 a second, directly in MySQL). `kind` is injected
/// once every copy is versioned and stays until each line of `noticed` is in the log and 100
/// more changes are committed; then it is removed, the workload stops, and every order's copy
/// must equal MySQL with nothing dead-lettered, the process still running.
async fn sink_fault_on_links(
    links: &[Link],
    kind: &str,
    attributes: serde_json::Value,
    noticed: &[&str],
) -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 2).await?;
    let (_stack, proxies, cfg) = through_proxies(links, tc.toml(true), &tc.name).await?;
    let mut run = spawn_captured(&cfg, "run", &[], "info")?;
    let coll = mdb.collection::<bson::Document>("purchase_order");
    crate::sink::wait_all_versioned(&mdb, "user_in_orders").await?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let written = std::sync::Arc::new(AtomicU32::new(0));
    let writer = tokio::spawn(write_emails_until(
        db.clone(),
        stop.clone(),
        written.clone(),
    ));
    let toxics = inject(&proxies, kind, &attributes).await?;
    let at_fault = written.load(Ordering::Relaxed);
    let during = async {
        for line in noticed {
            run.wait_for_output(line, T).await?;
        }
        wait_for(
            "100 more changes committed in MySQL during the fault",
            T,
            || async { Ok((written.load(Ordering::Relaxed) >= at_fault + 100).then_some(())) },
        )
        .await
    }
    .await;
    heal(&proxies, &toxics).await?;
    stop.store(true, Ordering::Relaxed);
    writer.await??;
    during?;
    copies_equal_mysql_and_nothing_dead_lettered(&db, &tc, &coll, &mut run, "fault").await
}

#[tokio::test]
async fn a_blackholed_mongodb_link_mid_stream_holds_the_sink_which_then_brings_every_copy_to_mysql_with_no_dead_letter()
-> Result<()> {
    sink_fault_on_links(
        &[Link::Mongo],
        "timeout",
        json!({ "timeout": 0 }),
        &["sink batch not applied"],
    )
    .await
}

#[tokio::test]
async fn two_seconds_of_latency_on_the_mongodb_link_delays_the_copies_but_leaves_each_equal_to_mysql()
-> Result<()> {
    sink_fault_on_links(
        &[Link::Mongo],
        "latency",
        json!({ "latency": 2000, "jitter": 0 }),
        &[],
    )
    .await
}

#[tokio::test]
async fn the_mongodb_link_cut_to_10_kb_per_second_leaves_every_copy_equal_to_mysql() -> Result<()> {
    sink_fault_on_links(&[Link::Mongo], "bandwidth", json!({ "rate": 10 }), &[]).await
}

#[tokio::test]
async fn a_mongodb_link_reset_mid_stream_is_retried_and_every_copy_equals_mysql() -> Result<()> {
    sink_fault_on_links(&[Link::Mongo], "reset_peer", json!({ "timeout": 0 }), &[]).await
}

#[tokio::test]
async fn a_slow_close_on_the_mongodb_link_leaves_every_copy_equal_to_mysql() -> Result<()> {
    sink_fault_on_links(&[Link::Mongo], "slow_close", json!({ "delay": 3000 }), &[]).await
}

#[tokio::test]
async fn the_kafka_and_mongodb_links_blackholed_at_once_hold_the_sink_then_every_copy_equals_mysql()
-> Result<()> {
    sink_fault_on_links(
        &[Link::Kafka, Link::Mongo],
        "timeout",
        json!({ "timeout": 0 }),
        // No change reaches the sink while Kafka takes none: the source is the one to notice.
        &["source interrupted"],
    )
    .await
}

/// Changes the users' emails (about 50 a second, directly in MySQL) until `stop`, counting
/// them in `written`.
pub(crate) async fn write_emails_until(
    db: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    written: std::sync::Arc<std::sync::atomic::AtomicU32>,
) -> Result<()> {
    use mysql_async::prelude::Queryable;
    use std::sync::atomic::Ordering;
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    while !stop.load(Ordering::Relaxed) {
        // Pacing a workload, not waiting for a condition (also while MySQL is down).
        pace.tick().await;
        let Ok(mut c) = admin().await else { continue };
        while !stop.load(Ordering::Relaxed) {
            pace.tick().await;
            let k = written.load(Ordering::Relaxed);
            let done = c
                .query_drop(format!(
                    "UPDATE `{db}`.users SET email = 'fault.{k}@x' WHERE id = {}",
                    k % 4 + 1
                ))
                .await;
            if done.is_err() {
                // MySQL went away: whether it committed is what MySQL's rows say.
                break;
            }
            written.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// After a sink fault: every order's user copy equals its MySQL row (2 orders per user), nothing
/// is dead-lettered, and the process rode the `what` out by itself (it is then stopped).
async fn copies_equal_mysql_and_nothing_dead_lettered(
    db: &str,
    tc: &TestConfig,
    coll: &mongodb::Collection<bson::Document>,
    run: &mut Captured,
    what: &str,
) -> Result<()> {
    use mysql_async::prelude::Queryable;
    let mut c = admin().await?;
    let rows: Vec<(i32, String)> = c
        .query(format!("SELECT id, email FROM `{db}`.users ORDER BY id"))
        .await?;
    for (id, email) in rows {
        wait_for(&format!("user {id}'s copies to equal MySQL"), T, || {
            let coll = coll.clone();
            let email = email.clone();
            async move {
                let docs = coll
                    .count_documents(bson::doc! { "user.id": id, "user.email": &email })
                    .await?;
                Ok((docs == 2).then_some(()))
            }
        })
        .await?;
    }
    let dlq = read_topic(&format!("{}.dlq", tc.name), 1, Duration::from_secs(3)).await?;
    assert!(
        dlq.is_empty(),
        "nothing dead-lettered: {} messages",
        dlq.len()
    );
    assert!(
        run.child.try_wait()?.is_none(),
        "the sink rode the {what} out by itself:\n{}",
        run.output()
    );
    record_fault_peak_rss(run)?;
    run.child.kill().await?;
    Ok(())
}

// ---- process faults: SIGKILL of a server mid-stream, then its restart

/// Writes counter updates (10 one-row updates per transaction) until `stop`, riding out a MySQL
/// that goes away: a failed transaction is simply not committed, and MySQL's final counts say
/// what was.
pub(crate) async fn write_until(db: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    write_paced_until(db, stop, None).await;
}

/// [`write_until`], at most one transaction per `pace` when given.
pub(crate) async fn write_paced_until(
    db: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pace: Option<Duration>,
) {
    use mysql_async::prelude::Queryable;
    use std::sync::atomic::Ordering;
    let mut k: u32 = 0;
    let mut tick = pace.map(tokio::time::interval);
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = admin().await else {
            // MySQL is down: try again shortly (pacing a workload, not waiting for a condition).
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            if let Some(t) = tick.as_mut() {
                // Pacing a workload, not waiting for a condition.
                t.tick().await;
            }
            let done = async {
                let mut tx = c.start_transaction(mysql_async::TxOpts::default()).await?;
                for i in 0..10 {
                    let id = (k * 10 + i) % 100 + 1;
                    tx.query_drop(format!(
                        "UPDATE `{db}`.counter SET n = n + 1 WHERE id = {id}"
                    ))
                    .await?;
                }
                tx.commit().await
            }
            .await;
            if done.is_err() {
                break;
            }
            k += 1;
        }
    }
}

/// After a source fault: every change MySQL committed in Kafka exactly once, and the source
/// rode `what` out by itself (it is then stopped).
pub(crate) async fn exactly_once_and_still_running(
    run: &mut Captured,
    tc: &TestConfig,
    db: &str,
    what: &str,
) -> Result<()> {
    assert_exactly_what_mysql_committed(tc, db).await?;
    assert!(
        run.child.try_wait()?.is_none(),
        "the source rode the {what} out by itself:\n{}",
        run.output()
    );
    record_fault_peak_rss(run)?;
    run.child.kill().await?;
    Ok(())
}

/// Every update event of the counter table exactly once: per row, n = 1..=its value in MySQL.
pub(crate) async fn assert_exactly_what_mysql_committed(tc: &TestConfig, db: &str) -> Result<()> {
    use mysql_async::prelude::Queryable;
    let mut c = admin().await?;
    let finals: Vec<(i32, i32)> = c
        .query(format!("SELECT id, n FROM `{db}`.counter ORDER BY id"))
        .await?;
    let updates: usize = finals.iter().map(|(_, n)| *n as usize).sum();
    anyhow::ensure!(updates > 0, "the workload committed nothing");
    let evs = wait_events(&tc.topic("counter"), 100 + updates, T).await?;
    let mut seen = crate::ops::counter_values_per_row(&evs);
    for (id, n) in finals {
        let expected: Vec<i32> = (1..=n).collect();
        assert_eq!(
            seen.remove(&id).unwrap_or_default(),
            expected,
            "row {id}: each committed change exactly once, in order"
        );
    }
    Ok(())
}

/// A source of the counter table streaming while MySQL is written all along; `service` is
/// killed (SIGKILL) mid-stream and started again; then the workload stops and Kafka is checked
/// against MySQL. `noticed`: the source must have said it was interrupted before the restart
/// (a dead MySQL breaks the binlog stream at once; a dead broker may not be noticed before it is
/// back, librdkafka waiting for it within its timeouts).
async fn process_fault(service: &str, noticed: bool) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let _exclusive = STACK_LOCK.write().await;
    let db = counter_table().await?;
    let tc = TestConfig::new(&db, &["counter"]);
    let cfg = write_config(&tc, true, None)?;
    let mut run = spawn_captured(&cfg, "source", &[], "info")?;
    wait_events(&tc.topic("counter"), 100, T).await?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(db.clone(), stop.clone()));
    wait_events(&tc.topic("counter"), 400, T).await?;
    let fault = async {
        stack(&["kill", service]).await?;
        if noticed {
            run.wait_for_output("source interrupted", T).await?;
        }
        stack(&["start", service]).await
    }
    .await;
    if fault.is_err() {
        // Whatever happened, the stack must be whole again for the other tests.
        let _ = stack(&["start", service]).await;
    }
    fault?;
    // The source resumes by itself; the workload goes on a little, then stops.
    if noticed {
        run.wait_for_output("recovered", T).await?;
    }
    let before_stop = wait_events(&tc.topic("counter"), 500, T).await?.len();
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    assert!(before_stop >= 500);
    exactly_once_and_still_running(&mut run, &tc, &db, "crash").await?;
    Ok(())
}

#[tokio::test]
async fn mariadb_killed_9_mid_stream_then_restarted_every_committed_change_arrives_exactly_once()
-> Result<()> {
    process_fault("mysql", true).await
}

#[tokio::test]
async fn the_kafka_broker_killed_9_mid_stream_then_restarted_every_committed_change_arrives_exactly_once()
-> Result<()> {
    process_fault("kafka", false).await
}

/// The seed's pipeline with 2 orders per user; `service` (MongoDB's server or its storage) is
/// killed while users change, then started again; every copy must equal MySQL, nothing
/// dead-lettered, and the process still running.
async fn sink_process_fault(service: &str) -> Result<()> {
    let _exclusive = STACK_LOCK.write().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 2).await?;
    let cfg = write_config(&tc, true, None)?;
    let mut run = spawn_captured(&cfg, "run", &[], "info")?;
    crate::sink::wait_all_versioned(&mdb, "user_in_orders").await?;
    let fault = async {
        stack(&["kill", service]).await?;
        for i in 0..20 {
            sql(format!(
                "UPDATE `{db}`.users SET email = 'crash.{i}@x' WHERE id = {}",
                i % 4 + 1
            ))
            .await?;
        }
        run.wait_for_output("sink batch not applied", Duration::from_secs(40))
            .await?;
        stack(&["start", service]).await
    }
    .await;
    if fault.is_err() {
        let _ = stack(&["start", service]).await;
    }
    fault?;
    let mdb = mongo_db(&tc.mongo_db).await?;
    let coll = mdb.collection::<bson::Document>("purchase_order");
    copies_equal_mysql_and_nothing_dead_lettered(&db, &tc, &coll, &mut run, "crash").await
}

#[tokio::test]
async fn the_mongodb_server_killed_9_while_users_change_then_restarted_every_copy_equals_mysql()
-> Result<()> {
    sink_process_fault("mongo").await
}

#[tokio::test]
async fn mongodbs_postgresql_storage_killed_9_while_users_change_then_restarted_every_copy_equals_mysql()
-> Result<()> {
    if std::env::var("ECST_MONGO_BACKEND").is_ok_and(|b| b != "postgresql") {
        // FerretDB on SQLite has no separate storage process to kill.
        return Ok(());
    }
    sink_process_fault("pg").await
}

/// What happens to the registry while a schema change needs it.
enum RegistryFault {
    /// Its link blackholed (through a proxy).
    Blackhole,
    /// SIGKILL of the registry process, then its start (its storage is a file: the schemas
    /// registered before survive, and so do their ids).
    Kill,
}

/// The counter table's source with a 2 s registry timeout; the registry fails as `fault` says
/// while an ALTER needs a new schema; after it is back, every change must be in Kafka exactly
/// once, those after the ALTER with the new column, the process still running.
async fn schema_change_while_the_registry_fails(fault: RegistryFault) -> Result<()> {
    let _shared;
    let _exclusive;
    match fault {
        RegistryFault::Blackhole => _shared = STACK_LOCK.read().await,
        RegistryFault::Kill => _exclusive = STACK_LOCK.write().await,
    }
    let e = endpoints();
    let registry_port: u16 = e
        .registry
        .split("//")
        .nth(1)
        .and_then(|h| h.split(['/', ':']).nth(1))
        .and_then(|p| p.parse().ok())
        .context("the registry's port")?;
    let proxy = match fault {
        RegistryFault::Blackhole => Some(Proxy::to(registry_port).await?),
        RegistryFault::Kill => None,
    };
    let db = counter_table().await?;
    let tc = TestConfig::new(&db, &["counter"]);
    let mut toml = tc.toml(true).replace(
        "[schema_registry]\n",
        "[schema_registry]\n            timeout_ms = 2000\n",
    );
    anyhow::ensure!(toml.contains("timeout_ms = 2000"), "{toml}");
    if let Some(p) = &proxy {
        toml = toml.replace(&format!(":{registry_port}/"), &format!(":{}/", p.port));
        anyhow::ensure!(toml.contains(&format!(":{}/", p.port)), "{toml}");
    }
    let cfg = std::env::temp_dir().join(format!("{}.toml", tc.name));
    std::fs::write(&cfg, toml)?;
    let mut run = spawn_captured(&cfg, "source", &[], "info")?;
    wait_events(&tc.topic("counter"), 100, T).await?;
    write_counter_updates(&db, 300).await?;
    wait_events(&tc.topic("counter"), 400, T).await?;
    let toxic = match &proxy {
        Some(p) => Some(p.toxic("timeout", json!({ "timeout": 0 })).await?),
        None => {
            stack(&["kill", "registry"]).await?;
            None
        }
    };
    let during = async {
        // A new column: the next change needs a new schema, which the registry cannot give.
        sql(format!(
            "ALTER TABLE `{db}`.counter ADD COLUMN note VARCHAR(20) NULL"
        ))
        .await?;
        write_counter_updates(&db, 300).await?;
        run.wait_for_output("source interrupted", T).await?;
        Ok::<_, anyhow::Error>(())
    }
    .await;
    match (&proxy, &toxic) {
        (Some(p), Some(t)) => p.remove(t).await?,
        _ => stack(&["start", "registry"]).await?,
    }
    during?;
    write_counter_updates(&db, 400).await?;
    let evs = wait_events(&tc.topic("counter"), 1_100, T).await?;
    assert_exactly_once(&evs, 10);
    assert!(
        evs.iter()
            .any(|e| e.after.as_ref().is_some_and(|a| a.get("note").is_some())),
        "changes after the ALTER carry the new column"
    );
    assert!(
        run.child.try_wait()?.is_none(),
        "the source rode the fault out by itself:\n{}",
        run.output()
    );
    record_fault_peak_rss(&run)?;
    run.child.kill().await?;
    Ok(())
}

#[tokio::test]
async fn a_blackholed_registry_link_during_a_schema_change_holds_the_source_which_then_delivers_every_change_exactly_once()
-> Result<()> {
    schema_change_while_the_registry_fails(RegistryFault::Blackhole).await
}

#[tokio::test]
async fn the_registry_killed_9_during_a_schema_change_then_restarted_every_change_arrives_exactly_once()
-> Result<()> {
    schema_change_while_the_registry_fails(RegistryFault::Kill).await
}

// ---- the Kafka link

#[tokio::test]
async fn two_seconds_of_latency_on_the_kafka_link_mid_stream_delays_but_loses_and_repeats_no_change()
-> Result<()> {
    fault_on_the_link(
        Link::Kafka,
        "latency",
        json!({ "latency": 2000, "jitter": 0 }),
        &[],
    )
    .await
}

#[tokio::test]
async fn a_kafka_link_reset_mid_stream_resumes_by_itself_exactly_once() -> Result<()> {
    fault_on_the_link(Link::Kafka, "reset_peer", json!({ "timeout": 0 }), &[]).await
}

#[tokio::test]
async fn a_blackholed_kafka_link_mid_stream_is_noticed_and_after_it_every_change_arrives_exactly_once()
-> Result<()> {
    fault_on_the_link(
        Link::Kafka,
        "timeout",
        json!({ "timeout": 0 }),
        // A warning within seconds, then the commit deadline ends the session, which starts
        // again by itself once the broker answers.
        &[
            "kafka has not acknowledged this transaction's records yet",
            "kafka did not acknowledge the transaction within 60 s",
            "source interrupted",
        ],
    )
    .await
}

#[tokio::test]
async fn the_kafka_link_cut_to_10_kb_per_second_mid_stream_loses_and_repeats_no_change()
-> Result<()> {
    fault_on_the_link(Link::Kafka, "bandwidth", json!({ "rate": 10 }), &[]).await
}

#[tokio::test]
async fn a_slow_close_on_the_kafka_link_loses_and_repeats_no_change() -> Result<()> {
    fault_on_the_link(Link::Kafka, "slow_close", json!({ "delay": 3000 }), &[]).await
}

#[tokio::test]
async fn a_slow_close_on_the_mysql_link_loses_and_repeats_no_change() -> Result<()> {
    fault_on_the_link(Link::Mysql, "slow_close", json!({ "delay": 3000 }), &[]).await
}

// ---- two links at once

#[tokio::test]
async fn two_seconds_of_latency_on_the_mysql_and_kafka_links_at_once_loses_and_repeats_no_change()
-> Result<()> {
    fault_on_links(
        &[Link::Mysql, Link::Kafka],
        "latency",
        json!({ "latency": 2000, "jitter": 0 }),
        &[],
    )
    .await
}

#[tokio::test]
async fn the_mysql_and_kafka_links_reset_at_once_resume_by_themselves_exactly_once() -> Result<()> {
    fault_on_links(
        &[Link::Mysql, Link::Kafka],
        "reset_peer",
        json!({ "timeout": 0 }),
        &["source interrupted"],
    )
    .await
}

#[tokio::test]
async fn the_mysql_and_kafka_links_blackholed_at_once_are_noticed_and_then_every_change_arrives_exactly_once()
-> Result<()> {
    fault_on_links(
        &[Link::Mysql, Link::Kafka],
        "timeout",
        json!({ "timeout": 0 }),
        &["source interrupted"],
    )
    .await
}

// ---- a broker that hangs: SIGSTOP past the transaction and session timeouts, then SIGCONT

/// How long the broker stays frozen: past the 10 s transaction timeout and the 6 s session
/// timeout the frozen-broker tests set.
const FROZEN_FOR: Duration = Duration::from_secs(20);

/// Freezes the broker (SIGSTOP of its process group) until `FROZEN_FOR` has passed and each
/// line of `noticed` is in `run`'s output, then thaws it, whatever happened.
async fn freeze_the_broker(run: &Captured, noticed: &[&str]) -> Result<()> {
    stack(&["freeze", "kafka"]).await?;
    let frozen_at = std::time::Instant::now();
    let held = async {
        for line in noticed {
            run.wait_for_output(line, T).await?;
        }
        wait_for("the broker frozen past the timeouts", T, || async {
            Ok((frozen_at.elapsed() >= FROZEN_FOR).then_some(()))
        })
        .await
    }
    .await;
    stack(&["thaw", "kafka"]).await?;
    held
}

/// `toml` with a 10 s transaction timeout and a 6 s consumer session timeout (the broker's
/// smallest), so that a 20 s freeze outlasts both.
pub(crate) fn with_short_kafka_timeouts(toml: &str) -> Result<String> {
    let out = toml.replace("[source]\n", "[source]\ntransaction_timeout_ms = 10000\n")
        + "\n[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n";
    anyhow::ensure!(out.contains("transaction_timeout_ms = 10000"), "{out}");
    Ok(out)
}

#[tokio::test]
async fn the_broker_frozen_past_the_transaction_timeout_then_thawed_every_committed_change_arrives_exactly_once()
-> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let _exclusive = STACK_LOCK.write().await;
    let db = counter_table().await?;
    let tc = TestConfig::new(&db, &["counter"]);
    let cfg = std::env::temp_dir().join(format!("{}.toml", tc.name));
    std::fs::write(&cfg, with_short_kafka_timeouts(&tc.toml(true))?)?;
    let mut run = spawn_captured(&cfg, "source", &[], "info")?;
    wait_events(&tc.topic("counter"), 100, T).await?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_until(db.clone(), stop.clone()));
    wait_events(&tc.topic("counter"), 400, T).await?;
    // The commit deadline is half the transaction timeout: 5 s.
    let frozen = freeze_the_broker(
        &run,
        &[
            "kafka did not acknowledge the transaction within 5 s",
            "source interrupted",
        ],
    )
    .await;
    let after = async {
        frozen?;
        let at_thaw = committed_updates(&db).await?;
        wait_events(&tc.topic("counter"), 100 + at_thaw + 100, T).await
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    after?;
    exactly_once_and_still_running(&mut run, &tc, &db, "frozen broker").await?;
    Ok(())
}

#[tokio::test]
async fn the_broker_frozen_past_the_sinks_session_timeout_then_thawed_every_copy_equals_mysql()
-> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let _exclusive = STACK_LOCK.write().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 2).await?;
    let cfg = std::env::temp_dir().join(format!("{}.toml", tc.name));
    std::fs::write(&cfg, with_short_kafka_timeouts(&tc.toml(true))?)?;
    let mut run = spawn_captured(&cfg, "run", &[], "info")?;
    let coll = mdb.collection::<bson::Document>("purchase_order");
    crate::sink::wait_all_versioned(&mdb, "user_in_orders").await?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let written = std::sync::Arc::new(AtomicU32::new(0));
    let writer = tokio::spawn(write_emails_until(
        db.clone(),
        stop.clone(),
        written.clone(),
    ));
    wait_for("changes flowing before the freeze", T, || async {
        Ok((written.load(Ordering::Relaxed) >= 50).then_some(()))
    })
    .await?;
    let frozen = freeze_the_broker(&run, &["source interrupted"]).await;
    // The workload goes on a little after the thaw, then stops.
    let after = async {
        frozen?;
        let at_thaw = written.load(Ordering::Relaxed);
        wait_for("changes after the thaw", T, || async {
            Ok((written.load(Ordering::Relaxed) >= at_thaw + 50).then_some(()))
        })
        .await
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await??;
    after?;
    copies_equal_mysql_and_nothing_dead_lettered(&db, &tc, &coll, &mut run, "frozen broker").await
}
