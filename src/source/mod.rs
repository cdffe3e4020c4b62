//! The source half: MySQL/MariaDB binlog → Avro change events in Kafka, exactly once.
//!
//! ```text
//!  snapshot / binlog reader ──(bounded mpsc of SourceMsg)──▶ producer loop ──▶ Kafka (transactional)
//! ```
//!
//! **Positions and exactly-once.** The reader emits row changes as it decodes them and a
//! [`SourceMsg::Commit`] at every transaction boundary of the source. The producer loop writes the
//! changes inside an open Kafka transaction and, at a boundary, writes the [`SourceOffset`] to the
//! offsets topic *in the same Kafka transaction* and commits it: at once when caught up (no
//! input waiting), else every `commit_interval_ms` or longer if commits are slow, so many MySQL
//! transactions share one Kafka transaction (group commit). A `read_committed` consumer therefore
//! sees each change exactly once: after `kill -9` the open Kafka transaction is aborted (by the
//! restarted producer's `init_transactions`, which also fences any zombie instance with the same
//! `name`), and reading resumes from the last committed offset.
//!
//! **Failures.** Every error is classed (see [`SourceError::class`]). Transient ones (MySQL down,
//! stream stalled, Kafka or registry unavailable) abort the open Kafka transaction and restart the
//! session after a backoff from the last committed offset; nothing is held in memory across a
//! restart except that offset. Definite ones (bad settings, purged position with
//! `snapshot_mode = "initial"`, a schema the registry refuses, being fenced) stop the source with
//! one clear message.
//!
//! **Backpressure.** The channel is bounded (`source.channel_capacity`) and the producer waits
//! when librdkafka's queue is full, so a Kafka or registry outage pauses the reader with bounded
//! memory.

pub mod binlog;
pub mod decode;
pub mod preflight;
pub mod snapshot;
pub mod table_map;
pub mod window;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::{Config, MysqlConfig, SnapshotMode, SourceConfig, TlsMode};
use crate::error::{Classify, ErrorClass};
use crate::events::avro::{AvroError, TableAvro, encode_envelope, encode_key};
use crate::events::registry::{Registry, RegistryError, frame_into};
use crate::events::{
    ChangeEvent, HEADER_EPOCH, HEADER_NEW_KEY, HEADER_OLD_KEY, HEADER_READ_TS, HEADER_SOURCE_TS,
    Op, TableSchema, Value,
};
use crate::kafka::{KafkaClientError, MAX_MESSAGE_BYTES, TopicSpec, client_config, ensure_topics};
use crate::metrics::{self as m, Readiness};
use crate::offsets::{self, BinlogPosition, SnapshotSegment, SourceOffset};
use crate::retry::{RetryLoop, Verdict};
use crate::shutdown::ShutdownRx;
use window::Window;

/// Errors of the source half.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// MySQL protocol or connection error.
    #[error("mysql: {0}")]
    Mysql(#[from] mysql_async::Error),
    /// Connecting took longer than `mysql.connect_timeout_ms`.
    #[error("mysql: connect to {host}:{port} timed out")]
    ConnectTimeout {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// No event (not even a heartbeat) for too long.
    #[error("binlog stream silent for {silent_ms} ms (no heartbeat); reconnecting")]
    Stalled {
        /// Silence that triggered the watchdog.
        silent_ms: u64,
    },
    /// The server closed the stream.
    #[error("binlog stream ended by the server")]
    StreamEnded,
    /// An event failed its CRC32 check.
    #[error("binlog event at {file}:{pos} failed its CRC32 check")]
    Checksum {
        /// File.
        file: String,
        /// End position of the event.
        pos: u64,
    },
    /// A TABLE_MAP event could not be understood.
    #[error("table map of `{table}`: {detail}")]
    TableMap {
        /// Table.
        table: String,
        /// Detail.
        detail: String,
    },
    /// TABLE_MAP lacks column names: the server does not log full row metadata.
    #[error(
        "binlog for `{table}` has no column names: set binlog_row_metadata = FULL on the server"
    )]
    MissingRowMetadata {
        /// Table.
        table: String,
    },
    /// A column type ecst does not map.
    #[error("table `{table}` column `{column}`: unsupported type {detail}")]
    UnsupportedType {
        /// Table.
        table: String,
        /// Column.
        column: String,
        /// The type.
        detail: String,
    },
    /// A value that does not fit its column.
    #[error("column `{column}`: unexpected value {detail}")]
    ValueType {
        /// Column.
        column: String,
        /// Detail.
        detail: String,
    },
    /// A rows event could not be decoded.
    #[error("rows of `{table}`: {detail}")]
    RowDecode {
        /// Table.
        table: String,
        /// Detail.
        detail: String,
    },
    /// A row image without every column: the writing session did not log full rows.
    #[error(
        "the binlog row of `{table}` at {position} lacks columns {} in its {image} image: the writing session used binlog_row_image = MINIMAL or NOBLOB (preflight sees only the global setting), and a partial row is never published as a full one. Fix: make every writer log FULL images (remove the session override; SET GLOBAL binlog_row_image = FULL), then re-snapshot once (snapshot_mode = \"always\") to step past this event", .missing.join(", ")
    )]
    PartialRowImage {
        /// Table.
        table: String,
        /// `before` or `after`.
        image: &'static str,
        /// The absent columns.
        missing: Vec<String>,
        /// Where (its transaction's start).
        position: BinlogPosition,
    },
    /// Statement-format DML on a captured table: the binlog holds the statement, not the rows.
    #[error(
        "statement-format DML on `{table}` at {position}: a session wrote with binlog_format = STATEMENT or MIXED, so the binlog holds no rows for it and the change cannot be captured. Fix: binlog_format = ROW for every writer (remove the session override), then re-snapshot once (snapshot_mode = \"always\")"
    )]
    StatementDml {
        /// Table.
        table: String,
        /// Where.
        position: BinlogPosition,
    },
    /// A binlog event ecst does not decode (refused, never skipped).
    #[error("the binlog at {position} holds {what}, which ecst does not decode; fix: {fix}")]
    Unsupported {
        /// What the event is.
        what: String,
        /// How to get past it.
        fix: String,
        /// Where.
        position: BinlogPosition,
    },
    /// A configured table does not exist.
    #[error("table `{table}` does not exist or is not readable")]
    TableNotFound {
        /// Table.
        table: String,
    },
    /// MySQL's global read lock for the snapshot's position could not be taken in time.
    #[error(
        "snapshot: FLUSH TABLES WITH READ LOCK not granted within {seconds} s ({detail}); a long-running query or lock holds it. The snapshot retries; raise source.snapshot_lock_wait_s, or end the blocking query (SHOW PROCESSLIST)"
    )]
    SnapshotLock {
        /// The bound waited.
        seconds: u64,
        /// The server's answer.
        detail: String,
    },
    /// The server reported no binlog position (binary logging off?).
    #[error("the server reports no binlog position: is log_bin enabled?")]
    NoBinlogPosition,
    /// Preflight failures, all of them.
    #[error("preflight failed:\n{}", .0.iter().map(|c| format!("  - {}: {}", c.name, c.detail)).collect::<Vec<_>>().join("\n"))]
    Preflight(Vec<preflight::Check>),
    /// The stored position is gone and the snapshot mode does not allow a new snapshot.
    #[error(
        "stored position {position} was purged from the server; set source.snapshot_mode = \"when_needed\" to re-snapshot, or reset the offsets topic"
    )]
    Purged {
        /// The stored position.
        position: BinlogPosition,
    },
    /// The stored position was written by another server and the snapshot mode does not allow a
    /// new snapshot.
    #[error(
        "the stored position {position} was written by another server ({why}): a failover, a restore or mysql.host pointed elsewhere. Its byte offsets mean nothing on this server; set source.snapshot_mode = \"when_needed\" to re-snapshot in a new epoch (copies keep updating), or point mysql.host back"
    )]
    ForeignPosition {
        /// The stored position.
        position: BinlogPosition,
        /// Which identity differs.
        why: String,
    },
    /// The registry refused a new schema version.
    #[error(
        "schema change of `{table}` refused by the registry ({columns}); the source stopped before that change, nothing after it is lost. Under the registry's default BACKWARD compatibility a new NOT NULL column needs a constant DEFAULT (numbers, booleans, strings; not an expression or a temporal value). Fix: give the column such a default or make it NULL, or relax the subject's compatibility. Registry: {detail}"
    )]
    SchemaRefused {
        /// Table.
        table: String,
        /// Column-level summary of the change.
        columns: String,
        /// Registry message.
        detail: String,
    },
    /// Registry errors other than refusal.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Avro encoding failed.
    #[error(transparent)]
    Avro(#[from] AvroError),
    /// Kafka errors.
    #[error(transparent)]
    Kafka(#[from] KafkaClientError),
    /// The stored offset could not be read.
    #[error("offsets topic `{topic}`: {detail}")]
    Offsets {
        /// Topic.
        topic: String,
        /// Detail.
        detail: String,
    },
    /// The reader task ended because the producer side went away (shutdown or error).
    #[error("internal channel closed")]
    ChannelClosed,
    /// A task panicked or was cancelled.
    #[error("source task failed: {0}")]
    Task(String),
}

impl From<KafkaError> for SourceError {
    fn from(e: KafkaError) -> Self {
        SourceError::Kafka(KafkaClientError::Broker(e))
    }
}

impl Classify for SourceError {
    fn class(&self) -> ErrorClass {
        use SourceError as E;
        match self {
            E::Mysql(e) => match e {
                mysql_async::Error::Server(s)
                    if matches!(s.code, 1045 | 1044 | 1142 | 1227 | 1236 | 4052) =>
                {
                    ErrorClass::Definite
                }
                // A certificate the CA does not vouch for, a bad CA file: retrying cannot help.
                mysql_async::Error::Io(mysql_async::IoError::Tls(_)) => ErrorClass::Definite,
                mysql_async::Error::Io(mysql_async::IoError::Io(io))
                    if io
                        .get_ref()
                        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) =>
                {
                    ErrorClass::Definite
                }
                _ => ErrorClass::Transient,
            },
            E::ConnectTimeout { .. }
            | E::Stalled { .. }
            | E::StreamEnded
            | E::Checksum { .. }
            | E::ChannelClosed
            | E::SnapshotLock { .. }
            | E::Offsets { .. } => ErrorClass::Transient,
            E::Registry(e) => e.class(),
            E::Kafka(e) => e.class(),
            E::TableMap { .. }
            | E::MissingRowMetadata { .. }
            | E::UnsupportedType { .. }
            | E::ValueType { .. }
            | E::RowDecode { .. }
            | E::PartialRowImage { .. }
            | E::StatementDml { .. }
            | E::Unsupported { .. }
            | E::TableNotFound { .. }
            | E::NoBinlogPosition
            | E::Preflight(_)
            | E::Purged { .. }
            | E::ForeignPosition { .. }
            | E::SchemaRefused { .. }
            | E::Avro(_)
            | E::Task(_) => ErrorClass::Definite,
        }
    }

    fn kind(&self) -> String {
        use SourceError as E;
        match self {
            E::Mysql(mysql_async::Error::Server(s)) => format!("mysql_{}", s.code),
            E::Mysql(mysql_async::Error::Io(_)) => "mysql_io".into(),
            E::Mysql(_) => "mysql".into(),
            E::ConnectTimeout { .. } => "mysql_connect_timeout".into(),
            E::Stalled { .. } => "binlog_stalled".into(),
            E::StreamEnded => "binlog_ended".into(),
            E::Checksum { .. } => "binlog_checksum".into(),
            E::SnapshotLock { .. } => "snapshot_lock".into(),
            E::Registry(_) => "registry".into(),
            E::Kafka(_) => "kafka".into(),
            E::Offsets { .. } => "offsets_topic".into(),
            E::ChannelClosed => "channel_closed".into(),
            _ => "source".into(),
        }
    }

    fn hint(&self) -> &'static str {
        use SourceError as E;
        match self {
            E::Mysql(_) | E::ConnectTimeout { .. } | E::Stalled { .. } | E::StreamEnded => {
                "that MySQL at mysql.host:mysql.port is up and reachable, accepts the ecst user (grants, max_connections), and that no network device drops idle connections"
            }
            E::SnapshotLock { .. } => {
                "long-running queries or LOCK TABLES sessions on MySQL (SHOW PROCESSLIST)"
            }
            E::Registry(_) => "that the schema registry at schema_registry.url is up",
            E::Kafka(_) | E::Offsets { .. } => {
                "that the Kafka brokers in kafka.bootstrap_servers are up and the offsets topic is available"
            }
            _ => "the error above",
        }
    }
}

/// Messages the hand-over holds at most (commits and batches alike); rows are bounded
/// separately by [`Outbox`]'s permits.
const CHANNEL_MESSAGES: usize = 1024;

/// The reader's end of the hand-over to the producer loop. A message carries a whole rows
/// event or snapshot chunk, so a message count alone would not bound memory: sending a batch
/// first takes one permit per row (`source.channel_capacity` in all), and the producer loop
/// returns them once the rows are handed to Kafka.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<SourceMsg>,
    rows: Arc<tokio::sync::Semaphore>,
    capacity: u32,
}

impl Outbox {
    /// A hand-over bounded to `capacity` buffered rows, and the producer loop's end.
    fn new(capacity: usize) -> (Outbox, Inbox) {
        let (tx, rx) = mpsc::channel(CHANNEL_MESSAGES);
        let capacity = u32::try_from(capacity.max(1)).unwrap_or(u32::MAX);
        let rows = Arc::new(tokio::sync::Semaphore::new(capacity as usize));
        let inbox = Inbox {
            rx,
            rows: rows.clone(),
            capacity,
        };
        (Outbox { tx, rows, capacity }, inbox)
    }

    /// Sends `msg`, waiting while the producer loop holds `channel_capacity` rows.
    pub async fn send(&self, msg: SourceMsg) -> Result<(), SourceError> {
        if let SourceMsg::Changes(evs) = &msg {
            let n = permits_for(evs.len(), self.capacity);
            self.rows
                .acquire_many(n)
                .await
                .map_err(|_| SourceError::ChannelClosed)?
                .forget();
        }
        self.tx
            .send(msg)
            .await
            .map_err(|_| SourceError::ChannelClosed)
    }
}

/// The producer loop's end of the hand-over.
struct Inbox {
    rx: mpsc::Receiver<SourceMsg>,
    rows: Arc<tokio::sync::Semaphore>,
    capacity: u32,
}

impl Inbox {
    /// Returns the permits of a batch of `rows` rows once they are handed to Kafka.
    fn release(&self, rows: usize) {
        self.rows
            .add_permits(permits_for(rows, self.capacity) as usize);
    }
}

/// Permits a batch takes: one per row, at most the whole capacity (a larger batch goes alone).
fn permits_for(rows: usize, capacity: u32) -> u32 {
    u32::try_from(rows).unwrap_or(u32::MAX).clamp(1, capacity)
}

/// What the reader hands to the producer loop.
#[derive(Debug)]
pub enum SourceMsg {
    /// Row changes in source order (one rows event, or one snapshot chunk).
    Changes(Vec<ChangeEvent>),
    /// A source transaction boundary: everything before it is complete.
    Commit {
        /// Resume position after this transaction.
        position: BinlogPosition,
        /// Its GTID, if known.
        gtid: Option<String>,
        /// Its commit time (ms), 0 if unknown.
        ts_ms: i64,
    },
    /// A snapshot chunk boundary: everything sent before it is covered by these segments.
    SnapshotProgress(Vec<SnapshotSegment>),
    /// The snapshot finished; streaming starts at the first segment's position.
    SnapshotDone {
        /// Every segment of the snapshot (more than one if it was resumed).
        segments: Vec<SnapshotSegment>,
    },
}

/// Opens a MySQL connection per config, within the connect timeout.
pub async fn connect(cfg: &MysqlConfig) -> Result<mysql_async::Conn, SourceError> {
    let mut opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(cfg.host.clone())
        .tcp_port(cfg.port)
        .user(Some(cfg.user.clone()))
        .pass(cfg.password.as_ref().map(|p| p.expose().to_string()))
        .prefer_socket(false);
    if cfg.tls == TlsMode::Required {
        let mut ssl = mysql_async::SslOpts::default();
        if let Some(ca) = &cfg.ca_file {
            ssl = ssl.with_root_certs(vec![std::path::PathBuf::from(ca).into()]);
        }
        opts = opts.ssl_opts(ssl);
    }
    let fut = mysql_async::Conn::new(opts);
    match tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms), fut).await {
        Ok(conn) => Ok(conn?),
        Err(_) => Err(SourceError::ConnectTimeout {
            host: cfg.host.clone(),
            port: cfg.port,
        }),
    }
}

/// How long reading the offsets topic may go without any progress before it is an error
/// (a broker that answers nothing); a large topic that keeps delivering takes as long as it takes.
const OFFSETS_STALL: Duration = Duration::from_secs(60);

/// Reads the last committed offset of `name` from the offsets topic (read_committed).
///
/// It reads up to the end of the partition as the broker reports it (`enable.partition.eof`),
/// which counts the records a `read_committed` consumer never delivers (aborted transactions,
/// commit markers): no idle heuristic that a slow fetch could fool, and no fixed deadline that
/// a large topic could exceed. Our own `init_transactions` has already aborted anything still
/// open, so the end of the partition is final.
pub async fn load_offset(cfg: &Config, topic: &str) -> Result<Option<SourceOffset>, SourceError> {
    let mut cc = client_config(&cfg.kafka);
    cc.set("group.id", format!("{}-offsets-reader", cfg.name))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest");
    let name = cfg.name.clone();
    let topic = topic.to_string();
    let t = topic.clone();
    let res = tokio::task::spawn_blocking(move || -> Result<Option<SourceOffset>, String> {
        let consumer: BaseConsumer = cc.create().map_err(|e| e.to_string())?;
        let (low, high) = consumer
            .fetch_watermarks(&t, 0, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        if high <= low {
            return Ok(None);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&t, 0, Offset::Beginning)
            .map_err(|e| e.to_string())?;
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let mut last = None;
        let mut progress_at = Instant::now();
        loop {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(msg)) => {
                    progress_at = Instant::now();
                    if msg.key() == Some(name.as_bytes())
                        && let Some(payload) = msg.payload()
                    {
                        last = Some(SourceOffset::from_bytes(payload).map_err(|e| e.to_string())?);
                    }
                }
                // The end of the partition as of this fetch: everything committed is read.
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(e.to_string()),
                None if progress_at.elapsed() > OFFSETS_STALL => {
                    return Err(format!(
                        "no progress reading the offsets topic for {} s",
                        OFFSETS_STALL.as_secs()
                    ));
                }
                None => {}
            }
        }
        Ok(last)
    })
    .await
    .map_err(|e| SourceError::Task(e.to_string()))?;
    res.map_err(|detail| SourceError::Offsets { topic, detail })
}

struct TableState {
    topic: String,
    key_id: u32,
    value_id: u32,
}

fn describe_change(old: Option<&TableSchema>, new: &TableSchema) -> String {
    let Some(old) = old else {
        return format!(
            "columns: {}",
            new.columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let mut parts = Vec::new();
    for c in &new.columns {
        match old.columns.iter().find(|o| o.name == c.name) {
            None => parts.push(format!(
                "added column `{}`{}",
                c.name,
                if c.nullable {
                    ""
                } else {
                    " NOT NULL with no constant default"
                }
            )),
            Some(o) if o != c => parts.push(format!(
                "changed column `{}` from {:?} to {:?}",
                c.name, o.kind, c.kind
            )),
            Some(_) => {}
        }
    }
    for o in &old.columns {
        if !new.columns.iter().any(|c| c.name == o.name) {
            parts.push(format!("dropped column `{}`", o.name));
        }
    }
    parts.join("; ")
}

/// The timing headers of a change: source commit time and the time ecst read it.
fn timing_headers(ev: &ChangeEvent) -> OwnedHeaders {
    let source_ts = ev.source.ts_ms.to_string();
    let read_ts = ev.source.read_ts_ms.to_string();
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: HEADER_SOURCE_TS,
            value: Some(source_ts.as_bytes()),
        })
        .insert(Header {
            key: HEADER_READ_TS,
            value: Some(read_ts.as_bytes()),
        });
    if ev.source.epoch == 0 {
        return headers;
    }
    let epoch = ev.source.epoch.to_string();
    headers.insert(Header {
        key: HEADER_EPOCH,
        value: Some(epoch.as_bytes()),
    })
}

/// The transactional producer. Per-record delivery reports are not awaited (no future or
/// channel per record): librdkafka fails `commit_transaction` if any record of the transaction
/// failed, which is where the source learns of it and re-reads the whole transaction.
type TxProducer = Arc<ThreadedProducer<DefaultProducerContext>>;

/// The producer side: encodes, registers schemas, produces in Kafka transactions.
struct Publisher {
    cfg: Arc<Config>,
    producer: TxProducer,
    registry: Registry,
    states: HashMap<usize, (Arc<TableSchema>, Arc<TableState>)>,
    last_shapes: HashMap<String, Arc<TableSchema>>,
    open: bool,
    key_buf: Vec<u8>,
    val_buf: Vec<u8>,
    datum: Vec<u8>,
    events_since_commit: u64,
    /// How long the last commit took (it sizes the next transaction, see [`pump`]).
    last_commit_took: Duration,
    /// Events per topic since the last commit (metrics are emitted per commit, not per row).
    counts: HashMap<String, u64>,
}

impl Publisher {
    async fn state_for(
        &mut self,
        schema: &Arc<TableSchema>,
    ) -> Result<Arc<TableState>, SourceError> {
        let ptr = Arc::as_ptr(schema) as usize;
        if let Some((_, st)) = self.states.get(&ptr) {
            return Ok(st.clone());
        }
        let topic = self.cfg.topic_for(&schema.db, &schema.table);
        let avro = TableAvro::derive(&self.cfg.name, schema)?;
        let qn = schema.qualified_name();
        let reg = async {
            let key_id = self
                .registry
                .register(&format!("{topic}-key"), &avro.key_json)
                .await?;
            let value_id = self
                .registry
                .register(&format!("{topic}-value"), &avro.value_json)
                .await?;
            Ok::<_, RegistryError>((key_id, value_id))
        };
        let (key_id, value_id) = match reg.await {
            Ok(ids) => ids,
            Err(RegistryError::Refused { detail, .. }) => {
                return Err(SourceError::SchemaRefused {
                    table: qn.clone(),
                    columns: describe_change(self.last_shapes.get(&qn).map(|s| s.as_ref()), schema),
                    detail,
                });
            }
            Err(e) => return Err(e.into()),
        };
        if self
            .last_shapes
            .get(&qn)
            .is_some_and(|old| old.as_ref() != schema.as_ref())
        {
            tracing::info!(table = %qn, value_schema_id = value_id, "table shape changed, new schema registered");
        }
        self.last_shapes.insert(qn, schema.clone());
        let st = Arc::new(TableState {
            topic,
            key_id,
            value_id,
        });
        self.states.insert(ptr, (schema.clone(), st.clone()));
        Ok(st)
    }

    fn begin(&mut self) -> Result<(), SourceError> {
        if !self.open {
            self.producer
                .begin_transaction()
                .map_err(|e| self.explain(e))?;
            self.open = true;
        }
        Ok(())
    }

    /// Produces one record, waiting while librdkafka's queue is full (backpressure).
    async fn produce(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<(), SourceError> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        loop {
            match self.producer.send(record) {
                // Delivery failures surface at commit_transaction, which then fails as a whole.
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => return Err(self.explain(e)),
            }
        }
    }

    /// Replaces librdkafka's bare "Fatal error" by the fatal error it stands for (fencing, …).
    fn explain(&self, e: KafkaError) -> SourceError {
        let fatal = e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal)
            || matches!(&e, KafkaError::Transaction(t) if t.is_fatal());
        match self.producer.client().fatal_error() {
            Some((_, reason)) if fatal => SourceError::Kafka(KafkaClientError::Fatal { reason }),
            _ => e.into(),
        }
    }

    async fn publish(&mut self, ev: ChangeEvent) -> Result<(), SourceError> {
        self.begin()?;
        let st = self.state_for(&ev.schema).await?;
        let now_ms = crate::events::now_ms();
        let key_changed = ev.op == Op::Update
            && match (&ev.before, &ev.after) {
                (Some(b), Some(a)) => ev.schema.key_of(b) != ev.schema.key_of(a),
                _ => false,
            };
        if key_changed {
            // As Debezium: delete(old key) + tombstone, then create(new key), linked by headers.
            let old_key = ev.schema.key_of(ev.before.as_deref().unwrap_or_default());
            let new_key = ev.schema.key_of(ev.after.as_deref().unwrap_or_default());
            let del = ChangeEvent {
                op: Op::Delete,
                after: None,
                ..ev.clone()
            };
            let create = ChangeEvent {
                op: Op::Create,
                before: None,
                ..ev
            };
            // The other key travels as the key itself does: Avro with the key schema, framed
            // (as Debezium's AvroConverter writes these headers). JSON lost the type of
            // DECIMAL, BIGINT UNSIGNED, DATE or BINARY keys, and the sink matched nothing.
            let new_key_bytes = self.framed_key(&st, &del.schema, &new_key)?;
            let h = timing_headers(&del).insert(Header {
                key: HEADER_NEW_KEY,
                value: Some(new_key_bytes.as_slice()),
            });
            self.write_one(&st, &del, now_ms, h, true).await?;
            let old_key_bytes = self.framed_key(&st, &create.schema, &old_key)?;
            let h = timing_headers(&create).insert(Header {
                key: HEADER_OLD_KEY,
                value: Some(old_key_bytes.as_slice()),
            });
            self.write_one(&st, &create, now_ms, h, false).await?;
        } else {
            let tomb = ev.op == Op::Delete;
            self.write_one(&st, &ev, now_ms, timing_headers(&ev), tomb)
                .await?;
        }
        *self.counts.entry(st.topic.clone()).or_default() += 1;
        Ok(())
    }

    /// A key encoded and framed as the record keys are.
    fn framed_key(
        &mut self,
        st: &TableState,
        schema: &TableSchema,
        key: &[Value],
    ) -> Result<Vec<u8>, SourceError> {
        self.datum.clear();
        encode_key(&mut self.datum, schema, key)?;
        let mut out = Vec::with_capacity(self.datum.len() + 5);
        frame_into(&mut out, st.key_id, &self.datum);
        Ok(out)
    }

    async fn write_one(
        &mut self,
        st: &TableState,
        ev: &ChangeEvent,
        now_ms: i64,
        headers: OwnedHeaders,
        tombstone_after: bool,
    ) -> Result<(), SourceError> {
        // A table without a primary key has no key to give, and a TRUNCATE is about no row: a
        // null Kafka key, as Debezium sends (a zero-field key record is 5 bytes, which
        // Confluent's deserializers refuse), and no tombstone (compaction has nothing to
        // compact by).
        let keyless = ev.schema.key.is_empty() || ev.op == Op::Truncate;
        self.key_buf.clear();
        self.datum.clear();
        if !keyless {
            encode_key(&mut self.datum, &ev.schema, &ev.key())?;
            frame_into(&mut self.key_buf, st.key_id, &self.datum);
        }
        self.datum.clear();
        self.val_buf.clear();
        encode_envelope(&mut self.datum, &self.cfg.name, ev, now_ms)?;
        frame_into(&mut self.val_buf, st.value_id, &self.datum);
        let key = std::mem::take(&mut self.key_buf);
        let val = std::mem::take(&mut self.val_buf);
        let record_key = (!keyless).then_some(key.as_slice());
        self.produce(&st.topic, record_key, Some(&val), headers.clone())
            .await?;
        let tombstones = self
            .cfg
            .source
            .as_ref()
            .is_some_and(|s| s.tombstones_on_delete);
        if tombstone_after && tombstones && !keyless {
            self.produce(&st.topic, record_key, None, headers).await?;
        }
        self.key_buf = key;
        self.val_buf = val;
        self.events_since_commit += 1;
        Ok(())
    }

    /// Writes `offset` and commits the open transaction (opening one if needed).
    async fn commit(&mut self, offset: &SourceOffset) -> Result<(), SourceError> {
        self.begin()?;
        let topic = self.cfg.offsets_topic();
        let bytes = offset.to_bytes();
        self.produce(
            &topic,
            Some(self.cfg.name.as_bytes()),
            Some(&bytes),
            OwnedHeaders::new(),
        )
        .await?;
        let started = Instant::now();
        // rdkafka's commit_transaction flushes first, and its flush polls in whole 100 ms
        // rounds whenever anything is still in flight: every commit took >= 100 ms
        // (ecst_source_commit_seconds). Waiting for the acknowledgements here, in 1 ms steps,
        // lets that flush find nothing to do.
        while self.producer.in_flight_count() > 0 && started.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let p = self.producer.clone();
        tokio::task::spawn_blocking(move || p.commit_transaction(Duration::from_secs(60)))
            .await
            .map_err(|e| SourceError::Task(e.to_string()))?
            .map_err(|e| self.explain(e))?;
        self.last_commit_took = started.elapsed();
        metrics::histogram!(m::SOURCE_COMMIT_SECONDS).record(self.last_commit_took.as_secs_f64());
        self.open = false;
        self.events_since_commit = 0;
        metrics::counter!(m::SOURCE_TRANSACTIONS_TOTAL).increment(1);
        for (topic, n) in self.counts.drain() {
            metrics::counter!(m::SOURCE_EVENTS_TOTAL, m::TABLE_LABEL => topic).increment(n);
        }
        metrics::gauge!(m::SOURCE_BINLOG_POS).set(offset.position.pos as f64);
        if let Some(seq) = offset.position.file_seq() {
            metrics::gauge!(m::SOURCE_BINLOG_FILE).set(seq as f64);
        }
        Ok(())
    }

    async fn abort(&mut self) {
        if !self.open {
            return;
        }
        let p = self.producer.clone();
        match tokio::task::spawn_blocking(move || p.abort_transaction(Duration::from_secs(30)))
            .await
        {
            Ok(Ok(())) => tracing::info!("open kafka transaction aborted"),
            Ok(Err(e)) => tracing::warn!(error = %e, "abort of the open kafka transaction failed"),
            Err(e) => tracing::warn!(error = %e, "abort task failed"),
        }
        self.open = false;
    }
}

/// Creates the transactional producer and fences older instances with the same name.
async fn transactional_producer(cfg: &Config) -> Result<TxProducer, SourceError> {
    let mut cc = client_config(&cfg.kafka);
    cc.set("transactional.id", format!("ecst-source-{}", cfg.name))
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string())
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("transaction.timeout.ms", "300000")
        .set("queue.buffering.max.kbytes", "65536");
    let producer: TxProducer = Arc::new(
        cc.create()
            .map_err(|e| SourceError::Kafka(KafkaClientError::Config(e)))?,
    );
    let p = producer.clone();
    tokio::task::spawn_blocking(move || p.init_transactions(Duration::from_secs(30)))
        .await
        .map_err(|e| SourceError::Task(e.to_string()))??;
    Ok(producer)
}

/// Runs the source until shutdown or a definite error.
pub async fn run(
    cfg: Arc<Config>,
    registry: Registry,
    mut shutdown: ShutdownRx,
    readiness: Arc<Readiness>,
) -> Result<(), SourceError> {
    let (Some(src), Some(mysql)) = (cfg.source.clone(), cfg.mysql.clone()) else {
        return Ok(());
    };
    let mut retry = RetryLoop::new(
        "source",
        Duration::from_millis(500),
        Duration::from_secs(30),
        cfg.max_retry_duration_ms,
        readiness.clone(),
    );
    let mut first = true;
    let mut publisher: Option<Publisher> = None;
    let mut committed: Option<SourceOffset> = None;
    loop {
        if shutdown.is_triggered() {
            return Ok(());
        }
        let res = session(
            &cfg,
            &src,
            &mysql,
            &registry,
            &mut publisher,
            &mut committed,
            first,
            shutdown.clone(),
            &readiness,
            &mut retry,
        )
        .await;
        readiness.source_ready.store(false, Ordering::Relaxed);
        if let Some(p) = publisher.as_mut() {
            p.abort().await;
        }
        match res {
            Ok(()) => return Ok(()),
            Err(e) if e.class() == ErrorClass::Transient => {
                metrics::counter!(m::SOURCE_RESTARTS_TOTAL).increment(1);
                let Verdict::RetryIn(delay) = retry.failed(
                    "source interrupted, will resume from the last committed position",
                    &e,
                ) else {
                    return Err(e);
                };
                // A fenced or broken producer must be recreated; a fresh one also aborts leftovers.
                if matches!(&e, SourceError::Kafka(_)) {
                    publisher = None;
                }
                tokio::select! {
                    () = shutdown.wait() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => {
                if let SourceError::Kafka(k) = &e {
                    let fenced = e.to_string().to_lowercase().contains("fenced")
                        || matches!(k, KafkaClientError::Broker(ke) if ke.rdkafka_error_code() == Some(RDKafkaErrorCode::ProducerFenced));
                    if fenced {
                        tracing::error!(error = %e, "source stopped: another instance with the same name took over (fenced)");
                    } else {
                        tracing::error!(error = %e, "source stopped: kafka refused definitively");
                    }
                } else {
                    tracing::error!(error = %e, kind = e.kind(), "source stopped");
                }
                return Err(e);
            }
        }
        first = false;
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    cfg: &Arc<Config>,
    src: &SourceConfig,
    mysql: &MysqlConfig,
    registry: &Registry,
    publisher: &mut Option<Publisher>,
    committed: &mut Option<SourceOffset>,
    first: bool,
    mut shutdown: ShutdownRx,
    readiness: &Arc<Readiness>,
    retry: &mut RetryLoop,
) -> Result<(), SourceError> {
    let offsets_topic = cfg.offsets_topic();
    let mut topics = vec![TopicSpec {
        name: offsets_topic.clone(),
        partitions: 1,
        config: vec![("cleanup.policy", "compact".to_string())],
    }];
    for t in &src.tables {
        let (db, table) = t.split_once('.').unwrap_or(("", t));
        topics.push(TopicSpec {
            name: cfg.topic_for(db, table),
            partitions: src.topic_partitions,
            config: vec![("max.message.bytes", MAX_MESSAGE_BYTES.to_string())],
        });
    }
    ensure_topics(&cfg.kafka, &topics).await?;
    if publisher.is_none() {
        *publisher = Some(Publisher {
            cfg: cfg.clone(),
            producer: transactional_producer(cfg).await?,
            registry: registry.clone(),
            states: HashMap::new(),
            last_shapes: HashMap::new(),
            open: false,
            key_buf: Vec::new(),
            val_buf: Vec::new(),
            datum: Vec::new(),
            events_since_commit: 0,
            last_commit_took: Duration::ZERO,
            counts: HashMap::new(),
        });
        // The producer's init_transactions aborted any transaction a previous incarnation left
        // open, so the committed offset read now is final.
        *committed = load_offset(cfg, &offsets_topic).await?;
    }
    let Some(publisher) = publisher.as_mut() else {
        return Err(SourceError::Task("no publisher".into()));
    };

    let stored = committed.clone().filter(|o| o.snapshot_completed);
    // An interrupted snapshot of the same tables resumes after its last committed chunk
    // (`snapshot_mode = always` starts over on each process start, as documented).
    let mut resume: Vec<SnapshotSegment> = committed
        .as_ref()
        .filter(|o| {
            !o.snapshot_completed
                && o.tables == src.tables
                && !(first && src.snapshot_mode == SnapshotMode::Always)
        })
        .map(|o| o.snapshot_segments.clone())
        .unwrap_or_default();
    let needed_position = stored
        .as_ref()
        .map(|o| &o.position)
        .or_else(|| resume.first().map(|s| &s.at));
    let checks = preflight::check_mysql(mysql, &src.tables, needed_position).await?;
    let purged = checks
        .iter()
        .any(|c| c.name == preflight::RESUME_POSITION_CHECK && !c.ok);
    let failed: Vec<_> = checks
        .into_iter()
        .filter(|c| !c.ok && c.name != preflight::RESUME_POSITION_CHECK)
        .collect();
    if !failed.is_empty() {
        return Err(SourceError::Preflight(failed));
    }
    let mut need_snapshot = match (src.snapshot_mode, &stored) {
        (SnapshotMode::Always, _) if first => true,
        (SnapshotMode::Never, _) => false,
        (_, None) => true,
        (_, Some(_)) => false,
    };
    // A position written by another server is no position here, whatever its file is called:
    // resuming at its byte offset would read another server's events from an arbitrary point.
    let identity = preflight::server_identity(mysql).await?;
    let foreign = committed.as_ref().and_then(|o| {
        preflight::foreign_position(o.server_id, o.server_uuid.as_deref(), &identity).or_else(
            || {
                let (stored, now) = (o.gtid.as_deref()?, identity.gtid_binlog_pos.as_deref()?);
                preflight::gtid_went_back(stored, now).then(|| {
                    format!("its GTID {stored} is ahead of the binlog's {now:?}: the binlog was reset (RESET MASTER) or restored")
                })
            },
        )
    });
    if let Some(why) = &foreign {
        tracing::warn!(%why, "the stored position was written by another server (a failover, a restore, or mysql.host pointed elsewhere)");
        if src.snapshot_mode != SnapshotMode::WhenNeeded
            && src.snapshot_mode != SnapshotMode::Always
            && let Some(o) = committed.as_ref()
        {
            return Err(SourceError::ForeignPosition {
                position: o.position.clone(),
                why: why.clone(),
            });
        }
    }
    let purged = purged || foreign.is_some();
    if purged && !resume.is_empty() {
        tracing::warn!(
            "the interrupted snapshot's start position was purged from the server, snapshotting from the start"
        );
        resume.clear();
    }
    if purged && !need_snapshot {
        match (src.snapshot_mode, &stored) {
            (SnapshotMode::WhenNeeded, _) => {
                tracing::warn!(
                    "stored position was purged from the server, re-snapshotting (snapshot_mode = when_needed)"
                );
                need_snapshot = true;
            }
            (_, Some(o)) => {
                return Err(SourceError::Purged {
                    position: o.position.clone(),
                });
            }
            (_, None) => {}
        }
    }
    // A new snapshot after a stored position starts a new epoch, so that everything it reads
    // and streams sorts after every version written before (offsets' module note); a fresh
    // start does too. Resuming keeps the stored epoch.
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stored_epoch = committed.as_ref().map(|o| o.epoch);
    let epoch = match stored_epoch {
        None => offsets::next_epoch(None, now_s),
        Some(e) if need_snapshot && resume.is_empty() => offsets::next_epoch(Some(e), now_s),
        Some(e) => e,
    };
    if stored_epoch.is_some_and(|e| e != epoch) {
        tracing::info!(
            epoch,
            previous = stored_epoch,
            "new snapshot in a new epoch: its versions supersede every earlier copy"
        );
    }
    let lineage = Lineage {
        epoch,
        server_id: Some(identity.server_id),
        server_uuid: identity.server_uuid.clone(),
    };
    let start = match (&stored, need_snapshot) {
        (Some(o), false) => Some(o.position.clone()),
        (None, false) => {
            // snapshot_mode = never and nothing stored: start at the current end.
            let mut conn = connect(mysql).await?;
            let end = preflight::binlog_end(&mut conn).await?;
            tracing::info!(position = %end, "no stored position and snapshot_mode = never: streaming from the binlog's current end");
            Some(end)
        }
        (_, true) => None,
    };

    let (tx, mut rx) = Outbox::new(src.channel_capacity);
    let reader_cfg = mysql.clone();
    let tables: Vec<String> = src.tables.clone();
    let chunk = src.snapshot_chunk_size;
    let lock_wait_s = src.snapshot_lock_wait_s;
    let reader_shutdown = shutdown.clone();
    // Streaming inside the stretch a resumed snapshot spanned keeps filtering after a restart.
    let stored_window = stored
        .as_ref()
        .and_then(|o| Window::new(&o.snapshot_segments, &o.tables));
    let reader = tokio::spawn(async move {
        let (start, window) = match start {
            Some(p) => (p, stored_window),
            None => {
                let segments = snapshot::run_snapshot(
                    &reader_cfg,
                    &tables,
                    chunk,
                    lock_wait_s,
                    epoch,
                    &tx,
                    resume,
                )
                .await?;
                let start = segments
                    .first()
                    .map(|s| s.at.clone())
                    .ok_or(SourceError::NoBinlogPosition)?;
                let window = Window::new(&segments, &tables);
                tx.send(SourceMsg::SnapshotDone { segments }).await?;
                (start, window)
            }
        };
        binlog::run_reader(
            reader_cfg,
            tables.into_iter().collect::<HashSet<_>>(),
            start,
            epoch,
            window,
            tx,
            reader_shutdown,
        )
        .await
    });
    let abort_reader = reader.abort_handle();
    let result = pump(
        src,
        publisher,
        committed,
        !need_snapshot,
        &lineage,
        &mut rx,
        &mut shutdown,
        readiness,
        retry,
    )
    .await;
    drop(rx);
    match result {
        // Shutdown: the reader stops on the same signal.
        Ok(()) => reader_outcome(reader.await).map(|_| ()),
        // The reader ended first, and its end is the cause: report that, not the closed
        // channel the producer loop saw.
        Err(SourceError::ChannelClosed) => match reader_outcome(reader.await) {
            Err(cause) => Err(cause),
            Ok(()) => Err(SourceError::ChannelClosed),
        },
        Err(e) => {
            abort_reader.abort();
            Err(e)
        }
    }
}

/// What the reader task's end means for the session: its own error, a panic turned into a
/// definite error with its message, or nothing (it stopped on shutdown or was cancelled).
fn reader_outcome(
    joined: Result<Result<(), SourceError>, tokio::task::JoinError>,
) -> Result<(), SourceError> {
    match joined {
        Ok(Ok(())) | Ok(Err(SourceError::ChannelClosed)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(join) if join.is_cancelled() => Ok(()),
        Err(join) => {
            let detail = match join.try_into_panic() {
                Ok(payload) => payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into()),
                Err(join) => join.to_string(),
            };
            tracing::error!(task = "binlog reader", panic = %detail, "source task panicked");
            Err(SourceError::Task(format!(
                "binlog reader panicked: {detail}"
            )))
        }
    }
}

/// How long a transaction stays open while input is waiting (catching up): at least
/// `interval`, and long enough that the commit (which stalls producing until every record is
/// acknowledged) takes at most a tenth of the time, capped at ten intervals. When caught up the
/// pump commits at once (latency).
fn busy_interval(interval: Duration, last_commit_took: Duration) -> Duration {
    interval.max((last_commit_took * 9).min(interval * 10))
}

/// Where this session's positions come from: their epoch and the server that writes them,
/// stored with every offset.
struct Lineage {
    epoch: u64,
    server_id: Option<u32>,
    server_uuid: Option<String>,
}

/// How long a session must stream without an error before a retry run counts as over.
const RECOVERED_AFTER: Duration = Duration::from_secs(10);

/// The producer loop of one session.
#[allow(clippy::too_many_arguments)]
async fn pump(
    src: &SourceConfig,
    publisher: &mut Publisher,
    committed: &mut Option<SourceOffset>,
    no_snapshot: bool,
    lineage: &Lineage,
    rx: &mut Inbox,
    shutdown: &mut ShutdownRx,
    readiness: &Arc<Readiness>,
    retry: &mut RetryLoop,
) -> Result<(), SourceError> {
    let interval = Duration::from_millis(src.commit_interval_ms);
    let started = Instant::now();
    let idle_interval = interval.max(Duration::from_secs(1));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_commit = Instant::now();
    let mut at_boundary = true;
    // Without a snapshot in this session (a stored position, or `snapshot_mode = never` from the
    // binlog's end) every boundary is a resume point to commit.
    let mut snapshot_done = no_snapshot || committed.as_ref().is_some_and(|o| o.snapshot_completed);
    let mut pending: Option<SourceOffset> = None;
    let mut last_ts_ms: i64 = 0;
    let mut committed_here = false;
    let tables = src.tables.clone();
    // While the stream replays a resumed snapshot's stretch, offsets keep its segments.
    let mut window = committed
        .as_ref()
        .filter(|o| o.snapshot_completed)
        .and_then(|o| Window::new(&o.snapshot_segments, &o.tables));
    readiness.source_ready.store(true, Ordering::Relaxed);
    loop {
        let msg = tokio::select! {
            biased;
            // PRIORITY 1: shutdown — commit if at a boundary, else the open work is re-read later.
            () = shutdown.wait() => {
                if at_boundary && let Some(o) = pending.take() {
                    publisher.commit(&o).await?;
                    *committed = Some(o);
                }
                return Ok(());
            }
            // PRIORITY 2: the commit timer.
            _ = tick.tick() => None,
            // PRIORITY 3: new input.
            m = rx.rx.recv() => match m {
                Some(m) => Some(m),
                None => return Err(SourceError::ChannelClosed),
            },
        };
        match msg {
            Some(SourceMsg::Changes(evs)) => {
                at_boundary = false;
                let n = evs.len();
                for ev in evs {
                    publisher.publish(ev).await?;
                }
                rx.release(n);
            }
            Some(SourceMsg::Commit {
                position,
                gtid,
                ts_ms,
            }) => {
                at_boundary = true;
                if ts_ms > 0 {
                    last_ts_ms = ts_ms;
                }
                if snapshot_done {
                    if window.as_ref().is_some_and(|w| w.passed(&position)) {
                        window = None;
                    }
                    pending = Some(SourceOffset {
                        position,
                        gtid,
                        epoch: lineage.epoch,
                        server_id: lineage.server_id,
                        server_uuid: lineage.server_uuid.clone(),
                        snapshot_completed: true,
                        tables: tables.clone(),
                        snapshot_segments: window
                            .as_ref()
                            .map(|w| w.segments().to_vec())
                            .unwrap_or_default(),
                    });
                }
            }
            Some(SourceMsg::SnapshotProgress(segments)) => {
                at_boundary = true;
                if let Some(first) = segments.first() {
                    pending = Some(SourceOffset {
                        position: first.at.clone(),
                        gtid: None,
                        epoch: lineage.epoch,
                        server_id: lineage.server_id,
                        server_uuid: lineage.server_uuid.clone(),
                        snapshot_completed: false,
                        tables: tables.clone(),
                        snapshot_segments: segments,
                    });
                }
            }
            Some(SourceMsg::SnapshotDone { segments }) => {
                at_boundary = true;
                snapshot_done = true;
                window = Window::new(&segments, &tables);
                let Some(first) = segments.first() else {
                    return Err(SourceError::NoBinlogPosition);
                };
                pending = Some(SourceOffset {
                    position: first.at.clone(),
                    gtid: None,
                    epoch: lineage.epoch,
                    server_id: lineage.server_id,
                    server_uuid: lineage.server_uuid.clone(),
                    snapshot_completed: true,
                    tables: tables.clone(),
                    snapshot_segments: window
                        .as_ref()
                        .map(|w| w.segments().to_vec())
                        .unwrap_or_default(),
                });
                // The end of a snapshot is committed at once.
                if let Some(o) = pending.take() {
                    publisher.commit(&o).await?;
                    *committed = Some(o);
                    last_commit = Instant::now();
                }
            }
            None => {}
        }
        // A retry run is over once this session has held up: it committed, or it has been
        // streaming for a while without an error (an idle source has nothing to commit).
        if retry.is_retrying() && (committed_here || started.elapsed() >= RECOVERED_AFTER) {
            retry.recovered();
        }
        if !at_boundary {
            continue;
        }
        let due = if publisher.open {
            // Caught up (nothing waiting): commit now, a lone change is not held back.
            // Behind: collect for at least the interval, longer if commits are slow, so
            // commits stay a small share of the time (group commit).
            let open_for = if rx.rx.is_empty() {
                Duration::ZERO
            } else {
                busy_interval(interval, publisher.last_commit_took)
            };
            last_commit.elapsed() >= open_for
        } else {
            last_commit.elapsed() >= idle_interval
        };
        if due && let Some(o) = pending.take() {
            if committed.as_ref() != Some(&o) {
                publisher.commit(&o).await?;
                *committed = Some(o);
                committed_here = true;
                if last_ts_ms > 0 {
                    let now = crate::events::now_ms();
                    metrics::gauge!(m::SOURCE_MS_BEHIND).set((now - last_ts_ms).max(0) as f64);
                }
            }
            last_commit = Instant::now();
        }
    }
}
