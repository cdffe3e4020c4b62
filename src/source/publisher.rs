//! The producer side of a session: encodes changes, registers their schemas, and produces them
//! with the source position in Kafka transactions (see the module note of `source`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

use super::SourceError;
use super::retention::Committed;
use crate::config::Config;
use crate::events::avro::{TableAvro, encode_envelope, encode_key};
use crate::events::registry::{Registry, RegistryError, frame_into};
use crate::events::{
    ChangeEvent, HEADER_EPOCH, HEADER_NEW_KEY, HEADER_OLD_KEY, HEADER_READ_TS, HEADER_SOURCE_TS,
    Op, TableSchema, Value,
};
use crate::kafka::{KafkaClientError, MAX_MESSAGE_BYTES, client_config};
use crate::metrics as m;
use crate::offsets::SourceOffset;
use tokio::sync::watch;

pub(super) struct TableState {
    topic: String,
    /// `db.table`, the metrics' `table` label.
    table: String,
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
pub(super) type TxProducer = Arc<ThreadedProducer<DefaultProducerContext>>;

/// The producer side: encodes, registers schemas, produces in Kafka transactions.
pub(super) struct Publisher {
    pub(super) cfg: Arc<Config>,
    pub(super) producer: TxProducer,
    pub(super) registry: Registry,
    pub(super) states: HashMap<usize, (Arc<TableSchema>, Arc<TableState>)>,
    pub(super) last_shapes: HashMap<String, Arc<TableSchema>>,
    pub(super) open: bool,
    pub(super) key_buf: Vec<u8>,
    pub(super) val_buf: Vec<u8>,
    pub(super) datum: Vec<u8>,
    pub(super) events_since_commit: u64,
    /// Bytes of records (keys and values) produced in the open transaction.
    pub(super) bytes_since_commit: u64,
    /// When the open transaction began.
    pub(super) opened_at: Instant,
    /// Streamed (not snapshot) changes in the open transaction, and the transactions this
    /// producer committed with any (the `source.commit` test pause point counts them).
    pub(super) streamed_since_commit: u64,
    pub(super) streamed_commits: u64,
    /// How long the last commit took (it sizes the next transaction, see [`pump`]).
    pub(super) last_commit_took: Duration,
    /// Events per table since the last commit (metrics are emitted per commit, not per row).
    pub(super) counts: HashMap<String, u64>,
    /// MySQL time of the last streamed (not snapshot) change published.
    pub(super) last_change_ts_ms: i64,
    /// Each committed position, for the binlog retention poller.
    pub(super) progress: Arc<watch::Sender<Option<Committed>>>,
    /// The shape of a keyless table keyed by `source.message_key_columns`, per shape read
    /// (see [`Publisher::with_message_key`]); the shape read is held too, so that its address
    /// (the map's key) is never reused by another shape.
    pub(super) message_keyed: HashMap<usize, (Arc<TableSchema>, Option<Arc<TableSchema>>)>,
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
        // The two subjects are registered concurrently: a new table costs one registry round
        // trip, not two (1,000 tables: BENCHMARKS.md, "Scale").
        let (key_subject, value_subject) = (format!("{topic}-key"), format!("{topic}-value"));
        let reg = futures::future::try_join(
            self.registry.register(&key_subject, &avro.key_json),
            self.registry.register(&value_subject, &avro.value_json),
        );
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
            table: schema.qualified_name(),
            key_id,
            value_id,
        });
        self.states.insert(ptr, (schema.clone(), st.clone()));
        Ok(st)
    }

    pub(super) fn begin(&mut self) -> Result<(), SourceError> {
        if !self.open {
            self.producer
                .begin_transaction()
                .map_err(|e| self.explain(e))?;
            self.open = true;
            self.opened_at = Instant::now();
            self.bytes_since_commit = 0;
        }
        Ok(())
    }

    /// How long the open transaction has been open (`None`: none is).
    pub(super) fn open_for(&self) -> Option<Duration> {
        self.open.then(|| self.opened_at.elapsed())
    }

    /// The tables with changes in the open transaction, sorted.
    pub(super) fn open_tables(&self) -> Vec<String> {
        let mut t: Vec<String> = self.counts.keys().cloned().collect();
        t.sort();
        t
    }

    /// Produces one record, waiting while librdkafka's queue is full (backpressure).
    async fn produce(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<(), SourceError> {
        let bytes = key.map_or(0, <[u8]>::len) + payload.map_or(0, <[u8]>::len);
        if bytes > MAX_MESSAGE_BYTES {
            return Err(SourceError::RecordTooLarge {
                topic: topic.to_string(),
                bytes,
                limit: MAX_MESSAGE_BYTES,
            });
        }
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

    /// `schema` keyed by its `source.message_key_columns`, if it has some (the same `Arc` for
    /// every event of one shape, so schemas are registered once per shape). Only the Kafka key
    /// changes: reading and paging the table keep its own (empty) primary key.
    fn with_message_key(
        &mut self,
        schema: &Arc<TableSchema>,
    ) -> Result<Option<Arc<TableSchema>>, SourceError> {
        // Per event: nothing configured costs one check, a shape already seen one lookup.
        let Some(src) = self
            .cfg
            .source
            .as_ref()
            .filter(|s| !s.message_key_columns.is_empty())
        else {
            return Ok(None);
        };
        let ptr = Arc::as_ptr(schema) as usize;
        if let Some((_, keyed)) = self.message_keyed.get(&ptr) {
            return Ok(keyed.clone());
        }
        let Some(cols) = src.message_key_columns.get(&schema.qualified_name()) else {
            self.message_keyed.insert(ptr, (schema.clone(), None));
            return Ok(None);
        };
        let refuse = |detail: String| SourceError::MessageKey {
            table: schema.qualified_name(),
            detail,
        };
        if !schema.key.is_empty() {
            return Err(refuse(
                "the table has a primary key, which is its message key: remove it from source.message_key_columns".into(),
            ));
        }
        let mut key = Vec::with_capacity(cols.len());
        for c in cols {
            let i = schema
                .columns
                .iter()
                .position(|col| &col.name == c)
                .ok_or_else(|| {
                    let names: Vec<&str> = schema.columns.iter().map(|c| c.name.as_str()).collect();
                    refuse(format!(
                        "it has no column `{c}` (its columns: {}): fix source.message_key_columns",
                        names.join(", ")
                    ))
                })?;
            key.push(i);
        }
        let keyed = Arc::new(TableSchema {
            key,
            ..schema.as_ref().clone()
        });
        self.message_keyed
            .insert(ptr, (schema.clone(), Some(keyed.clone())));
        Ok(Some(keyed))
    }

    pub(super) async fn publish(&mut self, mut ev: ChangeEvent) -> Result<(), SourceError> {
        if ev.source.snapshot == "false" {
            self.streamed_since_commit += 1;
        }
        if let Some(keyed) = self.with_message_key(&ev.schema)? {
            ev.schema = keyed;
        }
        self.begin()?;
        let st = self.state_for(&ev.schema).await?;
        let now_ms = crate::events::now_ms();
        if ev.source.snapshot == "false" && ev.source.ts_ms > 0 {
            self.last_change_ts_ms = ev.source.ts_ms;
        }
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
        *self.counts.entry(st.table.clone()).or_default() += 1;
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
        self.bytes_since_commit += (record_key.map_or(0, <[u8]>::len) + val.len()) as u64;
        self.key_buf = key;
        self.val_buf = val;
        self.events_since_commit += 1;
        Ok(())
    }

    /// Writes `offset` and commits the open transaction (opening one if needed).
    pub(super) async fn commit(&mut self, offset: &SourceOffset) -> Result<(), SourceError> {
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
        if self.streamed_since_commit > 0 {
            crate::failpoint::pause_if_armed("source.commit", self.streamed_commits + 1).await;
        }
        let started = Instant::now();
        let limit = self.commit_deadline();
        let deadline = started + limit;
        // rdkafka's commit_transaction flushes first, and its flush polls in whole 100 ms
        // rounds whenever anything is still in flight: every commit took >= 100 ms
        // (ecst_source_commit_seconds). Waiting for the acknowledgements here, in 1 ms steps,
        // lets that flush find nothing to do.
        let mut warned = false;
        while self.producer.in_flight_count() > 0 && Instant::now() < deadline {
            if !warned && started.elapsed() >= SLOW_COMMIT_WARNING {
                warned = true;
                tracing::warn!(
                    unacknowledged = self.producer.in_flight_count(),
                    waited_s = started.elapsed().as_secs(),
                    deadline_s = limit.as_secs(),
                    "kafka has not acknowledged this transaction's records yet: waiting up to the commit deadline"
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let timed_out = |p: &TxProducer| {
            SourceError::Kafka(KafkaClientError::CommitTimedOut {
                after_s: limit.as_secs(),
                unacknowledged: p.in_flight_count(),
            })
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out(&self.producer));
        }
        let p = self.producer.clone();
        let result = tokio::task::spawn_blocking(move || p.commit_transaction(left))
            .await
            .map_err(|e| SourceError::Task(e.to_string()))?;
        match result {
            Ok(()) => {}
            // librdkafka's own timeout (retriable): the same deadline passed.
            Err(KafkaError::Transaction(e)) if e.code() == RDKafkaErrorCode::OperationTimedOut => {
                return Err(timed_out(&self.producer));
            }
            Err(e) => return Err(self.explain(e)),
        }
        self.last_commit_took = started.elapsed();
        metrics::histogram!(m::SOURCE_COMMIT_SECONDS).record(self.last_commit_took.as_secs_f64());
        self.open = false;
        if self.streamed_since_commit > 0 {
            self.streamed_commits += 1;
        }
        self.streamed_since_commit = 0;
        self.events_since_commit = 0;
        self.bytes_since_commit = 0;
        metrics::counter!(m::SOURCE_TRANSACTIONS_TOTAL).increment(1);
        for (table, n) in self.counts.drain() {
            metrics::counter!(m::SOURCE_EVENTS_TOTAL, m::TABLE_LABEL => table).increment(n);
        }
        self.progress.send_replace(Some(Committed {
            position: offset.position.clone(),
            commit_ts_ms: self.last_change_ts_ms,
        }));
        metrics::gauge!(m::SOURCE_BINLOG_POS).set(offset.position.pos as f64);
        if let Some(seq) = offset.position.file_seq() {
            metrics::gauge!(m::SOURCE_BINLOG_FILE).set(seq as f64);
        }
        Ok(())
    }

    /// How long one commit may take: [`COMMIT_DEADLINE`], or half the transaction timeout when
    /// that is shorter (the broker must not abort the transaction first).
    fn commit_deadline(&self) -> Duration {
        let timeout = self
            .cfg
            .source
            .as_ref()
            .map_or(300_000, |s| s.transaction_timeout_ms);
        COMMIT_DEADLINE.min(Duration::from_millis(timeout / 2))
    }

    /// Whether the open transaction is past the bounds a split point applies
    /// (`source.max_transaction_bytes`, or open for a quarter of the transaction timeout).
    pub(super) fn too_large(&self) -> bool {
        let Some(src) = self.cfg.source.as_ref() else {
            return false;
        };
        self.open
            && (self.bytes_since_commit >= src.max_transaction_bytes
                || self.opened_at.elapsed()
                    >= Duration::from_millis(src.transaction_timeout_ms / 4))
    }

    /// Aborts the open transaction with this producer and says how it went: after a failed
    /// commit, an abort that fails on a fence is the fence (see `source::run`).
    pub(super) async fn try_abort(&mut self) -> Result<(), SourceError> {
        if !self.open {
            return Ok(());
        }
        let p = self.producer.clone();
        let aborted =
            tokio::task::spawn_blocking(move || p.abort_transaction(Duration::from_secs(30)))
                .await
                .map_err(|e| SourceError::Task(e.to_string()))?;
        self.open = false;
        self.streamed_since_commit = 0;
        aborted.map_err(|e| self.explain(e))
    }

    pub(super) async fn abort(&mut self) {
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
        self.streamed_since_commit = 0;
    }
}

/// How long one commit (the acknowledgements of the transaction's records, then its end
/// marker) may take before the transaction is abandoned and the session restarts: a broker that
/// takes no data and closes nothing (a half-open connection) is otherwise only noticed after
/// librdkafka's delivery timeout (the transaction timeout, 300 s by default).
const COMMIT_DEADLINE: Duration = Duration::from_secs(60);

/// A commit still waiting after this is logged, once.
const SLOW_COMMIT_WARNING: Duration = Duration::from_secs(5);

/// Creates the transactional producer and fences older instances with the same name.
pub(super) async fn transactional_producer(cfg: &Config) -> Result<TxProducer, SourceError> {
    let mut cc = client_config(&cfg.kafka);
    cc.set("transactional.id", format!("ecst-source-{}", cfg.name))
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("message.max.bytes", MAX_MESSAGE_BYTES.to_string())
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set(
            "transaction.timeout.ms",
            cfg.source
                .as_ref()
                .map_or(300_000, |s| s.transaction_timeout_ms)
                .to_string(),
        )
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
