//! Test harness: endpoints from the environment (as printed by `dev/stack env`, with the same
//! loopback defaults), unique names per test, condition waits with timeouts, and helpers to run
//! ecst in-process or as a child process.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ecst::config::Config;
use mysql_async::prelude::Queryable;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::process::Stdio;
use tokio::process::{Child, Command};

/// Service endpoints.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub mysql_host: String,
    pub mysql_port: u16,
    pub mysql_user: String,
    pub mysql_password: String,
    pub mysql_admin_user: String,
    pub mysql_admin_password: String,
    pub kafka: String,
    pub registry: String,
    pub mongo: String,
}

fn env_or(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

pub fn endpoints() -> Endpoints {
    Endpoints {
        mysql_host: env_or("ECST_MYSQL_HOST", "127.0.0.1"),
        mysql_port: env_or("ECST_MYSQL_PORT", "13306").parse().unwrap_or(13306),
        mysql_user: env_or("ECST_MYSQL_USER", "ecst"),
        mysql_password: env_or("ECST_MYSQL_PASSWORD", "ecst"),
        mysql_admin_user: env_or("ECST_MYSQL_ADMIN_USER", "ecst_admin"),
        mysql_admin_password: env_or("ECST_MYSQL_ADMIN_PASSWORD", "ecst_admin"),
        kafka: env_or("ECST_KAFKA_BOOTSTRAP", "127.0.0.1:19092"),
        registry: env_or(
            "ECST_SCHEMA_REGISTRY_URL",
            "http://127.0.0.1:18081/apis/ccompat/v7",
        ),
        mongo: env_or("ECST_MONGO_URI", "mongodb://127.0.0.1:27117/"),
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique across tests and runs: `<prefix>_<pid><n><nanos>`.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}{n}{:x}",
        std::process::id() % 10_000,
        nanos % 0xfffff
    )
}

/// A derived table of the numbers 1..=`n` in a column `seq`, for `INSERT … SELECT … FROM` it:
/// MariaDB's Sequence engine (`seq_1_to_N`) without it, so that MySQL runs it too.
pub fn numbers(n: u64) -> String {
    let digits = "(SELECT 0 AS d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9)";
    let places = n.max(1).to_string().len();
    let sum: Vec<String> = (0..places)
        .map(|i| format!("d{i}.d * {}", 10u64.pow(i as u32)))
        .collect();
    let from: Vec<String> = (0..places).map(|i| format!("{digits} AS d{i}")).collect();
    format!(
        "(SELECT {} + 1 AS seq FROM {}) AS numbers WHERE seq <= {n}",
        sum.join(" + "),
        from.join(" CROSS JOIN ")
    )
}

/// A server id unique enough among concurrently running readers.
pub fn unique_server_id() -> u32 {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    1_000 + (std::process::id() % 50_000) * 64 + n % 64
}

/// An admin connection to MySQL.
pub async fn admin() -> Result<mysql_async::Conn> {
    let e = endpoints();
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(e.mysql_host)
        .tcp_port(e.mysql_port)
        .user(Some(e.mysql_admin_user))
        .pass(Some(e.mysql_admin_password))
        .prefer_socket(false);
    mysql_async::Conn::new(opts)
        .await
        .context("mysql admin connection (is the stack up? dev/stack up)")
}

/// Creates a fresh database with the seed tables and rows; returns its name.
pub async fn seed_database() -> Result<String> {
    let db = unique("t");
    let mut c = admin().await?;
    c.query_drop(format!("CREATE DATABASE `{db}` CHARACTER SET utf8mb4"))
        .await?;
    c.query_drop(format!(
        "CREATE TABLE `{db}`.users (id INT NOT NULL, firstname VARCHAR(45) NULL, lastname VARCHAR(45) NULL, \
         email VARCHAR(45) NULL, PRIMARY KEY (id))"
    ))
    .await?;
    c.query_drop(format!(
        "INSERT INTO `{db}`.users VALUES (1,'Neha','Parate','neha.parate@gmail.com'), \
         (2,'Aravind','Dekate','aravind.dekate@gmail.com'), (3,'Mayur','Devghare','mayur.devghare@gmail.com'), \
         (4,'Suchita','Vinchurkar','suchita.vinchurkar@gmail.com')"
    ))
    .await?;
    c.query_drop(format!(
        "CREATE TABLE `{db}`.product (id INT NOT NULL, description VARCHAR(500) NULL, price INT NULL, \
         qty_available INT NULL, PRIMARY KEY (id))"
    ))
    .await?;
    c.query_drop(format!("INSERT INTO `{db}`.product VALUES (1,'IPad',300,10),(2,'IPhone',650,50),(3,'Sony TV',320,100)"))
        .await?;
    c.disconnect().await?;
    Ok(db)
}

/// Whether the test server is MariaDB (else MySQL, in the compat workflow).
pub async fn server_is_mariadb() -> Result<bool> {
    use mysql_async::prelude::Queryable;
    let mut c = admin().await?;
    let v: Option<String> = c.query_first("SELECT VERSION()").await?;
    Ok(v.unwrap_or_default().contains("MariaDB"))
}

/// Runs one statement as admin.
pub async fn sql(stmt: impl AsRef<str>) -> Result<()> {
    let mut c = admin().await?;
    c.query_drop(stmt.as_ref())
        .await
        .with_context(|| stmt.as_ref().to_string())?;
    c.disconnect().await?;
    Ok(())
}

/// Options of a generated test configuration.
#[derive(Debug, Clone)]
pub struct TestConfig {
    pub name: String,
    pub db: String,
    pub tables: Vec<String>,
    pub mongo_db: String,
    pub extra_source: String,
    pub sink: Option<String>,
    pub server_id: u32,
}

impl TestConfig {
    pub fn new(db: &str, tables: &[&str]) -> Self {
        TestConfig {
            name: unique("e"),
            db: db.to_string(),
            tables: tables.iter().map(|t| format!("{db}.{t}")).collect(),
            mongo_db: unique("m"),
            extra_source: String::new(),
            sink: None,
            server_id: unique_server_id(),
        }
    }

    pub fn topic(&self, table: &str) -> String {
        format!("{}.{}.{table}", self.name, self.db)
    }

    /// The seed's two embedded mappings on this test's topics.
    pub fn with_seed_mappings(mut self) -> Self {
        self.sink = Some(format!(
            r#"
            [sink]
            group_id = "{name}-sink"
            batch_timeout_ms = 10
            [[sink.mappings]]
            name = "user_in_orders"
            topic = "{users}"
            kind = "embedded"
            collection = "purchase_order"
            match_path = "user.id"
            target_path = "user"
            fields = ["id", "firstname", "lastname", "email"]
            [[sink.mappings]]
            name = "product_in_orders"
            topic = "{product}"
            kind = "embedded"
            collection = "purchase_order"
            match_path = "product.productId"
            target_path = "product"
            fields = ["id", "description"]
            rename = {{ id = "productId" }}
            "#,
            name = self.name,
            users = self.topic("users"),
            product = self.topic("product"),
        ));
        self
    }

    pub fn toml(&self, with_source: bool) -> String {
        let e = endpoints();
        let tables: Vec<String> = self.tables.iter().map(|t| format!("\"{t}\"")).collect();
        let mut s = format!(
            r#"
            name = "{name}"
            shutdown_timeout_ms = 20000
            [kafka]
            bootstrap_servers = "{kafka}"
            [schema_registry]
            url = "{registry}"
            [metrics]
            listen = ""
            [mongo]
            uri = "{mongo}"
            database = "{mongo_db}"
            "#,
            name = self.name,
            kafka = e.kafka,
            registry = e.registry,
            mongo = e.mongo,
            mongo_db = self.mongo_db,
        );
        if with_source {
            s.push_str(&format!(
                r#"
                [mysql]
                host = "{host}"
                port = {port}
                user = "{user}"
                password = "{pw}"
                server_id = {sid}
                heartbeat_ms = 1000
                [source]
                tables = [{tables}]
                commit_interval_ms = 50
                {extra}
                "#,
                host = e.mysql_host,
                port = e.mysql_port,
                user = e.mysql_user,
                pw = e.mysql_password,
                sid = self.server_id,
                tables = tables.join(", "),
                extra = self.extra_source,
            ));
        }
        if let Some(sink) = &self.sink {
            s.push_str(sink);
        }
        s
    }

    pub fn config(&self, with_source: bool) -> Result<Config> {
        Config::from_toml_str(&self.toml(with_source), Vec::new())
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// ecst running in-process; stopped (gracefully) by `stop` or on drop.
pub struct Running {
    tx: Arc<ecst::shutdown::ShutdownTx>,
    handle: Option<tokio::task::JoinHandle<Result<(), ecst::app::AppError>>>,
}

pub fn start(cfg: Config, which: ecst::app::Components) -> Running {
    install_tls();
    init_logs();
    let (tx, rx) = ecst::shutdown::channel();
    let tx = Arc::new(tx);
    let handle = tokio::spawn(ecst::app::run(Arc::new(cfg), which, tx.clone(), rx));
    Running {
        tx,
        handle: Some(handle),
    }
}

impl Running {
    pub async fn stop(mut self) -> Result<()> {
        self.tx.trigger();
        match self.handle.take() {
            Some(h) => h.await?.map_err(|e| anyhow::anyhow!("{e}")),
            None => Ok(()),
        }
    }

    /// Whether the components ended by themselves (an error).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    pub async fn join_error(mut self) -> Option<String> {
        let h = self.handle.take()?;
        match h.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.tx.trigger();
    }
}

/// Logs of the in-process components, filtered by `RUST_LOG` (default: warnings).
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _other_subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

pub fn install_tls() {
    // Already installed by another test: fine.
    let _already = rustls::crypto::ring::default_provider().install_default();
}

/// Polls `cond` until it returns `Ok(Some(v))` or the timeout passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, cond: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    wait_for_every(what, timeout, Duration::from_millis(100), cond).await
}

/// Like [`wait_for`], polling every `every` (for checks that are heavy for the server).
pub async fn wait_for_every<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut cond: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match cond().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err:?})");
        }
        tokio::time::sleep(every).await;
    }
}

/// Reads committed messages of `topic` (all partitions) until `n` are read or the timeout passes.
pub async fn read_topic(topic: &str, n: usize, timeout: Duration) -> Result<Vec<OwnedMessage>> {
    let e = endpoints();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || -> Result<Vec<OwnedMessage>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &e.kafka)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let start = Instant::now();
        let md = loop {
            let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
            let parts = md
                .topics()
                .first()
                .map(|t| t.partitions().len())
                .unwrap_or(0);
            if parts > 0 {
                break parts;
            }
            if start.elapsed() > timeout {
                bail!("topic {topic} does not exist");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..md {
            tpl.add_partition_offset(&topic, p as i32, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut out = Vec::new();
        while out.len() < n && start.elapsed() < timeout {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                out.push(m?.detach());
            }
        }
        // Anything beyond n that is already there counts too (to detect duplicates).
        let grace = Instant::now();
        while grace.elapsed() < Duration::from_millis(500) {
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                out.push(m?.detach());
            }
        }
        Ok(out)
    })
    .await?
}

/// A registry client for decoding in tests.
pub fn registry() -> ecst::events::registry::Registry {
    install_tls();
    ecst::events::registry::Registry::new(&ecst::events::registry::RegistrySettings {
        url: endpoints().registry,
        username: None,
        password: None,
        timeout: Duration::from_secs(10),
    })
    .expect("registry settings")
}

/// Decodes change messages (skipping tombstones) into events.
pub async fn decode_all(msgs: &[OwnedMessage]) -> Result<Vec<ecst::sink::decode::DecodedEvent>> {
    let reg = registry();
    let mut out = Vec::new();
    for m in msgs {
        if let Some(ev) =
            ecst::sink::decode::decode_message(&reg, m.key(), m.payload(), &[]).await?
        {
            out.push(ev);
        }
    }
    Ok(out)
}

/// A MongoDB database handle.
pub async fn mongo_db(name: &str) -> Result<mongodb::Database> {
    install_tls();
    let client = mongodb::Client::with_uri_str(endpoints().mongo).await?;
    Ok(client.database(name))
}

/// Inserts the seed's purchase orders: `n_per_user` orders for each of users 1..=4.
pub async fn seed_orders(db: &mongodb::Database, n_per_user: i64) -> Result<()> {
    let coll = db.collection::<bson::Document>("purchase_order");
    let users = [
        (1, "Neha", "Parate", "neha.parate@gmail.com"),
        (2, "Aravind", "Dekate", "aravind.dekate@gmail.com"),
        (3, "Mayur", "Devghare", "mayur.devghare@gmail.com"),
        (4, "Suchita", "Vinchurkar", "suchita.vinchurkar@gmail.com"),
    ];
    let products = [
        (1i64, "IPad", 300.0),
        (2, "IPhone", 650.0),
        (3, "Sony TV", 320.0),
    ];
    let mut docs = Vec::new();
    for (id, f, l, e) in users {
        for k in 0..n_per_user {
            let (pid, desc, price) = products[(k as usize) % products.len()];
            docs.push(bson::doc! {
                "user": { "id": id, "firstname": f, "lastname": l, "email": e },
                "product": { "productId": pid, "description": desc },
                "price": price,
            });
        }
    }
    coll.insert_many(docs).await?;
    Ok(())
}

/// The run-binary path of ecst.
pub fn ecst_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ecst")
}

/// Tests that stop shared services or purge binlogs take this lock exclusively; all others
/// share it, so disruptive tests never run beside the rest.
pub static STACK_LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Runs `dev/stack <args>` (for outage tests).
pub async fn stack(args: &[&str]) -> Result<()> {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = tokio::process::Command::new(format!("{root}/dev/stack"))
        .args(args)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "dev/stack {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Reads `count` records of `topic` with Confluent's own Python client and Avro deserializer
/// (`dev/confluent_read.py`, installed by `dev/stack tools`): one JSON value per record,
/// `{"offset", "key", "value"}`. Fails with the deserializer's own words if it refuses one.
pub async fn confluent_read(topic: &str, count: usize) -> Result<Vec<serde_json::Value>> {
    let e = endpoints();
    let stack = std::env::var("ECST_STACK_DIR").unwrap_or_else(|_| ".stack".into());
    let python = std::path::Path::new(&stack).join("py/bin/python");
    if !python.exists() {
        bail!(
            "{} is missing: run `dev/stack tools` (dev/test does)",
            python.display()
        );
    }
    let run = Command::new(&python)
        .kill_on_drop(true)
        .args([
            "dev/confluent_read.py",
            "--topic",
            topic,
            "--count",
            &count.to_string(),
            "--bootstrap",
            &e.kafka,
            "--registry",
            &e.registry,
            "--timeout-s",
            "60",
        ])
        .output();
    // Its own bounds (60 s for the records, 10 s a registry request, 5 tries) end it first;
    // this one is for a reader that hangs anyway.
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .context("Confluent's reader did not finish within 180 s")??;
    if !out.status.success() {
        bail!(
            "Confluent's deserializer: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

/// Counts messages of a topic that decode to events (not tombstones).
pub async fn events_of(
    topic: &str,
    n: usize,
    timeout: Duration,
) -> Result<Vec<ecst::sink::decode::DecodedEvent>> {
    let msgs = read_topic(topic, n, timeout).await?;
    decode_all(&msgs).await
}

/// Waits until `topic` holds at least `n` change events (tombstones excluded); returns them.
pub async fn wait_events(
    topic: &str,
    n: usize,
    timeout: Duration,
) -> Result<Vec<ecst::sink::decode::DecodedEvent>> {
    let start = Instant::now();
    loop {
        let left = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(1));
        let evs = events_of(topic, n, left.min(Duration::from_secs(10)))
            .await
            .unwrap_or_default();
        if evs.len() >= n {
            return Ok(evs);
        }
        if start.elapsed() > timeout {
            bail!(
                "topic {topic}: {} of {n} events after {timeout:?}",
                evs.len()
            );
        }
    }
}

// ---- ecst as a child process

/// What `ecst check` prints (its PASS/FAIL lines) for the config file `cfg`.
pub async fn check_text(cfg: &std::path::Path) -> Result<String> {
    let out = Command::new(ecst_bin())
        .args(["--config", &cfg.to_string_lossy(), "check"])
        .output()
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

pub fn write_config(
    tc: &TestConfig,
    with_source: bool,
    metrics: Option<u16>,
) -> Result<std::path::PathBuf> {
    let mut toml = tc.toml(with_source);
    if let Some(port) = metrics {
        toml = toml.replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    }
    let path = std::env::temp_dir().join(format!("{}.toml", tc.name));
    std::fs::write(&path, toml)?;
    Ok(path)
}

pub fn spawn(cfg: &std::path::Path, cmd: &str) -> Result<Child> {
    Ok(Command::new(ecst_bin())
        .args(["--config", &cfg.to_string_lossy(), cmd])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?)
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub async fn http_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// Sends SIGTERM (graceful) to a child.
pub fn sigterm(child: &Child) -> Result<()> {
    let pid = child.id().context("child pid")?;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -TERM failed");
    Ok(())
}

/// Peak resident memory of a process (`VmHWM`), in MB.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// What a fault may make ecst's peak resident memory (a debug build; the 30-minute soak peaked
/// at 158 MB): far above, and memory is not bounded by the batch and buffer limits.
pub const FAULT_PEAK_RSS_MB: f64 = 512.0;

/// Records ecst's peak resident memory over the fault the calling test ran (the test's name
/// is its thread's) in `target/fault-peak-rss.tsv`, which `dev/test` prints, and fails if it
/// passed [`FAULT_PEAK_RSS_MB`].
pub fn record_fault_peak_rss(run: &Captured) -> Result<f64> {
    use std::io::Write;
    let pid = run.child.id().context("ecst has exited")?;
    let peak = peak_rss_mb(pid).context("no VmHWM for ecst")?;
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_string();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/fault-peak-rss.tsv");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{test}\t{peak:.0}")?;
    anyhow::ensure!(
        peak <= FAULT_PEAK_RSS_MB,
        "ecst's peak RSS during the fault was {peak:.0} MB, over {FAULT_PEAK_RSS_MB} MB"
    );
    Ok(peak)
}

pub struct Captured {
    pub child: Child,
    output: Arc<std::sync::Mutex<String>>,
}

/// `ecst <cmd>` as a child with extra environment, its stdout and stderr collected (and echoed
/// to the test's stderr, so a failing test still shows them).
pub fn spawn_captured(
    cfg: &std::path::Path,
    cmd: &str,
    env: &[(String, String)],
    rust_log: &str,
) -> Result<Captured> {
    let mut child = Command::new(ecst_bin())
        .args(["--config", &cfg.to_string_lossy(), cmd])
        // ECST_TEST_LOG overrides the test's filter, to look into a failing test.
        .env(
            "RUST_LOG",
            std::env::var("ECST_TEST_LOG").unwrap_or_else(|_| rust_log.to_string()),
        )
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let output = Arc::new(std::sync::Mutex::new(String::new()));
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let output = output.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[ecst] {line}");
                if let Ok(mut o) = output.lock() {
                    o.push_str(&line);
                    o.push('\n');
                }
            }
        });
    }
    Ok(Captured { child, output })
}

impl Captured {
    /// Everything the child printed so far.
    pub fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Waits until the output contains `needle`.
    pub async fn wait_for_output(&self, needle: &str, timeout: Duration) -> Result<()> {
        wait_for(&format!("`{needle}` in ecst's output"), timeout, || async {
            Ok(self.output().contains(needle).then_some(()))
        })
        .await
    }
}

/// The environment that arms test pause point `name` at `at` (ecst built with
/// `--features failpoints`, as `dev/test` does), and the file it creates when reached.
pub fn failpoint(name: &str, at: u64) -> (Vec<(String, String)>, std::path::PathBuf) {
    let file = std::env::temp_dir().join(unique("failpoint"));
    let var = format!(
        "ECST_FAILPOINT_{}",
        name.to_ascii_uppercase().replace('.', "_")
    );
    (
        vec![
            (var, at.to_string()),
            (
                "ECST_FAILPOINT_FILE".into(),
                file.to_string_lossy().into_owned(),
            ),
        ],
        file,
    )
}

/// As [`failpoint`], and the pause ends when the third path (the release file) is written.
pub fn failpoint_released_by_file(
    name: &str,
    at: u64,
) -> (
    Vec<(String, String)>,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let (mut env, reached) = failpoint(name, at);
    let release = std::env::temp_dir().join(unique("release"));
    env.push((
        format!(
            "ECST_FAILPOINT_RELEASE_{}",
            name.to_ascii_uppercase().replace('.', "_")
        ),
        release.to_string_lossy().into_owned(),
    ));
    (env, reached, release)
}

/// Waits until a pause point reached by ecst created `file`.
pub async fn wait_for_failpoint(file: &std::path::Path, timeout: Duration) -> Result<()> {
    if !cfg!(feature = "failpoints") {
        bail!("this test needs ecst built with `--features failpoints` (dev/test builds it so)");
    }
    wait_for("the test pause point to be reached", timeout, || async {
        Ok(file.exists().then_some(()))
    })
    .await
}

/// Whether consumer group `group` has committed offsets at the end of every partition 0 of
/// `topics`.
pub async fn group_caught_up(group: &str, topics: &[String]) -> Result<bool> {
    let e = endpoints();
    let group = group.to_string();
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || -> Result<bool> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &e.kafka)
            .set("group.id", &group)
            .create()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for t in &topics {
            tpl.add_partition(t, 0);
        }
        let committed = c.committed_offsets(tpl, Duration::from_secs(5))?;
        for el in committed.elements() {
            let (_, high) =
                c.fetch_watermarks(el.topic(), el.partition(), Duration::from_secs(5))?;
            // With transactions the last offset is a commit marker: committed may stop one short.
            let at = el.offset().to_raw().unwrap_or(-1);
            if at < high - 1 || at < 0 {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?
}

/// Writes `offset` as the stored source position of `tc`'s connector (as a crash, an operator or
/// an older version could have left it).
pub async fn store_offset(tc: &TestConfig, offset: &ecst::offsets::SourceOffset) -> Result<()> {
    let cfg = tc.config(true)?;
    let topic = cfg.offsets_topic();
    let bytes = offset.to_bytes();
    let name = tc.name.clone();
    let bootstrap = endpoints().kafka;
    tokio::task::spawn_blocking(move || -> Result<()> {
        use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
        let p: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()?;
        p.send(BaseRecord::to(&topic).key(name.as_bytes()).payload(&bytes))
            .map_err(|(e, _)| e)?;
        p.flush(Duration::from_secs(10))?;
        Ok(())
    })
    .await?
}

/// The last committed source offset of `tc`'s source.
pub async fn committed_offset(tc: &TestConfig) -> Result<Option<ecst::offsets::SourceOffset>> {
    let cfg = tc.config(true)?;
    Ok(ecst::source::load_offset(&cfg, &cfg.offsets_topic()).await?)
}
