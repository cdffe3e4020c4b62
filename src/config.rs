//! `connector.toml`: strict, documented, validated as a whole.
//!
//! Loading is two steps. Deserialization (`config` crate: the TOML file, then `ECST__SECTION__FIELD`
//! environment overrides) rejects unknown keys (`deny_unknown_fields` on every section) and adds a
//! "did you mean" hint. [`Config::validate`] then checks every semantic rule and reports *all*
//! problems at once, each naming its dotted field. Secrets are [`Secret`]s: they never print, and
//! `print-config` renders them as `***`. Every default is a `DEFAULT_*` constant documented here
//! and in the checked-in `connector.toml`.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

/// Default logical name (topic prefix, transactional id, offsets key).
pub const DEFAULT_NAME: &str = "ecst";
/// Default MySQL port.
pub const DEFAULT_MYSQL_PORT: u16 = 3306;
/// Default replica server id of the binlog reader (must be unique among replicas).
pub const DEFAULT_SERVER_ID: u32 = 184_054;
/// Default heartbeat period asked from the server, in ms.
pub const DEFAULT_HEARTBEAT_MS: u64 = 5_000;
/// Default connect timeout, in ms.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
/// Default snapshot chunk size (rows per primary-key range query).
pub const DEFAULT_SNAPSHOT_CHUNK_SIZE: u32 = 10_000;
/// Default interval between Kafka transaction commits of the source, in ms.
pub const DEFAULT_COMMIT_INTERVAL_MS: u64 = 100;
/// Default partitions of change topics created by ecst.
pub const DEFAULT_TOPIC_PARTITIONS: i32 = 1;
/// Default capacity of the bounded channel between binlog reader and producer (events).
pub const DEFAULT_CHANNEL_CAPACITY: usize = 8_192;
/// Default sink consumer group.
pub const DEFAULT_GROUP_ID: &str = "ecst-sink";
/// Default sink batch size (messages). Large on purpose: a batch only fills beyond what is
/// already fetched when the sink is behind, and then every message collapsed into the
/// newest change of its key is a write saved (10,000 updates of 1,000 users: at most 1,000 writes).
pub const DEFAULT_BATCH_SIZE: usize = 10_000;
/// Default bound of one sink batch in key + value bytes (the batch is held in memory).
pub const DEFAULT_BATCH_MAX_BYTES: usize = 32 * 1024 * 1024;
/// Default time a sink batch waits to fill, in ms: none. A batch is what is already fetched; what
/// arrives while it is written makes the next one, so batches grow with the load on their own,
/// and a caught-up change waits for nothing (a 20 ms wait was most of ecst's own latency share,
/// BENCHMARKS.md, 2026-12-07).
pub const DEFAULT_BATCH_TIMEOUT_MS: u64 = 0;
/// Default metrics/health listen address.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9187";
/// Default registry request timeout, in ms.
pub const DEFAULT_REGISTRY_TIMEOUT_MS: u64 = 10_000;
/// Default graceful-shutdown deadline, in ms.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 30_000;
/// Default bound on waiting for MySQL's global read lock when a snapshot needs one, in s.
pub const DEFAULT_SNAPSHOT_LOCK_WAIT_S: u64 = 10;
/// Default bound on how long a component retries one run of transient errors before it stops,
/// in ms; 0 is unbounded (as Kafka Connect's `errors.retry.timeout` defaults to for sources).
pub const DEFAULT_MAX_RETRY_DURATION_MS: u64 = 0;

/// A secret string: never printed, never serialized.
#[derive(Clone, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret value, for the one place that must send it to a server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Logical server name: topic prefix, Kafka transactional id, offsets key. Default `ecst`.
    #[serde(default = "default_name")]
    pub name: String,
    /// MySQL/MariaDB connection (source).
    pub mysql: Option<MysqlConfig>,
    /// Capture settings (source).
    pub source: Option<SourceConfig>,
    /// Kafka connection (both halves).
    pub kafka: KafkaConfig,
    /// Schema Registry (both halves).
    pub schema_registry: RegistryConfig,
    /// MongoDB connection (sink).
    pub mongo: Option<MongoConfig>,
    /// Sink settings and mappings.
    pub sink: Option<SinkConfig>,
    /// Metrics and health endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Graceful shutdown deadline in ms. Default 30000.
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    /// How long a component may keep retrying transient errors without one success before it
    /// stops with the last cause (ms). Default 0: retry for as long as it takes.
    #[serde(default)]
    pub max_retry_duration_ms: u64,
}

/// TLS mode to MySQL.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Plain TCP.
    #[default]
    Disabled,
    /// TLS required, server certificate verified against system roots (or `ca_file`).
    Required,
}

/// `[mysql]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    /// Host name or address.
    pub host: String,
    /// Port. Default 3306.
    #[serde(default = "default_mysql_port")]
    pub port: u16,
    /// User with REPLICATION SLAVE, REPLICATION CLIENT, SELECT (+ BINLOG MONITOR on MariaDB).
    pub user: String,
    /// Password (prefer `ECST__MYSQL__PASSWORD` or `password_file`).
    pub password: Option<Secret>,
    /// File holding the password (trailing newline ignored).
    pub password_file: Option<String>,
    /// Replica server id of the reader; must differ from every other replica. Default 184054.
    #[serde(default = "default_server_id")]
    pub server_id: u32,
    /// Heartbeat period asked from the server (ms); the stall watchdog fires at twice it.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Connect timeout (ms).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// TLS mode. Default `disabled`.
    #[serde(default)]
    pub tls: TlsMode,
    /// CA bundle for `tls = "required"` (PEM).
    pub ca_file: Option<String>,
}

/// When to snapshot.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Snapshot when no stored position exists, then stream. Purged position: error.
    #[default]
    Initial,
    /// Like `initial`, and re-snapshot when the stored position was purged from the server.
    WhenNeeded,
    /// Never snapshot: stream from the stored position, or from the current end.
    Never,
    /// Snapshot at every start, then stream from the snapshot's position.
    Always,
}

/// How the snapshot gets a binlog position consistent with the rows it reads.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotLocking {
    /// MariaDB: a consistent snapshot with no lock. MySQL: `global`, and `tables` where the
    /// server refuses FLUSH TABLES WITH READ LOCK (RDS, Aurora).
    #[default]
    Auto,
    /// `FLUSH TABLES WITH READ LOCK` while the position is read and the consistent-snapshot
    /// transaction opened (milliseconds).
    Global,
    /// `LOCK TABLES … READ` on the snapshotted tables for the whole snapshot: needs only the
    /// `LOCK TABLES` privilege, and blocks writers of those tables until the snapshot ends.
    Tables,
    /// No lock and no consistent read: the stream starts at the binlog's end and every table
    /// is read by the online snapshot while all of them stream (`source::online`). Every table
    /// needs a primary key; on MySQL, `source.watermark_table` too.
    Online,
}

/// `[source]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Tables to capture, as `db.table`.
    pub tables: Vec<String>,
    /// Snapshot mode. Default `initial`.
    #[serde(default)]
    pub snapshot_mode: SnapshotMode,
    /// Rows per snapshot chunk. Default 10000.
    #[serde(default = "default_snapshot_chunk_size")]
    pub snapshot_chunk_size: u32,
    /// Bytes a snapshot chunk may hold (decoded values). Default 32 MiB: a table of wide rows
    /// is read in smaller chunks, so memory is bounded in bytes, not only in rows.
    #[serde(default = "default_snapshot_chunk_max_bytes")]
    pub snapshot_chunk_max_bytes: usize,
    /// Write a tombstone (null value) after each delete. Default true.
    #[serde(default = "default_true")]
    pub tombstones_on_delete: bool,
    /// Kafka message keys of tables without a primary key, as Debezium's `message.key.columns`:
    /// `"db.table" = ["col", …]`. Such a table's records are keyed by those columns (with
    /// tombstones after deletes) instead of a null key. Not for a table with a primary key (its
    /// key is the primary key). The columns need not be unique; changes of one key value stay in
    /// order in one partition.
    #[serde(default)]
    pub message_key_columns: std::collections::BTreeMap<String, Vec<String>>,
    /// Kafka transaction commit interval (ms) while changes keep coming. Default 100. When the
    /// source is caught up it commits at once; while catching up a transaction stays open up
    /// to 9× the last commit's duration (at most 10 intervals).
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// Kafka transaction timeout (ms): how long the broker keeps an open transaction of this
    /// source before it aborts it. Default 300000; 10000 to 900000 (the broker's default
    /// `transaction.max.timeout.ms`). A commit still unacknowledged after the lesser of 60 s
    /// and half this is abandoned and re-sent.
    #[serde(default = "default_transaction_timeout_ms")]
    pub transaction_timeout_ms: u64,
    /// Bytes of records one Kafka transaction may hold before a large source transaction is
    /// split across Kafka transactions (at a resume point inside it, so exactly once holds).
    /// Default 128 MiB; at least 1 MiB. A Kafka transaction open for a quarter of
    /// `transaction_timeout_ms` is split too. A consumer then sees the first part of such a
    /// source transaction before the rest, as it would from Debezium.
    #[serde(default = "default_max_transaction_bytes")]
    pub max_transaction_bytes: u64,
    /// Partitions of topics ecst creates. Default 1.
    #[serde(default = "default_topic_partitions")]
    pub topic_partitions: i32,
    /// Topic holding the source positions. Default `<name>.offsets`.
    pub offsets_topic: Option<String>,
    /// Events buffered between reader and producer. Default 8192.
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
    /// Bytes of row values (as decoded, approximately) buffered between reader and producer.
    /// Default 67108864 (64 MiB); at least 1 MiB. A batch larger than this goes alone.
    #[serde(default = "default_channel_max_bytes")]
    pub channel_max_bytes: usize,
    /// MySQL only: seconds a snapshot waits for `FLUSH TABLES WITH READ LOCK` before it gives
    /// up (and retries later) rather than stall every writer queued behind it. Default 10.
    #[serde(default = "default_snapshot_lock_wait_s")]
    pub snapshot_lock_wait_s: u64,
    /// How the snapshot's position is made consistent with its rows. Default `auto`.
    #[serde(default)]
    pub snapshot_locking: SnapshotLocking,
    /// A table (`db.table`) the online snapshot writes its watermarks to: each chunk is read
    /// between two writes to it, and the stream drops from the chunk the rows changed between
    /// them (DBLog's method, as Debezium's incremental snapshots). This is how online
    /// snapshots run on MySQL, which gives no binlog position for a read view; on MariaDB it
    /// selects the same method. ecst creates the table when it is missing. Unset by default.
    pub watermark_table: Option<String>,
}

/// `[kafka]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// Extra librdkafka properties for every client (security.protocol, sasl.*, ssl.*).
    /// Values whose key contains `password` or `secret` are redacted by `print-config`.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
    /// librdkafka properties read from files (secret mounts), e.g.
    /// `{ "sasl.password" = "/run/secrets/kafka" }`. Always redacted by `print-config`.
    #[serde(default)]
    pub secret_files: std::collections::BTreeMap<String, String>,
}

/// `[schema_registry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL of a Confluent-compatible API.
    pub url: String,
    /// Basic-auth user.
    pub username: Option<String>,
    /// Basic-auth password.
    pub password: Option<Secret>,
    /// File holding the basic-auth password (trailing newline ignored).
    pub password_file: Option<String>,
    /// Request timeout (ms). Default 10000.
    #[serde(default = "default_registry_timeout_ms")]
    pub timeout_ms: u64,
}

/// `[mongo]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoConfig {
    /// Connection string (options such as `tls=true` go here). Treated as a secret. Required
    /// unless `uri_file` is set.
    #[serde(default)]
    pub uri: Secret,
    /// File holding the connection string (it usually embeds credentials).
    pub uri_file: Option<String>,
    /// Database holding the target collections.
    pub database: String,
}

/// What a mapping writes.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MappingKind {
    /// Refresh a sub-document embedded in many parent documents (`updateMany`).
    Embedded,
    /// One document per row, `_id` = key (upsert).
    Document,
}

/// What a delete does to the copies.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeletePolicy {
    /// Leave the copy as it was.
    Keep,
    /// Remove the copy (`$unset` of the target; `document`: delete the document).
    Unset,
    /// Keep the copy and set `__deleted: true` in it.
    Mark,
}

/// What a TRUNCATE of the source table does to the copies.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TruncatePolicy {
    /// Leave every copy as it was (the default: a TRUNCATE is often a reload, and removing every
    /// copy of a table is not something to do unasked).
    #[default]
    Keep,
    /// `document`: delete every document this mapping wrote before the TRUNCATE.
    Unset,
    /// Set `__deleted: true` in every copy written before the TRUNCATE.
    Mark,
}

/// What the sink does with a message it cannot apply (undecodable, unmappable, or a statement
/// MongoDB refuses): Kafka Connect's `errors.tolerance`. Environment problems never reach it:
/// they are retried or stop the sink whatever this says.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ErrorPolicy {
    /// Send it to the dead-letter topic with its context and go on (the default;
    /// `errors.tolerance = all` with a DLQ).
    #[default]
    DeadLetter,
    /// Stop the sink, naming the message; nothing after it is applied and no offset moves
    /// (`errors.tolerance = none`).
    Stop,
}

/// What a primary-key change does to existing copies.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KeyChangePolicy {
    /// Copies matched by the old key get the new row (and so the new key).
    Follow,
    /// Treat as delete of the old key (per the delete policy) and insert of the new one.
    DeleteInsert,
}

/// `[[sink.mappings]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// Name, unique; also the name of the version field `_ecst.<name>`.
    pub name: String,
    /// Change topic to read (`<name>.<db>.<table>`).
    pub topic: String,
    /// `embedded` or `document`.
    pub kind: MappingKind,
    /// Target collection.
    pub collection: String,
    /// `embedded`: dotted path of the key inside the parent documents (e.g. `user.id`).
    pub match_path: Option<String>,
    /// `embedded`: dotted path of the copy to replace (e.g. `user`).
    pub target_path: Option<String>,
    /// Row fields to copy (default: all), before renaming.
    pub fields: Option<Vec<String>>,
    /// Renames `row field → copy field` (e.g. `{ id = "productId" }`).
    #[serde(default)]
    pub rename: std::collections::BTreeMap<String, String>,
    /// Delete policy. Default `keep`.
    #[serde(default = "default_delete_policy")]
    pub on_delete: DeletePolicy,
    /// Primary-key change policy. Default `follow`.
    #[serde(default = "default_key_change")]
    pub on_key_change: KeyChangePolicy,
    /// TRUNCATE policy. Default `keep`; `unset` only for `document` mappings (an embedded copy
    /// could not keep its match field), `mark` for both.
    #[serde(default)]
    pub on_truncate: TruncatePolicy,
    /// A message this mapping cannot apply: `dead_letter` (default) or `stop`.
    #[serde(default)]
    pub on_error: ErrorPolicy,
}

/// `[sink]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Consumer group. Default `ecst-sink`.
    #[serde(default = "default_group_id")]
    pub group_id: String,
    /// Dead-letter topic. Default `<name>.dlq`.
    pub dead_letter_topic: Option<String>,
    /// Max messages per batch. Default 10000.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Max key + value bytes per batch (a batch ends after the message that reaches it).
    /// Default 33554432 (32 MiB).
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// Max wait to fill a batch after its first message (ms). Default 0: what is already
    /// fetched, and what arrives while a batch is written makes the next one.
    #[serde(default = "default_batch_timeout_ms")]
    pub batch_timeout_ms: u64,
    /// Create missing indexes on match paths at start. Default true.
    #[serde(default = "default_true")]
    pub create_indexes: bool,
    /// The mappings.
    pub mappings: Vec<MappingConfig>,
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Listen address of `/metrics`, `/health`, `/ready`; empty disables. Default 127.0.0.1:9187.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_metrics_listen(),
        }
    }
}

/// Log format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`. Default `text`.
    #[serde(default)]
    pub format: LogFormat,
    /// Filter directives (`RUST_LOG` syntax). Default `info`.
    pub level: Option<String>,
}

fn default_name() -> String {
    DEFAULT_NAME.into()
}
fn default_mysql_port() -> u16 {
    DEFAULT_MYSQL_PORT
}
fn default_server_id() -> u32 {
    DEFAULT_SERVER_ID
}
fn default_heartbeat_ms() -> u64 {
    DEFAULT_HEARTBEAT_MS
}
fn default_connect_timeout_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}
fn default_snapshot_chunk_size() -> u32 {
    DEFAULT_SNAPSHOT_CHUNK_SIZE
}
fn default_snapshot_chunk_max_bytes() -> usize {
    32 * 1024 * 1024
}
fn default_true() -> bool {
    true
}
fn default_commit_interval_ms() -> u64 {
    DEFAULT_COMMIT_INTERVAL_MS
}
fn default_max_transaction_bytes() -> u64 {
    128 << 20
}

fn default_transaction_timeout_ms() -> u64 {
    300_000
}
fn default_topic_partitions() -> i32 {
    DEFAULT_TOPIC_PARTITIONS
}
fn default_channel_max_bytes() -> usize {
    64 << 20
}

fn default_channel_capacity() -> usize {
    DEFAULT_CHANNEL_CAPACITY
}
fn default_snapshot_lock_wait_s() -> u64 {
    DEFAULT_SNAPSHOT_LOCK_WAIT_S
}
fn default_registry_timeout_ms() -> u64 {
    DEFAULT_REGISTRY_TIMEOUT_MS
}
fn default_group_id() -> String {
    DEFAULT_GROUP_ID.into()
}
fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}
fn default_batch_max_bytes() -> usize {
    DEFAULT_BATCH_MAX_BYTES
}
fn default_batch_timeout_ms() -> u64 {
    DEFAULT_BATCH_TIMEOUT_MS
}
fn default_metrics_listen() -> String {
    DEFAULT_METRICS_LISTEN.into()
}
fn default_shutdown_timeout_ms() -> u64 {
    DEFAULT_SHUTDOWN_TIMEOUT_MS
}
fn default_delete_policy() -> DeletePolicy {
    DeletePolicy::Keep
}
fn default_key_change() -> KeyChangePolicy {
    KeyChangePolicy::Follow
}

/// Errors of loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or a key is unknown or of the wrong type.
    #[error("{0}")]
    Parse(String),
    /// Semantic problems, all of them.
    #[error("{} problem(s) in the configuration:\n{}", .0.len(), .0.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigIssue>),
}

/// One semantic problem: the dotted field and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted path, e.g. `sink.mappings[0].match_path`.
    pub field: String,
    /// What is wrong and what it must be.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}` {}", self.field, self.message)
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Adds "did you mean `x`?" to serde's "unknown field `a`, expected one of `x`, `y`" messages.
fn with_suggestion(msg: String) -> String {
    let Some(rest) = msg.split("unknown field `").nth(1) else {
        return msg;
    };
    let Some((unknown, tail)) = rest.split_once('`') else {
        return msg;
    };
    let candidates: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
    let best = candidates
        .iter()
        .map(|c| (edit_distance(unknown, c), *c))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d);
    match best {
        Some((_, c)) => format!("{msg} (did you mean `{c}`?)"),
        None => msg,
    }
}

impl Config {
    /// Loads `path`, applies `ECST__SECTION__FIELD` overrides, validates everything.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Parse(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml_str(&text, std::env::vars())
    }

    /// Parses TOML text with the given environment, then validates.
    pub fn from_toml_str(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env_map: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("ECST__"))
            .collect();
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("ECST")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env_map)),
            )
            .build()
            .map_err(|e| ConfigError::Parse(with_suggestion(e.to_string())))?;
        let mut cfg: Config = built
            .try_deserialize()
            .map_err(|e| ConfigError::Parse(with_suggestion(e.to_string())))?;
        let mut issues = cfg.read_secret_files();
        if let Err(more) = cfg.validate() {
            issues.extend(more);
        }
        if !issues.is_empty() {
            return Err(ConfigError::Invalid(issues));
        }
        Ok(cfg)
    }

    /// Reads every `*_file` secret (Docker/Kubernetes secret mounts) into its field, unless the
    /// field is set inline or by the environment. Returns one issue per unreadable file.
    fn read_secret_files(&mut self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        let mut read = |field: String, path: &str| match std::fs::read_to_string(path) {
            Ok(s) => Some(s.trim_end_matches(['\n', '\r']).to_string()),
            Err(e) => {
                issues.push(ConfigIssue {
                    field,
                    message: format!("cannot read `{path}`: {e}"),
                });
                None
            }
        };
        if let Some(m) = self.mysql.as_mut()
            && m.password.is_none()
            && let Some(file) = &m.password_file
        {
            m.password = read("mysql.password_file".into(), file).map(Secret::new);
        }
        let r = &mut self.schema_registry;
        if r.password.is_none()
            && let Some(file) = &r.password_file
        {
            r.password = read("schema_registry.password_file".into(), file).map(Secret::new);
        }
        if let Some(m) = self.mongo.as_mut()
            && m.uri.expose().is_empty()
            && let Some(file) = &m.uri_file
            && let Some(uri) = read("mongo.uri_file".into(), file)
        {
            m.uri = Secret::new(uri);
        }
        for (key, file) in &self.kafka.secret_files {
            if !self.kafka.properties.contains_key(key)
                && let Some(v) = read(format!("kafka.secret_files.\"{key}\""), file)
            {
                self.kafka.properties.insert(key.clone(), v);
            }
        }
        issues
    }

    /// Topic of the positions (`source.offsets_topic` or `<name>.offsets`).
    pub fn offsets_topic(&self) -> String {
        self.source
            .as_ref()
            .and_then(|s| s.offsets_topic.clone())
            .unwrap_or_else(|| format!("{}.offsets", self.name))
    }

    /// Dead-letter topic (`sink.dead_letter_topic` or `<name>.dlq`).
    pub fn dead_letter_topic(&self) -> String {
        self.sink
            .as_ref()
            .and_then(|s| s.dead_letter_topic.clone())
            .unwrap_or_else(|| format!("{}.dlq", self.name))
    }

    /// Change topic of a `db.table`.
    pub fn topic_for(&self, db: &str, table: &str) -> String {
        // (Validated by `validate`: see `bad_topic_name`.)
        format!("{}.{db}.{table}", self.name)
    }

    /// Checks every rule and returns all issues.
    pub fn validate(&self) -> Result<(), Vec<ConfigIssue>> {
        let mut issues = Vec::new();
        let mut issue = |field: &str, message: &str| {
            issues.push(ConfigIssue {
                field: field.into(),
                message: message.into(),
            })
        };
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            issue(
                "name",
                "must be non-empty and use only letters, digits, `.`, `_`, `-`",
            );
        }
        if self.kafka.bootstrap_servers.trim().is_empty() {
            issue(
                "kafka.bootstrap_servers",
                "must not be empty (e.g. \"127.0.0.1:9092\")",
            );
        }
        // This build's librdkafka has no TLS and no SCRAM (rdkafka without its `ssl` feature):
        // say so at validation, naming the field, rather than fail each client at start.
        let prop = |k: &str| self.kafka.properties.get(k).map(|v| v.to_ascii_uppercase());
        if let Some(p) = prop("security.protocol").filter(|p| p.contains("SSL")) {
            issue(
                "kafka.properties.\"security.protocol\"",
                &format!(
                    "{p} needs TLS, which this ecst build does not include (librdkafka without OpenSSL); use PLAINTEXT or SASL_PLAINTEXT, or build ecst with the rdkafka feature `ssl`"
                ),
            );
        }
        for key in ["sasl.mechanism", "sasl.mechanisms"] {
            if let Some(m) = prop(key).filter(|m| m != "PLAIN") {
                issue(
                    &format!("kafka.properties.\"{key}\""),
                    &format!(
                        "{m} is not in this ecst build (librdkafka with SASL/PLAIN only); use PLAIN, or build ecst with the rdkafka features `ssl` (SCRAM) and `gssapi` (Kerberos)"
                    ),
                );
            }
        }
        if !(self.schema_registry.url.starts_with("http://")
            || self.schema_registry.url.starts_with("https://"))
        {
            issue("schema_registry.url", "must start with http:// or https://");
        }
        if let Some(m) = &self.mysql {
            if m.host.trim().is_empty() {
                issue("mysql.host", "must not be empty");
            }
            if m.port == 0 {
                issue("mysql.port", "must be between 1 and 65535");
            }
            if m.server_id == 0 {
                issue(
                    "mysql.server_id",
                    "must be non-zero and unique among the server's replicas",
                );
            }
            if m.heartbeat_ms < 100 {
                issue("mysql.heartbeat_ms", "must be at least 100");
            }
        }
        if let Some(s) = &self.source {
            if self.mysql.is_none() {
                issue("mysql", "section is required when [source] is present");
            }
            if s.tables.is_empty() {
                issue("source.tables", "must list at least one `db.table`");
            }
            for (i, t) in s.tables.iter().enumerate() {
                let parts: Vec<&str> = t.split('.').collect();
                if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
                    issue(
                        &format!("source.tables[{i}]"),
                        &format!("`{t}` must be `db.table`"),
                    );
                } else if let Some(why) = bad_topic_name(&self.topic_for(parts[0], parts[1])) {
                    // Kafka would refuse the topic at every start: say so once, now.
                    issue(
                        &format!("source.tables[{i}]"),
                        &format!(
                            "`{t}` gives the topic `{}`, which Kafka refuses: {why}",
                            self.topic_for(parts[0], parts[1])
                        ),
                    );
                }
            }
            for (t, cols) in &s.message_key_columns {
                let field = format!("source.message_key_columns.\"{t}\"");
                if !s.tables.contains(t) {
                    issue(&field, "names a table that is not in source.tables");
                }
                if cols.is_empty() {
                    issue(&field, "must name at least one column");
                }
                let mut seen = std::collections::HashSet::new();
                if let Some(dup) = cols.iter().find(|c| !seen.insert(c.as_str())) {
                    issue(&field, &format!("names `{dup}` twice"));
                }
            }
            if s.snapshot_chunk_size == 0 {
                issue("source.snapshot_chunk_size", "must be at least 1");
            }
            if s.snapshot_chunk_max_bytes < 1024 * 1024 {
                issue(
                    "source.snapshot_chunk_max_bytes",
                    "must be at least 1048576 (1 MiB)",
                );
            }
            if s.topic_partitions < 1 {
                issue("source.topic_partitions", "must be at least 1");
            }
            if s.channel_capacity == 0 {
                issue("source.channel_capacity", "must be at least 1");
            }
            if s.channel_max_bytes < 1 << 20 {
                issue(
                    "source.channel_max_bytes",
                    "must be at least 1048576 (1 MiB)",
                );
            }
            if s.commit_interval_ms == 0 {
                issue("source.commit_interval_ms", "must be at least 1");
            }
            if !(10_000..=900_000).contains(&s.transaction_timeout_ms) {
                issue(
                    "source.transaction_timeout_ms",
                    "must be from 10000 to 900000 (the broker's default transaction.max.timeout.ms)",
                );
            }
            if s.max_transaction_bytes < 1 << 20 {
                issue(
                    "source.max_transaction_bytes",
                    "must be at least 1048576 (1 MiB)",
                );
            }
            if s.snapshot_lock_wait_s == 0 {
                issue("source.snapshot_lock_wait_s", "must be at least 1");
            }
            if let Some(w) = &s.watermark_table {
                match w.split_once('.') {
                    Some((db, t)) if !db.is_empty() && !t.is_empty() && !t.contains('.') => {
                        if s.tables.iter().any(|c| c == w) {
                            issue(
                                "source.watermark_table",
                                "must not be a captured table (ecst writes to it)",
                            );
                        }
                    }
                    _ => issue("source.watermark_table", "must be `db.table`"),
                }
            }
        }
        if let Some(m) = &self.mongo
            && m.uri.expose().is_empty()
            && m.uri_file.is_none()
        {
            issue("mongo.uri", "is required (or set mongo.uri_file)");
        }
        if let Some(sink) = &self.sink {
            if self.mongo.is_none() {
                issue("mongo", "section is required when [sink] is present");
            }
            if sink.batch_size == 0 {
                issue("sink.batch_size", "must be at least 1");
            }
            if sink.batch_max_bytes == 0 {
                issue("sink.batch_max_bytes", "must be at least 1");
            }
            if sink.mappings.is_empty() {
                issue("sink.mappings", "must contain at least one mapping");
            }
            let mut names = std::collections::HashSet::new();
            for (i, m) in sink.mappings.iter().enumerate() {
                let f = |k: &str| format!("sink.mappings[{i}].{k}");
                if m.name.is_empty()
                    || !m
                        .name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    issue(&f("name"), "must be non-empty letters, digits, `_` or `-`");
                }
                if !names.insert(m.name.clone()) {
                    issue(
                        &f("name"),
                        &format!("`{}` is used by another mapping", m.name),
                    );
                }
                if m.topic.is_empty() {
                    issue(&f("topic"), "must not be empty");
                }
                if m.collection.is_empty() {
                    issue(&f("collection"), "must not be empty");
                }
                if m.kind == MappingKind::Embedded && m.on_truncate == TruncatePolicy::Unset {
                    issue(
                        &f("on_truncate"),
                        "\"unset\" is for kind = \"document\"; an embedded copy would lose its match field: use \"mark\" or \"keep\"",
                    );
                }
                if m.kind == MappingKind::Embedded {
                    match &m.match_path {
                        Some(p) if !p.is_empty() && !p.starts_with('$') => {}
                        _ => issue(
                            &f("match_path"),
                            "is required for kind = \"embedded\" (e.g. \"user.id\")",
                        ),
                    }
                    match &m.target_path {
                        Some(p) if !p.is_empty() && !p.starts_with('$') && p != "_id" => {}
                        _ => issue(
                            &f("target_path"),
                            "is required for kind = \"embedded\" (e.g. \"user\")",
                        ),
                    }
                }
                if let Some(fields) = &m.fields
                    && fields.is_empty()
                {
                    issue(
                        &f("fields"),
                        "must not be empty when given (omit it to copy all fields)",
                    );
                }
                if m.kind == MappingKind::Embedded {
                    for (k, p) in [
                        ("match_path", &m.match_path),
                        ("target_path", &m.target_path),
                    ] {
                        if let Some(p) = p
                            && p.split('.').next() == Some(crate::sink::mapping::VERSION_FIELD)
                        {
                            issue(
                                &f(k),
                                "must not be under `_ecst`, where ecst keeps the copies' versions",
                            );
                        }
                    }
                    if let Some(p) = &m.target_path
                        && p.starts_with("_id.")
                    {
                        issue(
                            &f("target_path"),
                            "must not be under `_id` (MongoDB never changes a document's _id)",
                        );
                    }
                    if let (Some(mp), Some(tp)) = (&m.match_path, &m.target_path)
                        && let Err(e) = crate::sink::mapping::array_target(mp, tp)
                    {
                        issue(
                            &f(if e.starts_with(&format!("`{tp}`")) {
                                "target_path"
                            } else {
                                "match_path"
                            }),
                            &e,
                        );
                    }
                    if let Some(missing) = match_field_left_out(m) {
                        issue(&f("fields"), &missing);
                    }
                }
                // A document mapping replaces whole documents: what another mapping wrote into
                // them would be dropped at the next change.
                if let Some((j, other)) = sink.mappings.iter().enumerate().find(|(j, o)| {
                    *j != i
                        && o.collection == m.collection
                        && (m.kind == MappingKind::Document || o.kind == MappingKind::Document)
                }) && i > j
                {
                    issue(
                        &f("collection"),
                        &format!(
                            "`{}` is also the collection of mapping `{}`, and a kind = \"document\" mapping replaces whole documents (dropping what another mapping wrote): give it a collection of its own",
                            m.collection, other.name
                        ),
                    );
                }
            }
        }
        if self.source.is_none() && self.sink.is_none() {
            issue(
                "source",
                "at least one of [source] or [sink] must be configured",
            );
        }
        if issues.is_empty() {
            Ok(())
        } else {
            Err(issues)
        }
    }

    /// The configuration as TOML-like text with every secret replaced by `***`.
    pub fn redacted(&self) -> String {
        let mut s = format!("{self:#?}");
        // Kafka passthrough properties may carry secrets as plain strings.
        for (k, v) in &self.kafka.properties {
            let lk = k.to_ascii_lowercase();
            if (lk.contains("password")
                || lk.contains("secret")
                || lk.contains("jaas")
                || self.kafka.secret_files.contains_key(k))
                && !v.is_empty()
            {
                s = s.replace(&format!("{v:?}"), "\"***\"");
            }
        }
        s
    }
}

/// Why an embedded mapping's copy would lose its own match field (`None`: it keeps it). When
/// `match_path` lies inside `target_path` (`product.productId` in `product`), every write
/// replaces the copy with the projected row, so the projection must produce that field (after
/// `rename`); otherwise the first update leaves the parents without the key they are found by.
fn match_field_left_out(m: &MappingConfig) -> Option<String> {
    // An array copy (`items.$[].product`) is matched through the array (`items.product.id`).
    let target = m.target_path.as_deref()?.replace(".$[].", ".");
    let target = target.as_str();
    let rest = m
        .match_path
        .as_deref()?
        .strip_prefix(target)?
        .strip_prefix('.')?;
    let field = rest.split('.').next()?;
    let renamed_to_it = m.rename.values().any(|v| v == field);
    let produced = match &m.fields {
        Some(fields) => fields
            .iter()
            .any(|c| m.rename.get(c).map_or(c.as_str(), String::as_str) == field),
        // Every column is copied: only a rename can take the field away.
        None => renamed_to_it || !m.rename.contains_key(field),
    };
    (!produced).then(|| {
        format!(
            "the copy at `{target}` must keep `{field}`, the field match_path `{}` finds parents by: every write replaces the copy with the projected row, so without it the first update orphans every parent; add the column that becomes `{field}` to fields (or its rename)",
            m.match_path.as_deref().unwrap_or_default()
        )
    })
}

/// Why Kafka would refuse `topic` as a topic name (`None`: it is valid): at most 249 characters
/// of ASCII letters, digits, `.`, `_` and `-`.
pub fn bad_topic_name(topic: &str) -> Option<String> {
    if topic.len() > 249 {
        return Some(format!(
            "{} characters, at most 249; choose a shorter `name`",
            topic.len()
        ));
    }
    let mut bad: Vec<char> = topic
        .chars()
        .filter(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        .collect();
    bad.dedup();
    (!bad.is_empty()).then(|| {
        let listed: Vec<String> = bad.iter().map(|c| format!("'{c}'")).collect();
        format!(
            "{} not allowed (only ASCII letters, digits, '.', '_' and '-'); rename the table",
            listed.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [kafka]
        bootstrap_servers = "127.0.0.1:9092"
        [schema_registry]
        url = "http://127.0.0.1:8081"
        [mysql]
        host = "127.0.0.1"
        user = "ecst"
        password = "hunter2"
        [source]
        tables = ["test.users"]
    "#;

    #[test]
    fn checked_in_connector_toml_parses_and_validates() {
        let text = include_str!("../connector.toml");
        let cfg = Config::from_toml_str(text, Vec::new()).expect("connector.toml must be valid");
        assert!(cfg.source.is_some() && cfg.sink.is_some());
    }

    #[test]
    fn the_docker_compose_connector_toml_parses_and_validates() {
        let text = include_str!("../dev/connector.docker.toml");
        Config::from_toml_str(text, Vec::new()).expect("dev/connector.docker.toml must be valid");
    }

    #[test]
    fn a_table_whose_topic_name_kafka_refuses_is_a_config_error_naming_it() {
        let text = MINIMAL.replace("[\"test.users\"]", "[\"test.users\", \"test.order$items\"]");
        let err = Config::from_toml_str(&text, Vec::new())
            .expect_err("a `$` is not allowed in a topic name")
            .to_string();
        assert!(
            err.contains("source.tables[1]") && err.contains("order$items") && err.contains("'$'"),
            "{err}"
        );
        assert_eq!(bad_topic_name("ecst.test.users"), None);
        assert!(bad_topic_name(&"x".repeat(250)).is_some());
    }

    #[test]
    fn the_kubernetes_connector_toml_validates_with_its_secret_files_and_a_probeable_listen() {
        let dir = std::env::temp_dir().join(format!("ecst-k8s-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        for (name, value) in [
            ("mysql-password", "mysql-file-secret"),
            ("kafka-password", "kafka-file-secret"),
            ("mongo-uri", "mongodb://ecst:mongo-file-secret@127.0.0.1:1/"),
        ] {
            std::fs::write(dir.join(name), format!("{value}\n")).expect("write secret");
        }
        // The manifest mounts the Secret at /run/secrets/ecst; here the files are in `dir`.
        let text = include_str!("../deploy/kubernetes/connector.toml")
            .replace("/run/secrets/ecst", &dir.display().to_string());
        let cfg = Config::from_toml_str(&text, Vec::new())
            .expect("deploy/kubernetes/connector.toml must be valid");
        assert!(cfg.source.is_some() && cfg.sink.is_some());
        let pw = cfg.mysql.as_ref().and_then(|m| m.password.as_ref());
        assert_eq!(pw.map(Secret::expose), Some("mysql-file-secret"));
        // The kubelet probes /health and /ready on the pod's IP, never on its loopback.
        let listen = &cfg.metrics.listen;
        assert!(listen.starts_with("0.0.0.0:"), "{listen}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn kafka_tls_and_scram_which_this_build_lacks_are_config_errors_naming_the_property() {
        let text = format!(
            "{MINIMAL}\n[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n"
        );
        let err = Config::from_toml_str(&text, Vec::new())
            .expect_err("TLS is not in this build")
            .to_string();
        assert!(
            err.contains("kafka.properties.\"security.protocol\"")
                && err.contains("kafka.properties.\"sasl.mechanism\"")
                && err.contains("SASL_PLAINTEXT"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_rejected_with_its_section_and_a_suggestion() {
        let text = MINIMAL.replace("tables =", "tabels = [\"x.y\"]\ntables =");
        let err = Config::from_toml_str(&text, Vec::new())
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("tabels"), "{err}");
        assert!(err.contains("did you mean `tables`?"), "{err}");
    }

    #[test]
    fn a_watermark_table_must_be_db_dot_table_and_not_a_captured_one_and_online_locking_parses() {
        let with = |v: &str| {
            MINIMAL.replace(
                "tables = [\"test.users\"]",
                &format!("tables = [\"test.users\"]\nsnapshot_locking = \"online\"\nwatermark_table = \"{v}\""),
            )
        };
        let cfg = Config::from_toml_str(&with("ops.wm"), Vec::new()).expect("valid");
        let src = cfg.source.expect("a source");
        assert_eq!(src.watermark_table.as_deref(), Some("ops.wm"));
        assert_eq!(src.snapshot_locking, SnapshotLocking::Online);
        for (bad, why) in [
            ("wm", "must be `db.table`"),
            (".wm", "must be `db.table`"),
            ("a.b.c", "must be `db.table`"),
            ("test.users", "must not be a captured table"),
        ] {
            let err = Config::from_toml_str(&with(bad), Vec::new())
                .expect_err(bad)
                .to_string();
            assert!(
                err.contains("source.watermark_table") && err.contains(why),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn message_key_columns_of_a_table_not_captured_or_with_no_column_are_refused_naming_the_table()
    {
        let ok = MINIMAL.replace(
            "tables = [\"test.users\"]",
            "tables = [\"test.users\", \"test.log\"]\nmessage_key_columns = { \"test.log\" = [\"msg\", \"n\"] }",
        );
        let cfg = Config::from_toml_str(&ok, Vec::new()).expect("parses");
        assert_eq!(
            cfg.source.map(|s| s.message_key_columns),
            Some(
                [(
                    "test.log".to_string(),
                    vec!["msg".to_string(), "n".to_string()]
                )]
                .into()
            )
        );
        let bad = MINIMAL.replace(
            "tables = [\"test.users\"]",
            "tables = [\"test.users\"]\nmessage_key_columns = { \"test.log\" = [\"msg\", \"msg\"], \"test.users\" = [] }",
        );
        let ConfigError::Invalid(issues) =
            Config::from_toml_str(&bad, Vec::new()).expect_err("must fail")
        else {
            panic!("expected Invalid")
        };
        let said: Vec<String> = issues
            .iter()
            .map(|i| format!("{}: {}", i.field, i.message))
            .collect();
        assert_eq!(
            said,
            vec![
                "source.message_key_columns.\"test.log\": names a table that is not in source.tables",
                "source.message_key_columns.\"test.log\": names `msg` twice",
                "source.message_key_columns.\"test.users\": must name at least one column",
            ]
        );
    }

    #[test]
    fn three_mistakes_give_three_messages_each_naming_its_field() {
        let text = MINIMAL
            .replace(
                "url = \"http://127.0.0.1:8081\"",
                "url = \"127.0.0.1:8081\"",
            )
            .replace(
                "tables = [\"test.users\"]",
                "tables = [\"users\"]\nsnapshot_chunk_size = 0",
            );
        let err = Config::from_toml_str(&text, Vec::new()).expect_err("must fail");
        let ConfigError::Invalid(issues) = err else {
            panic!("expected Invalid, got {err}")
        };
        let fields: Vec<&str> = issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "schema_registry.url",
                "source.tables[0]",
                "source.snapshot_chunk_size"
            ]
        );
    }

    #[test]
    fn a_transaction_timeout_outside_what_the_broker_accepts_names_the_field() {
        let cfg = Config::from_toml_str(MINIMAL, Vec::new()).expect("valid");
        assert_eq!(cfg.source.expect("source").transaction_timeout_ms, 300_000);
        for bad in ["5000", "1000000"] {
            let text = MINIMAL.replace(
                "tables = [\"test.users\"]",
                &format!("tables = [\"test.users\"]\ntransaction_timeout_ms = {bad}"),
            );
            let err = Config::from_toml_str(&text, Vec::new())
                .expect_err("must fail")
                .to_string();
            assert!(err.contains("source.transaction_timeout_ms"), "{err}");
        }
    }

    #[test]
    fn an_embedded_projection_that_drops_its_own_match_field_or_a_path_under_ecst_names_the_field()
    {
        let base = |extra: &str| {
            format!(
                "{MINIMAL}[mongo]\nuri = \"mongodb://127.0.0.1:27017\"\ndatabase = \"orders\"\n[sink]\n[[sink.mappings]]\nname = \"p\"\ntopic = \"t\"\nkind = \"embedded\"\ncollection = \"purchase_order\"\n{extra}\n"
            )
        };
        let seed = "match_path = \"product.productId\"\ntarget_path = \"product\"\nfields = [\"id\", \"description\"]\nrename = { id = \"productId\" }";
        Config::from_toml_str(&base(seed), Vec::new()).expect("the seed's product mapping");
        // All columns copied, the key column renamed to the match field: fine too; a match path
        // outside the copy is not the projection's business.
        for ok in [
            "match_path = \"product.productId\"\ntarget_path = \"product\"\nrename = { id = \"productId\" }",
            "match_path = \"user.id\"\ntarget_path = \"user\"",
            "match_path = \"user_id\"\ntarget_path = \"user\"\nfields = [\"email\"]",
        ] {
            Config::from_toml_str(&base(ok), Vec::new()).expect(ok);
        }
        for (bad, field) in [
            (
                "match_path = \"product.productId\"\ntarget_path = \"product\"\nfields = [\"description\"]\nrename = { id = \"productId\" }",
                "sink.mappings[0].fields",
            ),
            (
                "match_path = \"user.id\"\ntarget_path = \"user\"\nrename = { id = \"userId\" }",
                "sink.mappings[0].fields",
            ),
            (
                "match_path = \"user.id\"\ntarget_path = \"_ecst.user\"",
                "sink.mappings[0].target_path",
            ),
            (
                "match_path = \"user.id\"\ntarget_path = \"_id.user\"",
                "sink.mappings[0].target_path",
            ),
        ] {
            let err = Config::from_toml_str(&base(bad), Vec::new())
                .expect_err(bad)
                .to_string();
            assert!(err.contains(field), "{bad}: {err}");
        }
    }

    #[test]
    fn an_array_copy_takes_one_dollar_bracket_and_a_match_path_through_the_array_or_names_the_field()
     {
        let base = |extra: &str| {
            format!(
                "{MINIMAL}[mongo]\nuri = \"mongodb://127.0.0.1:27017\"\ndatabase = \"orders\"\n[sink]\n[[sink.mappings]]\nname = \"p\"\ntopic = \"t\"\nkind = \"embedded\"\ncollection = \"orders\"\n{extra}\n"
            )
        };
        let lines = "match_path = \"items.product.productId\"\ntarget_path = \"items.$[].product\"\nfields = [\"id\", \"description\"]\nrename = { id = \"productId\" }";
        Config::from_toml_str(&base(lines), Vec::new()).expect("an array copy");
        for (bad, field, says) in [
            (
                "match_path = \"items.product.productId\"\ntarget_path = \"items.$[].product\"\nfields = [\"description\"]",
                "sink.mappings[0].fields",
                "must keep `productId`",
            ),
            (
                "match_path = \"lines.product.id\"\ntarget_path = \"items.$[].product\"",
                "sink.mappings[0].match_path",
                "through the array",
            ),
            (
                "match_path = \"items.product.id\"\ntarget_path = \"items.$[e].product\"",
                "sink.mappings[0].target_path",
                "one `$[]`",
            ),
            (
                "match_path = \"a.b.id\"\ntarget_path = \"a.$[].b.$[].c\"",
                "sink.mappings[0].target_path",
                "nested arrays",
            ),
            (
                "match_path = \"items.id\"\ntarget_path = \"items.$[]\"",
                "sink.mappings[0].target_path",
                "between",
            ),
            (
                "match_path = \"items.$[].product.id\"\ntarget_path = \"product\"",
                "sink.mappings[0].match_path",
                "query path",
            ),
        ] {
            let err = Config::from_toml_str(&base(bad), Vec::new())
                .expect_err(bad)
                .to_string();
            assert!(err.contains(field) && err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_document_mapping_sharing_its_collection_with_another_mapping_names_the_field() {
        let sink = "[mongo]\nuri = \"mongodb://127.0.0.1:27017\"\ndatabase = \"orders\"\n[sink]\n[[sink.mappings]]\nname = \"u\"\ntopic = \"t\"\nkind = \"document\"\ncollection = \"users\"\n";
        let embedded = "[[sink.mappings]]\nname = \"a\"\ntopic = \"t2\"\nkind = \"embedded\"\ncollection = \"C\"\nmatch_path = \"address.id\"\ntarget_path = \"address\"\n";
        let apart = format!("{MINIMAL}{sink}{}", embedded.replace('C', "orders"));
        Config::from_toml_str(&apart, Vec::new()).expect("collections of their own");
        let shared = format!("{MINIMAL}{sink}{}", embedded.replace('C', "users"));
        let err = Config::from_toml_str(&shared, Vec::new())
            .expect_err("must fail")
            .to_string();
        assert!(
            err.contains("sink.mappings[1].collection")
                && err.contains("mapping `u`")
                && !err.contains("sink.mappings[0].collection"),
            "one message, on the later mapping: {err}"
        );
    }

    #[test]
    fn sink_batch_bounds_default_large_and_zero_names_the_field() {
        let sink = "[mongo]\nuri = \"mongodb://127.0.0.1:27017\"\ndatabase = \"orders\"\n[sink]\n[[sink.mappings]]\nname = \"u\"\ntopic = \"t\"\nkind = \"document\"\ncollection = \"users\"\n";
        let cfg = Config::from_toml_str(&format!("{MINIMAL}{sink}"), Vec::new())
            .expect("sink config with defaults");
        let s = cfg.sink.expect("sink");
        assert_eq!(
            (s.batch_size, s.batch_max_bytes),
            (10_000, 32 * 1024 * 1024)
        );
        let bad = sink.replace("[sink]\n", "[sink]\nbatch_max_bytes = 0\n");
        let err = Config::from_toml_str(&format!("{MINIMAL}{bad}"), Vec::new())
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("sink.batch_max_bytes"), "{err}");
    }

    #[test]
    fn secrets_are_read_from_files_never_printed_and_a_missing_file_names_its_field() {
        let dir = std::env::temp_dir().join(format!("ecst-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let write = |name: &str, value: &str| {
            let p = dir.join(name);
            std::fs::write(&p, format!("{value}\n")).expect("write secret");
            p.display().to_string()
        };
        let reg = write("registry", "reg-file-secret");
        let kafka = write("kafka", "kafka-file-secret");
        let mongo = write("mongo", "mongodb://u:mongo-file-secret@127.0.0.1:1/");
        let text = format!(
            r#"
            [kafka]
            bootstrap_servers = "127.0.0.1:9092"
            secret_files = {{ "sasl.password" = "{kafka}" }}
            [schema_registry]
            url = "http://127.0.0.1:8081"
            username = "u"
            password_file = "{reg}"
            [mongo]
            uri_file = "{mongo}"
            database = "orders"
            [sink]
            [[sink.mappings]]
            name = "m"
            topic = "t"
            kind = "document"
            collection = "c"
            "#
        );
        let cfg = Config::from_toml_str(&text, Vec::new()).expect("valid");
        assert_eq!(
            cfg.schema_registry.password.as_ref().map(Secret::expose),
            Some("reg-file-secret")
        );
        assert_eq!(
            cfg.kafka
                .properties
                .get("sasl.password")
                .map(String::as_str),
            Some("kafka-file-secret")
        );
        assert!(
            cfg.mongo
                .as_ref()
                .is_some_and(|m| m.uri.expose().contains("mongo-file-secret"))
        );
        let shown = cfg.redacted();
        assert!(!shown.contains("file-secret"), "{shown}");

        let broken = text.replace(&reg, "/nonexistent/registry-password");
        let Err(ConfigError::Invalid(issues)) = Config::from_toml_str(&broken, Vec::new()) else {
            panic!("an unreadable secret file must be an error");
        };
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].field, "schema_registry.password_file");
        assert!(issues[0].message.contains("/nonexistent/registry-password"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn environment_overrides_a_field_and_secrets_never_print() {
        let env = vec![(
            "ECST__MYSQL__PASSWORD".to_string(),
            "from-env-secret".to_string(),
        )];
        let cfg = Config::from_toml_str(MINIMAL, env).expect("valid");
        let pw = cfg
            .mysql
            .as_ref()
            .and_then(|m| m.password.as_ref())
            .map(Secret::expose);
        assert_eq!(pw, Some("from-env-secret"));
        let shown = cfg.redacted();
        assert!(
            !shown.contains("from-env-secret") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
