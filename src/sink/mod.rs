//! The sink half: change topics → embedded copies (and plain replicas) in MongoDB.
//!
//! ```text
//!  consumer group (read_committed) ─▶ batch ─▶ decode ─▶ collapse per key ─▶ statements ─▶ MongoDB
//!                                                 │ definite error                 │ ack
//!                                                 ▼                                ▼
//!                                          dead-letter topic ───────────────▶ store offsets
//! ```
//!
//! **Delivery.** Offsets are stored (`enable.auto.offset.store=false`) only after MongoDB
//! acknowledged every statement of the batch *and* every dead-letter record was delivered; the
//! auto-commit then commits stored offsets, and shutdown commits synchronously. At-least-once
//! delivery plus version-guarded statements means each change takes effect once.
//!
//! **Order and batching.** A batch holds whatever is already fetched, plus what arrives within
//! `batch_timeout_ms` (default 0: no wait), up to `batch_size` messages and `batch_max_bytes`,
//! a message counting once per mapping of its topic (the statements it becomes, `Fanout`):
//! small when caught up (latency), large when behind, where collapsing per key saves writes.
//! One key always lives in one partition, so arrival order is source order per key; within a
//! batch only the newest change per (mapping, key) is kept (except the create half of a key
//! change, which moves old copies). Statements for one collection run in order, up to 1,000 per
//! round trip. While a batch is written the consumer keeps polling (so a slow write never exceeds
//! `max.poll.interval.ms`) and the next batch gathers, up to the same bounds; then fetching is
//! paused. In memory: at most the batch being written and the next one.
//!
//! **Errors.** Transient (MongoDB, Kafka or registry unavailable): the batch is retried with
//! backoff; offsets do not move. Definite (bad framing, unknown schema id, undecodable datum,
//! unmappable value, a statement MongoDB refuses): that message goes to the dead-letter topic with
//! its original bytes and headers plus `ecst.dlq.*` headers naming topic, partition, offset, error
//! class and message, and the worker continues; under `on_error = "stop"` the mapping stops the
//! sink at that message instead, before anything of its batch is written (a statement MongoDB
//! refused: after the rest was written), and no offset moves. A mapping that does not fit the
//! rows of its topic (`fit`) stops the sink the same way. A dead-letter topic that refuses records (down,
//! a quota, records too large for it) holds only those records: the batch's MongoDB writes are
//! acknowledged once and not sent again; its offsets move only once every dead letter is
//! delivered, and a retry sends only the dead letters not yet delivered.

pub mod decode;
pub mod fit;
pub mod mapping;
pub mod mongo;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, TopicPartitionList};

use crate::config::{Config, ErrorPolicy, MappingConfig, MappingKind};
use crate::error::{Classify, ErrorClass};
use crate::events::registry::{Registry, RegistryError};
use crate::kafka::{
    GroupWatch, KafkaClientError, MAX_MESSAGE_BYTES, TopicSpec, client_config, ensure_topics,
};
use crate::metrics::{self as m, Readiness};
use crate::retry::{RetryLoop, Verdict};
use crate::shutdown::ShutdownRx;
use decode::{DecodeError, DecodedEvent, decode_message};
use mapping::Mapping;
use mongo::{MongoWriter, Tagged, is_transient};

/// Dead-letter header: original topic.
pub const DLQ_TOPIC_HEADER: &str = "ecst.dlq.topic";
/// Dead-letter header: original partition.
pub const DLQ_PARTITION_HEADER: &str = "ecst.dlq.partition";
/// Dead-letter header: original offset.
pub const DLQ_OFFSET_HEADER: &str = "ecst.dlq.offset";
/// Dead-letter header: error class.
pub const DLQ_CLASS_HEADER: &str = "ecst.dlq.error.class";
/// Dead-letter header: error message.
pub const DLQ_MESSAGE_HEADER: &str = "ecst.dlq.error.message";
/// Dead-letter header: stage that failed (`decode`, `mapping`, `write`).
pub const DLQ_STAGE_HEADER: &str = "ecst.dlq.stage";

/// Errors of the sink half.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Driver error.
    #[error("mongodb: {0}")]
    Mongo(#[source] mongodb::error::Error),
    /// MongoDB refused the credentials of `mongo.uri` (SCRAM or X.509 authentication failed).
    #[error(
        "mongodb refused the credentials ({detail}); fix: the user and password in mongo.uri (or uri_file, read at start: after a password rotation, restart ecst with the file updated), its authSource and authMechanism"
    )]
    MongoCredentials {
        /// The driver's message (it carries no secret).
        detail: String,
    },
    /// MongoDB's TLS certificate is not trusted, or the URI's TLS settings are unusable.
    #[error(
        "mongodb's TLS connection cannot be trusted ({detail}); fix: tlsCAFile in mongo.uri (the CA that signed MongoDB's certificate, which must name the host of the URI)"
    )]
    MongoTls {
        /// The driver's message.
        detail: String,
    },
    /// A retryable statement-level error.
    #[error("mongodb write error {code}: {message}")]
    MongoWrite {
        /// Server code.
        code: i32,
        /// Message.
        message: String,
    },
    /// The server applied a write but could not satisfy its write concern: it may be rolled
    /// back, so the batch is not acknowledged and is written again.
    #[error("mongodb write concern not satisfied ({code}): {message}")]
    WriteConcern {
        /// Server code.
        code: i32,
        /// Message.
        message: String,
    },
    /// A match path is not indexed and `create_indexes` is off.
    #[error(
        "collection `{collection}` has no index on `{path}`: every update would scan the collection; create it with db.{collection}.createIndex({{\"{path}\": 1}}) or set sink.create_indexes = true"
    )]
    MissingIndex {
        /// Collection.
        collection: String,
        /// Path.
        path: String,
    },
    /// Kafka.
    #[error(transparent)]
    Kafka(#[from] KafkaClientError),
    /// Registry unreachable while decoding.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Dead-letter produce failed.
    #[error("dead-letter topic `{topic}`: {source}")]
    DeadLetter {
        /// Topic.
        topic: String,
        /// Cause.
        #[source]
        source: KafkaError,
    },
    /// Missing configuration.
    #[error("sink is not configured: {0}")]
    NotConfigured(&'static str),
    /// A mapping does not fit the rows of its topic (or the registry could not say).
    #[error(transparent)]
    Fit(#[from] fit::FitError),
    /// A message a mapping with `on_error = "stop"` cannot apply.
    #[error(
        "mapping `{mapping}` (on_error = \"stop\") cannot apply message {at} ({stage}): {error}; nothing after it is applied and its offset does not move; fix: the cause named, then restart; or set on_error = \"dead_letter\" to divert such messages to the dead-letter topic"
    )]
    Unapplicable {
        /// Mapping name.
        mapping: String,
        /// `topic/partition@offset`.
        at: String,
        /// Stage that failed (`decode`, `mapping`, `write`).
        stage: &'static str,
        /// The error.
        error: String,
    },
    /// A mapping needs what the MongoDB server does not offer.
    #[error("mapping `{mapping}`: {detail}")]
    Unsupported {
        /// Mapping name.
        mapping: String,
        /// What is missing, and the fix.
        detail: String,
    },
}

impl SinkError {
    /// A driver error as the sink reports it: refused credentials and an untrusted TLS
    /// connection are their own definite errors (retrying them changes nothing, and a write
    /// that meets them must not be dead-lettered either); anything else stays
    /// [`SinkError::Mongo`], classed by [`is_transient`].
    pub fn mongo(e: mongodb::error::Error) -> SinkError {
        use mongodb::error::ErrorKind;
        let text = e.to_string();
        match e.kind.as_ref() {
            ErrorKind::Authentication { message, .. } => SinkError::MongoCredentials {
                detail: message.clone(),
            },
            // AuthenticationFailed, answered to a command.
            ErrorKind::Command(c) if c.code == 18 => SinkError::MongoCredentials {
                detail: c.message.clone(),
            },
            ErrorKind::InvalidTlsConfig { message, .. } => SinkError::MongoTls {
                detail: message.clone(),
            },
            // rustls's verdict on the server's certificate (unknown issuer, expired, not valid
            // for the host), which the driver reports inside an I/O or server-selection error.
            _ if text.contains("invalid peer certificate") => SinkError::MongoTls { detail: text },
            _ => SinkError::Mongo(e),
        }
    }
}

impl Classify for SinkError {
    fn class(&self) -> ErrorClass {
        match self {
            SinkError::Mongo(e) => {
                if is_transient(e) {
                    ErrorClass::Transient
                } else {
                    ErrorClass::Definite
                }
            }
            SinkError::MongoWrite { .. }
            | SinkError::WriteConcern { .. }
            | SinkError::DeadLetter { .. } => ErrorClass::Transient,
            SinkError::Kafka(e) => e.class(),
            SinkError::Registry(e) => e.class(),
            SinkError::Fit(e) => e.class(),
            SinkError::MissingIndex { .. }
            | SinkError::NotConfigured(_)
            | SinkError::Unsupported { .. }
            | SinkError::Unapplicable { .. }
            | SinkError::MongoCredentials { .. }
            | SinkError::MongoTls { .. } => ErrorClass::Definite,
        }
    }

    fn kind(&self) -> String {
        match self {
            SinkError::Mongo(e) => match e.kind.as_ref() {
                mongodb::error::ErrorKind::Command(c) => format!("mongo_{}", c.code),
                mongodb::error::ErrorKind::Write(_) => "mongo_write".into(),
                _ => "mongo".into(),
            },
            SinkError::MongoWrite { code, .. } | SinkError::WriteConcern { code, .. } => {
                format!("mongo_{code}")
            }
            SinkError::MongoCredentials { .. } => "mongo_credentials".into(),
            SinkError::MongoTls { .. } => "mongo_tls".into(),
            SinkError::Kafka(_) => "kafka".into(),
            SinkError::Registry(_) => "registry".into(),
            SinkError::Fit(e) => e.kind(),
            SinkError::DeadLetter { .. } => "dead_letter_topic".into(),
            SinkError::MissingIndex { .. } | SinkError::NotConfigured(_) => "sink".into(),
            SinkError::Unsupported { .. } => "mapping_unsupported".into(),
            SinkError::Unapplicable { .. } => "mapping_stopped".into(),
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            SinkError::Mongo(_)
            | SinkError::MongoWrite { .. }
            | SinkError::WriteConcern { .. }
            | SinkError::MongoCredentials { .. }
            | SinkError::MongoTls { .. } => {
                "that MongoDB at mongo.uri is up, has a primary, and accepts the user"
            }
            SinkError::Registry(_) => "that the schema registry at schema_registry.url is up",
            SinkError::Fit(e) => e.hint(),
            SinkError::Kafka(_) | SinkError::DeadLetter { .. } => {
                "that the Kafka brokers in kafka.bootstrap_servers are up"
            }
            SinkError::MissingIndex { .. }
            | SinkError::NotConfigured(_)
            | SinkError::Unsupported { .. }
            | SinkError::Unapplicable { .. } => "the error above",
        }
    }
}

/// Which entries of a batch to write: per (mapping, key) the change with the highest version
/// (ties: the later arrival), whatever order they arrived in — after partitions are added, or
/// when a replay interleaves, an older change can arrive last. Key-change creates are always
/// kept (they carry the move of the copies from the old key).
///
/// A change that is a no-op for its mapping (`is_noop`: a delete under `on_delete = "keep"`)
/// never wins: "update, then delete" leaves the update's copy, as it would if the two came in
/// separate batches.
fn newest_per_key(
    entries: &[(usize, usize, Arc<DecodedEvent>)],
    is_noop: impl Fn(usize, &DecodedEvent) -> bool,
) -> Vec<bool> {
    let mut best: HashMap<(usize, String), usize> = HashMap::new();
    for (idx, (mi, _, ev)) in entries.iter().enumerate() {
        if is_noop(*mi, ev) {
            continue;
        }
        let slot = best.entry((*mi, ev.key.to_string())).or_insert(idx);
        if entries[*slot].2.version <= ev.version {
            *slot = idx;
        }
    }
    let mut keep = vec![false; entries.len()];
    for idx in best.into_values() {
        keep[idx] = true;
    }
    for (idx, (_, _, ev)) in entries.iter().enumerate() {
        if ev.old_key.is_some() {
            keep[idx] = true;
        }
    }
    keep
}

/// A message that will be dead-lettered.
struct DeadLetter {
    msg: usize,
    /// The mapping that could not apply it (`None`: undecodable, so every mapping of its topic).
    mapping: Option<usize>,
    stage: &'static str,
    class: ErrorClass,
    error: String,
}

/// A batch whose MongoDB writes are acknowledged: what is left is to dead-letter what could not
/// be applied, then to record its metrics. Kept apart so that a dead-letter topic that refuses
/// records holds up only those records: the writes are never sent again for it.
struct Written {
    /// Dead letters not yet delivered.
    dead: Vec<DeadLetter>,
    /// Changes taken into account per mapping (written, or collapsed into a newer one).
    applied_per_mapping: HashMap<usize, u64>,
    /// (source commit, ecst read) times of the batch's changes, for the latency histograms.
    times: Vec<(Option<i64>, Option<i64>)>,
    /// When the batch's first MongoDB write began (ms since the epoch): the end of ecst's own
    /// share of the pipeline latency.
    write_started_ms: i64,
}

pub(crate) fn headers_of(msg: &OwnedMessage) -> Vec<(String, Vec<u8>)> {
    match msg.headers() {
        Some(h) => h
            .iter()
            .map(|h| {
                (
                    h.key.to_string(),
                    h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                )
            })
            .collect(),
        None => Vec::new(),
    }
}

/// The sink worker's state.
pub struct Sink {
    registry: Registry,
    writer: MongoWriter,
    mappings: Vec<Mapping>,
    dlq: FutureProducer,
    dlq_topic: String,
    fitting: fit::Fitting,
}

/// Whether the server can run every mapping: a copy inside array elements needs `arrayFilters`,
/// which FerretDB 1.x lacks (a loud stop at start, never copies left unrefreshed).
pub fn server_supports(writer: &MongoWriter, mappings: &[MappingConfig]) -> Result<(), SinkError> {
    let arrays = mappings.iter().find(|m| {
        m.kind == MappingKind::Embedded
            && matches!(
                (&m.match_path, &m.target_path),
                (Some(mp), Some(tp)) if matches!(mapping::array_target(mp, tp), Ok(Some(_)))
            )
    });
    match arrays {
        Some(m) if writer.is_ferretdb() => Err(SinkError::Unsupported {
            mapping: m.name.clone(),
            detail: format!(
                "target_path `{}` copies into array elements, which needs `arrayFilters`; this server is FerretDB, which does not support them: use MongoDB (3.6 or later) for this mapping",
                m.target_path.as_deref().unwrap_or_default()
            ),
        }),
        _ => Ok(()),
    }
}

impl Sink {
    /// Closes the MongoDB client (see [`MongoWriter::close`]).
    pub async fn close(self) {
        self.writer.close().await;
    }

    /// Connects to MongoDB, checks indexes, prepares the dead-letter producer.
    pub async fn new(cfg: Arc<Config>, registry: Registry) -> Result<Self, SinkError> {
        let sink_cfg = cfg.sink.clone().ok_or(SinkError::NotConfigured("[sink]"))?;
        let mongo = cfg
            .mongo
            .clone()
            .ok_or(SinkError::NotConfigured("[mongo]"))?;
        let writer = MongoWriter::connect(mongo.uri.expose(), &mongo.database).await?;
        let mappings: Vec<Mapping> = sink_cfg
            .mappings
            .iter()
            .cloned()
            .map(Mapping::new)
            .collect();
        server_supports(&writer, &sink_cfg.mappings)?;
        let fitting = fit::Fitting::default();
        let all: Vec<&MappingConfig> = sink_cfg.mappings.iter().collect();
        for topic in topics_of(&sink_cfg.mappings) {
            fitting.check_latest(&registry, &all, &topic).await?;
        }
        for mp in &mappings {
            if mp.cfg.kind == MappingKind::Embedded
                && let Some(path) = &mp.cfg.match_path
            {
                writer
                    .ensure_index(&mp.cfg.collection, path, sink_cfg.create_indexes)
                    .await?;
            }
        }
        let dlq_topic = cfg.dead_letter_topic();
        let dlq_spec = TopicSpec {
            name: dlq_topic.clone(),
            partitions: 1,
            config: vec![("max.message.bytes", MAX_MESSAGE_BYTES.to_string())],
        };
        ensure_topics(&cfg.kafka, &[dlq_spec]).await?;
        let mut pc = client_config(&cfg.kafka);
        pc.set("enable.idempotence", "true")
            .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string());
        let dlq: FutureProducer = pc
            .create()
            .map_err(|e| SinkError::Kafka(KafkaClientError::Config(e)))?;
        Ok(Sink {
            registry,
            writer,
            mappings,
            dlq,
            dlq_topic,
            fitting,
        })
    }

    /// The MongoDB writer (used by checks and tests).
    pub fn writer(&self) -> &MongoWriter {
        &self.writer
    }

    /// Decodes, maps and writes one batch, and collects what cannot be applied for the
    /// dead-letter topic. Returns an error only for transient problems (the caller retries the
    /// batch; its writes are guarded, so writing them again changes nothing).
    async fn write(&self, batch: &[OwnedMessage]) -> Result<Written, SinkError> {
        let mut dead: Vec<DeadLetter> = Vec::new();
        // (mapping, message, event) in arrival order.
        let mut entries: Vec<(usize, usize, Arc<DecodedEvent>)> = Vec::new();
        for msg in batch {
            if let Some(ids) = fit::ids_of(msg.key(), msg.payload())
                && !self.fitting.judged(msg.topic(), ids)
            {
                let all: Vec<&MappingConfig> = self.mappings.iter().map(|m| &m.cfg).collect();
                self.fitting
                    .check_ids(&self.registry, &all, msg.topic(), ids)
                    .await?;
            }
        }
        for (i, msg) in batch.iter().enumerate() {
            let headers = headers_of(msg);
            match decode_message(&self.registry, msg.key(), msg.payload(), &headers).await {
                Ok(None) => {}
                Ok(Some(ev)) => {
                    let ev = Arc::new(ev);
                    for (mi, mp) in self.mappings.iter().enumerate() {
                        if mp.cfg.topic == msg.topic() {
                            entries.push((mi, i, ev.clone()));
                        }
                    }
                }
                // The registry itself failing (down, refusing our credentials, a wrong URL) is
                // the environment, never the message: retry or stop, but do not divert data.
                // Only an id the registry demonstrably does not know is poison.
                Err(DecodeError::Registry { source, .. })
                    if !matches!(
                        source,
                        RegistryError::UnknownId { .. } | RegistryError::BadSchema { .. }
                    ) =>
                {
                    return Err(SinkError::Registry(source));
                }
                Err(e @ DecodeError::Registry { .. }) => {
                    if let Err(probe) = self.registry.subjects().await {
                        tracing::warn!(error = %probe, unknown = %e, "the registry does not answer its subject list either: an environment problem, not a poison message");
                        return Err(SinkError::Registry(probe));
                    }
                    dead.push(DeadLetter {
                        msg: i,
                        mapping: None,
                        stage: "decode",
                        class: ErrorClass::Definite,
                        error: e.to_string(),
                    });
                }
                Err(e) => dead.push(DeadLetter {
                    msg: i,
                    mapping: None,
                    stage: "decode",
                    class: ErrorClass::Definite,
                    error: e.to_string(),
                }),
            }
        }
        let keep = newest_per_key(&entries, |mi, ev| {
            self.mappings.get(mi).is_some_and(|m| m.is_noop(ev))
        });
        let mut per_collection: HashMap<&str, Vec<Tagged>> = HashMap::new();
        let mut applied_per_mapping: HashMap<usize, u64> = HashMap::new();
        for (idx, (mi, msg_i, ev)) in entries.iter().enumerate() {
            if !keep[idx] {
                *applied_per_mapping.entry(*mi).or_default() += 1;
                continue;
            }
            let mp = &self.mappings[*mi];
            match mp.statements(ev) {
                Ok(stmts) => {
                    *applied_per_mapping.entry(*mi).or_default() += 1;
                    let list = per_collection
                        .entry(mp.cfg.collection.as_str())
                        .or_default();
                    list.extend(stmts.into_iter().map(|stmt| Tagged { entry: idx, stmt }));
                }
                Err(e) => dead.push(DeadLetter {
                    msg: *msg_i,
                    mapping: Some(*mi),
                    stage: "mapping",
                    class: ErrorClass::Definite,
                    error: e.to_string(),
                }),
            }
        }
        // A mapping that stops on errors stops before anything of the batch is written.
        self.stop_on(batch, &dead)?;
        let started = Instant::now();
        let write_started_ms = crate::events::now_ms();
        tracing::debug!(
            changes = entries.len(),
            dead = dead.len(),
            "batch decoded and mapped"
        );
        for (coll, stmts) in &per_collection {
            let outcome = self.writer.apply(coll, stmts).await?;
            for (entry, error) in outcome.failed {
                if let Some((mi, msg_i, _)) = entries.get(entry) {
                    // A change whose several statements failed is one dead letter, counted once.
                    if dead.iter().any(|d| d.msg == *msg_i && d.stage == "write") {
                        continue;
                    }
                    let applied = applied_per_mapping.entry(*mi).or_default();
                    *applied = applied.saturating_sub(1);
                    dead.push(DeadLetter {
                        msg: *msg_i,
                        mapping: Some(*mi),
                        stage: "write",
                        class: ErrorClass::Definite,
                        error,
                    });
                }
            }
            for entry in outcome.stale {
                if let Some((mi, _, _)) = entries.get(entry) {
                    metrics::counter!(m::SINK_STALE_TOTAL, m::MAPPING_LABEL => self.mappings[*mi].cfg.name.clone()).increment(1);
                }
            }
        }
        metrics::histogram!(m::SINK_BATCH_SECONDS).record(started.elapsed().as_secs_f64());
        // Statements MongoDB refused: the rest of the batch is written (guarded, so writing it
        // again after the fix changes nothing), its offsets do not move.
        self.stop_on(batch, &dead)?;
        tracing::debug!(
            messages = batch.len(),
            changes = entries.len(),
            statements = per_collection.values().map(Vec::len).sum::<usize>(),
            write_ms = started.elapsed().as_millis() as u64,
            "batch written"
        );
        Ok(Written {
            dead,
            applied_per_mapping,
            times: entries
                .iter()
                .map(|(_, _, ev)| (ev.source_ts_ms, ev.read_ts_ms))
                .collect(),
            write_started_ms,
        })
    }

    /// The stop that a dead letter means for a mapping with `on_error = "stop"` (for an
    /// undecodable message: any mapping of its topic).
    fn stop_on(&self, batch: &[OwnedMessage], dead: &[DeadLetter]) -> Result<(), SinkError> {
        for d in dead {
            let Some(msg) = batch.get(d.msg) else {
                continue;
            };
            let stops = self.mappings.iter().enumerate().find(|(mi, m)| {
                m.cfg.on_error == ErrorPolicy::Stop
                    && d.mapping.is_none_or(|x| x == *mi)
                    && m.cfg.topic == msg.topic()
            });
            if let Some((_, m)) = stops {
                return Err(SinkError::Unapplicable {
                    mapping: m.cfg.name.clone(),
                    at: format!("{}/{}@{}", msg.topic(), msg.partition(), msg.offset()),
                    stage: d.stage,
                    error: d.error.clone(),
                });
            }
        }
        Ok(())
    }

    /// Records the metrics of a batch whose writes and dead letters are all acknowledged.
    fn record_applied(&self, written: &Written) {
        let now = crate::events::now_ms();
        for (mi, n) in &written.applied_per_mapping {
            metrics::counter!(m::SINK_APPLIED_TOTAL, m::MAPPING_LABEL => self.mappings[*mi].cfg.name.clone()).increment(*n);
        }
        for (source_ts, read_ts) in &written.times {
            if let Some(ts) = source_ts.filter(|t| *t > 0) {
                metrics::histogram!(m::END_TO_END_LATENCY)
                    .record((now - ts).max(0) as f64 / 1000.0);
            }
            if let Some(ts) = read_ts.filter(|t| *t > 0) {
                metrics::histogram!(m::PIPELINE_LATENCY).record((now - ts).max(0) as f64 / 1000.0);
                metrics::histogram!(m::PIPELINE_BEFORE_WRITE)
                    .record((written.write_started_ms - ts).max(0) as f64 / 1000.0);
            }
        }
    }

    /// Sends `dead` to the dead-letter topic. Each delivered record leaves `dead`; on an error
    /// the ones left are those still to send (a retry sends only them, and writes nothing to
    /// MongoDB again).
    async fn dead_letter(
        &self,
        batch: &[OwnedMessage],
        dead: &mut Vec<DeadLetter>,
    ) -> Result<(), SinkError> {
        let mut pending = Vec::with_capacity(dead.len());
        for (i, d) in dead.iter().enumerate() {
            let Some(msg) = batch.get(d.msg) else {
                continue;
            };
            tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), stage = d.stage, error = %d.error, "message sent to the dead-letter topic");
            let mut headers = OwnedHeaders::new();
            for (k, v) in headers_of(msg) {
                headers = headers.insert(Header {
                    key: &k,
                    value: Some(&v),
                });
            }
            let partition = msg.partition().to_string();
            let offset = msg.offset().to_string();
            headers = headers
                .insert(Header {
                    key: DLQ_TOPIC_HEADER,
                    value: Some(msg.topic()),
                })
                .insert(Header {
                    key: DLQ_PARTITION_HEADER,
                    value: Some(&partition),
                })
                .insert(Header {
                    key: DLQ_OFFSET_HEADER,
                    value: Some(&offset),
                })
                .insert(Header {
                    key: DLQ_CLASS_HEADER,
                    value: Some(d.class.as_str()),
                })
                .insert(Header {
                    key: DLQ_MESSAGE_HEADER,
                    value: Some(&d.error),
                })
                .insert(Header {
                    key: DLQ_STAGE_HEADER,
                    value: Some(d.stage),
                });
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.dlq_topic).headers(headers);
            if let Some(k) = msg.key() {
                rec = rec.key(k);
            }
            if let Some(p) = msg.payload() {
                rec = rec.payload(p);
            }
            pending.push((
                i,
                msg.topic().to_string(),
                self.dlq.send(rec, Duration::from_secs(30)),
            ));
        }
        let mut delivered = vec![false; dead.len()];
        let mut failed = None;
        for (i, from, fut) in pending {
            match fut.await {
                Ok(_) => {
                    delivered[i] = true;
                    metrics::counter!(m::SINK_DLQ_TOTAL, m::TOPIC_LABEL => from).increment(1);
                }
                Err((source, _)) => {
                    failed.get_or_insert(SinkError::DeadLetter {
                        topic: self.dlq_topic.clone(),
                        source,
                    });
                }
            }
        }
        let mut delivered = delivered.into_iter();
        dead.retain(|_| !delivered.next().unwrap_or(false));
        failed.map_or(Ok(()), Err)
    }
}

/// The distinct topics of `mappings`, sorted.
fn topics_of(mappings: &[MappingConfig]) -> Vec<String> {
    let mut t: Vec<String> = mappings.iter().map(|m| m.topic.clone()).collect();
    t.sort();
    t.dedup();
    t
}

fn consumer_for(cfg: &Config) -> Result<SinkConsumer, SinkError> {
    let sink = cfg
        .sink
        .as_ref()
        .ok_or(SinkError::NotConfigured("[sink]"))?;
    let mut cc = client_config(&cfg.kafka);
    cc.set("group.id", &sink.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("topic.metadata.refresh.interval.ms", "10000")
        .set(
            "receive.message.max.bytes",
            (MAX_MESSAGE_BYTES * 2).to_string(),
        )
        .set("fetch.max.bytes", MAX_MESSAGE_BYTES.to_string());
    cc.create_with_context(GroupWatch::default())
        .map_err(|e| SinkError::Kafka(KafkaClientError::Config(e)))
}

/// The sink's consumer: its context follows the group membership.
type SinkConsumer = StreamConsumer<GroupWatch>;

/// Owns the sink's consumer so that its last drop never runs on an async worker. Dropping a
/// librdkafka consumer closes it, and the close waits for the broker (leaving the group): a
/// broker that refuses the credentials (a rotated password) or does not answer holds it for
/// ever. That was seen blocking a whole runtime for over ten minutes after a password rotation.
/// The close runs on a detached thread of its own; the process does not wait for it.
///
/// Every other holder of the consumer goes through [`release`] too: the lag task keeps only a
/// `Weak` between its ticks, and each blocking call releases its clone, so whichever holder
/// is the last, the close never runs on an async worker (seen once more: the lag task, aborted
/// after the main loop ended, dropped the last clone on a test's runtime) nor holds a blocking
/// thread that a runtime's shutdown waits for.
struct ClosesOffThread(Option<Arc<SinkConsumer>>);

/// Drops one holder of the consumer; the last one closes it on a detached thread.
fn release(c: Arc<SinkConsumer>) {
    // `into_inner` is atomic: exactly one of several concurrent releases gets the consumer.
    let Some(last) = Arc::into_inner(c) else {
        return;
    };
    let closing = std::thread::Builder::new()
        .name("sink-consumer-close".into())
        .spawn(move || drop(last));
    if let Err(e) = closing {
        tracing::warn!(error = %e, "no thread for closing the kafka consumer: closed here");
    }
}

impl std::ops::Deref for ClosesOffThread {
    type Target = Arc<SinkConsumer>;
    fn deref(&self) -> &Self::Target {
        // Set at construction, taken only by `drop`.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("taken only on drop"))
    }
}

impl Drop for ClosesOffThread {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            release(c);
        }
    }
}

/// Messages received while a batch was written, in arrival order, each with the revocation
/// mark it was received under (`GroupWatch::revocation_mark`).
#[derive(Default)]
struct Carry {
    messages: std::collections::VecDeque<(OwnedMessage, u64)>,
    bytes: usize,
    /// Whether the assigned partitions were paused because the carry is full.
    paused: bool,
}

impl Carry {
    fn push(&mut self, m: OwnedMessage, mark: u64) {
        self.bytes += message_bytes(&m);
        self.messages.push_back((m, mark));
    }
    fn pop(&mut self) -> Option<OwnedMessage> {
        let (m, _) = self.messages.pop_front()?;
        self.bytes -= message_bytes(&m);
        Some(m)
    }
    /// Drops the messages of partitions revoked after they were received: the partition's new
    /// owner applies them from the committed offset (and this process does too, from there, if
    /// the partition comes back), so writing them here could only come after newer changes.
    /// A message received after its partition came back is kept. Returns how many it dropped.
    fn forget(&mut self, revoked: &HashMap<(String, i32), u64>) -> usize {
        if revoked.is_empty() {
            return 0;
        }
        let before = self.messages.len();
        let mut bytes = self.bytes;
        self.messages.retain(|(m, mark)| {
            let gone = revoked
                .get(&(m.topic().to_string(), m.partition()))
                .is_some_and(|n| mark < n);
            if gone {
                bytes -= message_bytes(m);
            }
            !gone
        });
        self.bytes = bytes;
        before - self.messages.len()
    }
    fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
    fn is_full(&self, (max_messages, max_bytes): (usize, usize)) -> bool {
        self.messages.len() >= max_messages || self.bytes >= max_bytes
    }
}

/// Pauses fetching for every assigned partition (polling then only keeps the membership).
/// librdkafka drops what it fetched but did not deliver, and resumes after the last message
/// delivered, so nothing is skipped.
fn pause_assigned(consumer: &SinkConsumer) -> bool {
    match consumer.assignment() {
        Ok(tpl) if tpl.count() > 0 => match consumer.pause(&tpl) {
            Ok(()) => {
                tracing::debug!(
                    partitions = tpl.count(),
                    "fetching paused: the next batch is full"
                );
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "pausing partitions failed");
                false
            }
        },
        _ => false,
    }
}

fn resume_assigned(consumer: &SinkConsumer) {
    if let Ok(tpl) = consumer.assignment()
        && let Err(e) = consumer.resume(&tpl)
    {
        tracing::warn!(error = %e, "resuming partitions failed");
    }
}

/// Applies one batch, retrying transient failures with backoff. `Ok(false)`: shutdown came first
/// (the batch is not acknowledged; it is read again after a restart).
async fn apply_until_done(
    sink: &Sink,
    batch: &[OwnedMessage],
    retry: &mut RetryLoop,
    shutdown: &mut ShutdownRx,
) -> Result<bool, SinkError> {
    let mut written = loop {
        match sink.write(batch).await {
            Ok(w) => break w,
            Err(e) => {
                if !wait_to_retry(retry, shutdown, "sink batch not applied", e).await? {
                    return Ok(false);
                }
                tracing::debug!(messages = batch.len(), "batch held until it can be applied");
            }
        }
    };
    // The writes are acknowledged; a dead-letter topic that refuses records holds up only
    // those records (the offsets still do not move until they are delivered).
    while !written.dead.is_empty() {
        match sink.dead_letter(batch, &mut written.dead).await {
            Ok(()) => break,
            Err(e) => {
                if !wait_to_retry(retry, shutdown, "dead letters not delivered", e).await? {
                    return Ok(false);
                }
                tracing::debug!(
                    dead_letters = written.dead.len(),
                    "dead letters held until the topic takes them; the batch's writes are done"
                );
            }
        }
    }
    retry.recovered();
    sink.record_applied(&written);
    Ok(true)
}

/// After a failed attempt: a transient error waits its backoff (`Ok(true)`: try again;
/// `Ok(false)`: shutdown came first); a definite one, or one retried for too long, is returned.
async fn wait_to_retry(
    retry: &mut RetryLoop,
    shutdown: &mut ShutdownRx,
    what: &'static str,
    e: SinkError,
) -> Result<bool, SinkError> {
    if e.class() != ErrorClass::Transient {
        return Err(e);
    }
    let Verdict::RetryIn(delay) = retry.failed(what, &e) else {
        return Err(e);
    };
    tokio::select! {
        () = shutdown.wait() => Ok(false),
        () = tokio::time::sleep(delay) => Ok(true),
    }
}

/// Key + value bytes of a message (what a batch holds in memory).
/// How many statements a message of each topic becomes: one per mapping of its topic. A batch
/// counts a message that many times toward `batch_size`, and its bytes that many times toward
/// `batch_max_bytes`, so the statements held while a batch is written stay within those bounds
/// whatever the fan-out. (Counted as one, 100 mappings on one topic made batches of 100 ×
/// `batch_size` statements: 635 MB of RSS in `dev/bench-scale`.)
struct Fanout(HashMap<String, usize>);

impl Fanout {
    fn of_mappings(mappings: &[MappingConfig]) -> Self {
        let mut per_topic: HashMap<String, usize> = HashMap::new();
        for m in mappings {
            *per_topic.entry(m.topic.clone()).or_default() += 1;
        }
        Fanout(per_topic)
    }

    fn of(&self, m: &OwnedMessage) -> usize {
        self.0.get(m.topic()).copied().unwrap_or(1).max(1)
    }
}

fn message_bytes(m: &OwnedMessage) -> usize {
    m.key().map_or(0, <[u8]>::len) + m.payload().map_or(0, <[u8]>::len)
}

/// Next offset to apply, per (topic, partition), as far as this process has applied.
type Applied = Arc<std::sync::Mutex<HashMap<(String, i32), i64>>>;

/// How often the consumer lag is measured.
const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Sets `ecst_sink_consumer_lag{topic}`: high watermark minus the next offset to apply, summed
/// over the partitions this process is assigned (blocking: broker round trips). The next offset
/// to apply is what this process applied, else the group's committed offset, else the low
/// watermark (nothing committed yet: everything is still to apply). Measured on a timer, so a
/// sink that applies nothing (stuck, or starved of input) still shows its lag growing.
fn record_lag(consumer: &SinkConsumer, topics: &[String], applied: &Applied) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    // A partition no longer assigned forgets what was applied here: if it comes back, another
    // member may have moved it on, and its committed offset is the truth again.
    let known: HashMap<(String, i32), i64> = applied
        .lock()
        .map(|mut a| {
            a.retain(|(t, p), _| assignment.find_partition(t, *p).is_some());
            a.clone()
        })
        .unwrap_or_default();
    let mut committed: Option<TopicPartitionList> = None;
    let mut lag: HashMap<&str, i64> = topics.iter().map(|t| (t.as_str(), 0)).collect();
    for el in assignment.elements() {
        let Ok((low, high)) =
            consumer.fetch_watermarks(el.topic(), el.partition(), Duration::from_millis(500))
        else {
            continue;
        };
        let next = match known.get(&(el.topic().to_string(), el.partition())) {
            Some(o) => *o,
            None => {
                if committed.is_none() {
                    committed = consumer
                        .committed_offsets(assignment.clone(), Duration::from_millis(500))
                        .ok();
                }
                committed
                    .as_ref()
                    .and_then(|c| c.find_partition(el.topic(), el.partition()))
                    .and_then(|p| p.offset().to_raw())
                    .filter(|o| *o >= 0)
                    .unwrap_or(low)
            }
        };
        if let Some(v) = lag.get_mut(el.topic()) {
            *v += (high - next.max(low)).max(0);
        }
    }
    for (topic, v) in lag {
        metrics::gauge!(m::SINK_CONSUMER_LAG, m::TOPIC_LABEL => topic.to_string()).set(v as f64);
    }
}

/// Runs the sink until shutdown or a definite error.
pub async fn run(
    cfg: Arc<Config>,
    registry: Registry,
    mut shutdown: ShutdownRx,
    readiness: Arc<Readiness>,
) -> Result<(), SinkError> {
    let Some(sink_cfg) = cfg.sink.clone() else {
        return Ok(());
    };
    let mut retry = RetryLoop::new(
        "sink",
        Duration::from_millis(200),
        Duration::from_secs(30),
        cfg.max_retry_duration_ms,
        readiness.clone(),
    );
    // Start-up (MongoDB reachable, indexes) retried like any transient error.
    let sink = loop {
        match Sink::new(cfg.clone(), registry.clone()).await {
            Ok(s) => break s,
            Err(e) if e.class() == ErrorClass::Transient => {
                let Verdict::RetryIn(delay) = retry.failed("sink cannot start yet", &e) else {
                    return Err(e);
                };
                tokio::select! {
                    () = shutdown.wait() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e),
        }
    };
    retry.recovered();
    let result = loop {
        let r = consume(
            &cfg,
            &sink_cfg,
            &sink,
            &mut retry,
            &mut shutdown,
            &readiness,
        )
        .await;
        // A consumer that lost its group for good is replaced by a new one (what it applied
        // but did not commit is applied again, idempotently).
        let Err(e @ SinkError::Kafka(KafkaClientError::OutOfGroup { .. })) = r else {
            break r;
        };
        let Verdict::RetryIn(delay) = retry.failed("sink consumer recreated", &e) else {
            break Err(e);
        };
        tokio::select! {
            () = shutdown.wait() => break Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    };
    // Close the MongoDB client while the runtime still runs: dropped at runtime shutdown, the
    // driver's background tasks panic on their closed channels.
    sink.close().await;
    result
}

/// The consume → batch → apply → store-offsets loop, until shutdown or a definite error.
async fn consume(
    cfg: &Arc<Config>,
    sink_cfg: &crate::config::SinkConfig,
    sink: &Sink,
    retry: &mut RetryLoop,
    shutdown: &mut ShutdownRx,
    readiness: &Arc<Readiness>,
) -> Result<(), SinkError> {
    let consumer = ClosesOffThread(Some(Arc::new(consumer_for(cfg)?)));
    let topics = topics_of(&sink_cfg.mappings);
    // Subscribing to a topic that does not exist yet would only notice it at the next metadata
    // refresh: wait for the source to create them, saying so.
    let mut waited = false;
    loop {
        let c = (*consumer).clone();
        let t = topics.clone();
        let missing = tokio::task::spawn_blocking(move || -> Vec<String> {
            let missing = t
                .into_iter()
                .filter(|topic| {
                    // All topics, not the one by name: a named metadata request auto-creates
                    // the topic on brokers with auto.create.topics.enable.
                    c.fetch_metadata(None, Duration::from_secs(5))
                        .map(|md| {
                            !md.topics().iter().any(|x| {
                                x.name() == topic.as_str()
                                    && !x.partitions().is_empty()
                                    && x.error().is_none()
                            })
                        })
                        .unwrap_or(true)
                })
                .collect();
            release(c);
            missing
        })
        .await
        .unwrap_or_default();
        if missing.is_empty() {
            break;
        }
        if !waited {
            tracing::info!(topics = ?missing, "waiting for the change topics to exist");
            waited = true;
        }
        tokio::select! {
            () = shutdown.wait() => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topic_refs)
        .map_err(|e| SinkError::Kafka(KafkaClientError::Broker(e)))?;
    readiness.sink_ready.store(true, Ordering::Relaxed);
    tracing::info!(topics = ?topics, group = %sink_cfg.group_id, "sink consuming");
    for mp in &sink_cfg.mappings {
        metrics::gauge!(m::SINK_MAPPING_INFO, m::MAPPING_LABEL => mp.name.clone(), m::TOPIC_LABEL => mp.topic.clone())
            .set(1.0);
    }
    let done_offsets: Applied = Arc::default();
    let _lag = {
        let (consumer, topics, applied) = (
            Arc::downgrade(&consumer),
            topics.clone(),
            done_offsets.clone(),
        );
        crate::shutdown::AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(LAG_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(c) = consumer.upgrade() else {
                    return;
                };
                let (t, a) = (topics.clone(), applied.clone());
                // Off the async threads; a slow broker answer only delays the gauge.
                let measured = tokio::task::spawn_blocking(move || {
                    record_lag(&c, &t, &a);
                    release(c);
                });
                if let Err(e) = measured.await {
                    tracing::debug!(error = %e, "consumer lag measurement failed");
                }
            }
        }))
    };
    // Out of the group for too long: the consumer is replaced (see `kafka::REJOIN_DEADLINE`).
    let mut membership_tick = tokio::time::interval(LAG_INTERVAL);
    membership_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let batch_timeout = Duration::from_millis(sink_cfg.batch_timeout_ms);
    let bounds = (sink_cfg.batch_size, sink_cfg.batch_max_bytes);
    let fanout = Fanout::of_mappings(&sink_cfg.mappings);
    // What arrived while the previous batch was written: the start of the next one.
    let mut carry = Carry::default();
    'outer: loop {
        // Under a steady stream the carry is never empty, and a batch taken from it never waits
        // on the select below: the shutdown is looked at here, between batches, too.
        if shutdown.is_triggered() {
            break 'outer;
        }
        let dropped = carry.forget(&consumer.context().take_revoked());
        if dropped > 0 {
            tracing::info!(
                messages = dropped,
                "messages of revoked partitions dropped from the next batch: their new owner applies them"
            );
        }
        // Gather a batch: what was carried over, else block for the first message; then fill
        // until size, bytes or timeout.
        let first = match carry.pop() {
            Some(m) => m,
            None => {
                let r = tokio::select! {
                    biased;
                    // PRIORITY 1: shutdown.
                    () = shutdown.wait() => break 'outer,
                    // PRIORITY 2: the group membership, while nothing arrives.
                    _ = membership_tick.tick() => {
                        if let Some(reason) = consumer.context().auth_failure() {
                            return Err(SinkError::Kafka(KafkaClientError::Auth { reason }));
                        }
                        let out = consumer.context().out_for(Instant::now());
                        if out >= crate::kafka::REJOIN_DEADLINE {
                            tracing::warn!(group = %sink_cfg.group_id, out_s = out.as_secs(), "the sink's kafka consumer has not rejoined its group: recreating it");
                            return Err(SinkError::Kafka(KafkaClientError::OutOfGroup { after_s: out.as_secs() }));
                        }
                        continue 'outer;
                    }
                    // PRIORITY 3: input.
                    r = consumer.recv() => r,
                };
                match r {
                    Ok(m) => m.detach(),
                    // The brokers refuse the password (rotated on their side): a definite
                    // stop that says so, not a consume error retried for ever.
                    Err(e)
                        if matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::Authentication)
                        ) =>
                    {
                        let reason = consumer
                            .context()
                            .auth_failure()
                            .unwrap_or_else(|| e.to_string());
                        return Err(SinkError::Kafka(KafkaClientError::Auth { reason }));
                    }
                    Err(e) => {
                        let e = SinkError::Kafka(KafkaClientError::Broker(e));
                        let Verdict::RetryIn(delay) = retry.failed("kafka consume error", &e)
                        else {
                            return Err(e);
                        };
                        tokio::select! {
                            () = shutdown.wait() => break 'outer,
                            () = tokio::time::sleep(delay) => {}
                        }
                        continue;
                    }
                }
            }
        };
        // Counted as the statements they become (`Fanout`).
        let mut weight = fanout.of(&first);
        let mut bytes = message_bytes(&first) * weight;
        let mut batch = vec![first];
        while weight < bounds.0
            && bytes < bounds.1
            && let Some(m) = carry.pop()
        {
            let f = fanout.of(&m);
            weight += f;
            bytes += message_bytes(&m) * f;
            batch.push(m);
        }
        if carry.paused && !carry.is_full(bounds) {
            resume_assigned(&consumer);
            carry.paused = false;
        }
        if carry.is_empty() {
            let deadline = tokio::time::Instant::now() + batch_timeout;
            // Past the deadline `timeout_at` still takes a message that is already queued, so a
            // backlog fills the batch up to its bounds.
            while weight < bounds.0 && bytes < bounds.1 {
                match tokio::time::timeout_at(deadline, consumer.recv()).await {
                    Ok(Ok(m)) => {
                        let m = m.detach();
                        let f = fanout.of(&m);
                        weight += f;
                        bytes += message_bytes(&m) * f;
                        batch.push(m);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "kafka consume error while filling a batch");
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        tracing::debug!(messages = batch.len(), bytes, "batch received");
        // Apply, retrying transient failures until they pass (offsets do not move meanwhile).
        // The consumer is polled meanwhile, however long that takes: librdkafka leaves the group
        // when it is not polled within max.poll.interval.ms (a rebalance, and the batch applied
        // twice). What arrives is carried into the next batch; at the bounds, the assigned
        // partitions are paused, and polling them only keeps the membership alive.
        let applied = {
            let work = apply_until_done(sink, &batch, retry, shutdown);
            tokio::pin!(work);
            loop {
                tokio::select! {
                    biased;
                    r = &mut work => break r,
                    r = consumer.recv() => match r {
                        Ok(m) => {
                            carry.push(m.detach(), consumer.context().revocation_mark());
                            if carry.is_full(bounds) {
                                carry.paused = pause_assigned(&consumer) || carry.paused;
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "kafka consume error while a batch is written");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    },
                }
            }
        };
        if !applied? {
            break 'outer;
        }
        let mut tpl = TopicPartitionList::new();
        let mut highest: HashMap<(String, i32), i64> = HashMap::new();
        for msg in &batch {
            let e = highest
                .entry((msg.topic().to_string(), msg.partition()))
                .or_insert(-1);
            *e = (*e).max(msg.offset());
        }
        for ((t, p), o) in highest {
            tpl.add_partition_offset(&t, p, rdkafka::Offset::Offset(o + 1))
                .map_err(|e| SinkError::Kafka(KafkaClientError::Broker(e)))?;
        }
        if let Err(e) = consumer.store_offsets(&tpl) {
            // A partition revoked meanwhile: its new owner re-applies (idempotent), nothing lost.
            tracing::warn!(error = %e, "storing offsets failed");
        }
        if let Ok(mut a) = done_offsets.lock() {
            for el in tpl.elements() {
                if let Some(o) = el.offset().to_raw() {
                    a.insert((el.topic().to_string(), el.partition()), o);
                }
            }
        }
    }
    readiness.sink_ready.store(false, Ordering::Relaxed);
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        tracing::warn!(error = %e, "final offset commit failed; the last batch will be re-applied (idempotent)");
    }
    tracing::info!("sink stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::Timestamp;

    fn message(offset: i64, payload_len: usize) -> OwnedMessage {
        OwnedMessage::new(
            Some(vec![0; payload_len]),
            Some(vec![1, 2]),
            "t".into(),
            Timestamp::NotAvailable,
            0,
            offset,
            None,
        )
    }

    fn change(key: i32, version: &str) -> Arc<DecodedEvent> {
        Arc::new(DecodedEvent {
            op: crate::events::Op::Update,
            key: bson::doc! { "id": key },
            before: None,
            after: Some(bson::doc! { "id": key }),
            version: version.into(),
            source_ts_ms: None,
            read_ts_ms: None,
            old_key: None,
            new_key: None,
        })
    }

    #[test]
    fn the_collapse_keeps_the_highest_version_per_key_not_the_last_arrival() {
        let entries = vec![
            (0, 0, change(1, "0000000002.000000000000100.000000000")),
            (0, 1, change(1, "0000000001.000000000000900.000000000")),
            (0, 2, change(2, "0000000001.000000000000100.000000000")),
            (1, 2, change(1, "0000000001.000000000000100.000000000")),
        ];
        assert_eq!(
            newest_per_key(&entries, |_, _| false),
            vec![true, false, true, true],
            "key 1 of mapping 0: the higher version arrived first and wins"
        );
    }

    #[test]
    fn a_delete_that_its_mapping_keeps_does_not_collapse_the_update_before_it_away() {
        let mut delete = (*change(1, "0000000001.000000000000200.000000000")).clone();
        delete.op = crate::events::Op::Delete;
        let entries = vec![
            (0, 0, change(1, "0000000001.000000000000100.000000000")),
            (0, 1, Arc::new(delete)),
        ];
        let keep_policy = |_: usize, ev: &DecodedEvent| ev.op == crate::events::Op::Delete;
        assert_eq!(
            newest_per_key(&entries, keep_policy),
            vec![true, false],
            "the update lands, as it would in a batch of its own"
        );
        assert_eq!(newest_per_key(&entries, |_, _| false), vec![false, true]);
    }

    #[test]
    fn the_carry_drops_messages_of_a_partition_revoked_after_they_came_and_keeps_later_ones() {
        let mut c = Carry::default();
        let on = |partition: i32, offset: i64| {
            OwnedMessage::new(
                Some(vec![0; 4]),
                None,
                "t".into(),
                Timestamp::NotAvailable,
                partition,
                offset,
                None,
            )
        };
        c.push(on(0, 1), 0);
        c.push(on(1, 1), 0);
        // Partition 0 revoked (revocation 1), then assigned again: offset 1 comes again.
        c.push(on(0, 1), 1);
        let revoked = HashMap::from([(("t".to_string(), 0), 1)]);
        assert_eq!(c.forget(&revoked), 1);
        let left: Vec<(i32, i64)> = std::iter::from_fn(|| c.pop())
            .map(|m| (m.partition(), m.offset()))
            .collect();
        assert_eq!(left, vec![(1, 1), (0, 1)]);
        assert_eq!(c.bytes, 0, "the bytes of the dropped message went with it");
        assert_eq!(c.forget(&HashMap::new()), 0);
    }

    #[test]
    fn the_carry_keeps_arrival_order_and_counts_key_and_value_bytes() {
        let mut c = Carry::default();
        c.push(message(7, 10), 0);
        c.push(message(8, 20), 0);
        assert_eq!(c.bytes, 12 + 22);
        assert_eq!(c.pop().map(|m| m.offset()), Some(7));
        assert_eq!(c.bytes, 22);
        assert_eq!(c.pop().map(|m| m.offset()), Some(8));
        assert!(c.is_empty() && c.bytes == 0 && c.pop().is_none());
    }

    #[test]
    fn the_carry_is_full_at_either_bound() {
        let mut c = Carry::default();
        c.push(message(1, 8), 0);
        assert!(!c.is_full((2, 100)));
        assert!(c.is_full((1, 100)), "message bound");
        assert!(c.is_full((2, 10)), "byte bound (8 + 2 key bytes)");
        assert!(!c.is_full((2, 11)));
    }
}
