//! `ecst reconcile [--mapping NAME] [--repair]`: finds the copies in MongoDB that differ from the
//! source's current rows, and repairs them through the sink's own guarded writes.
//!
//! **The truth is the change topic.** Each mapping's topic is read from its beginning to the end
//! it had when the command started (`read_committed`, every partition, through the sink's own
//! decoder), keeping per key the change with the highest version: the row as the source last
//! published it, or its delete. Reading the topic rather than MySQL needs only what a sink
//! needs (Kafka, the registry, MongoDB), and compares values decoded exactly as the sink decodes
//! them, so a DECIMAL or a DATETIME never differs by representation. It needs the topic to hold
//! every key's latest change. Kafka's default retention deletes records after 7 days, and a
//! key whose records were deleted shows as "no change in the topic"; keep change topics with
//! `retention.ms = -1` where reconcile is used. (Compaction would keep the latest change per key
//! with less space, but a compacted topic refuses null-keyed records, which TRUNCATE events and
//! rows of tables without a primary key are; so ecst does not create its topics compacted.)
//! Memory grows with the number of keys (one decoded change each).
//!
//! **What is compared.** Every parent (or mirrored document) of the mapping's collection that
//! holds the match field, against the projection of the latest row of its key:
//! - *ok*: the copy equals the projection (field order aside), or, for a deleted row, the copy is
//!   what the mapping's `on_delete` leaves (kept, unset to the match field, or marked);
//! - *stale*: the copy differs from its row;
//! - *missing*: the parent names an existing row but holds no copy of it (no copy, or only the
//!   match field); for a document mapping, a row without its document;
//! - *orphaned*: a copy of a row that no longer exists (deleted or truncated in the topic, and not
//!   in the state `on_delete` gives), or of a key with no change in the topic at all.
//!
//! **Repair** re-applies the latest change of each drifted key through [`Mapping::for_repair`]:
//! the statements the sink would write, whose guard also takes copies at that change's own
//! version (a copy edited behind ecst's back keeps its version), and still never one a newer
//! change wrote meanwhile, so a sink running beside the repair is never overtaken. A key with no
//! change in the topic cannot be repaired (nothing says what its copy should be): it is reported
//! and left. After repairing, the collection is compared again and that result is printed; the
//! command exits 0 only when nothing is left.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bson::{Bson, Document, doc};
use futures::TryStreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::{Config, DeletePolicy, MappingConfig, MappingKind, TruncatePolicy};
use crate::events::Op;
use crate::events::registry::Registry;
use crate::kafka::committed_reader_config;
use crate::sink::SinkError;
use crate::sink::decode::{DecodedEvent, decode_message};
use crate::sink::mapping::{DELETED_FIELD, Mapping, VERSION_FIELD};
use crate::sink::mongo::{MongoWriter, Tagged};

/// Samples printed per class.
const SAMPLES: usize = 5;
/// A progress line at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long reading a topic may go without any message or end-of-partition.
const READ_STALL: Duration = Duration::from_secs(60);

/// What to do.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only this mapping (default: every mapping).
    pub mapping: Option<String>,
    /// Repair what differs.
    pub repair: bool,
}

/// Errors of `ecst reconcile`.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The configuration has no `[sink]` or `[mongo]`.
    #[error("reconcile needs [sink] and [mongo] in the configuration")]
    NotConfigured,
    /// `--mapping` names no mapping.
    #[error("no mapping named `{0}` in sink.mappings")]
    UnknownMapping(String),
    /// Reading a change topic failed.
    #[error("kafka, topic `{topic}`: {detail}")]
    Kafka {
        /// Topic.
        topic: String,
        /// What failed.
        detail: String,
    },
    /// The registry could not be set up or does not answer.
    #[error("schema registry: {0}")]
    Registry(String),
    /// MongoDB failed.
    #[error("{0}")]
    Sink(#[from] SinkError),
}

/// The report of one run: its text, and whether nothing is left to repair.
#[derive(Debug)]
pub struct Report {
    /// What was found (and repaired), for the terminal.
    pub text: String,
    /// Every copy is as its row says (after the repair, when repairing).
    pub clean: bool,
}

/// The latest change of one key in the topic.
#[derive(Debug, Clone)]
enum Latest {
    /// The row as last published.
    Row(DecodedEvent),
    /// The row's delete (or a TRUNCATE of its table, carried as that event).
    Gone(DecodedEvent),
}

impl Latest {
    fn event(&self) -> &DecodedEvent {
        match self {
            Latest::Row(e) | Latest::Gone(e) => e,
        }
    }
}

/// A mapping's topic, folded to its latest change per key.
struct TopicState {
    keys: HashMap<String, Latest>,
    messages: u64,
    undecodable: u64,
}

/// The verdict on one copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Class {
    Ok,
    Stale,
    Missing,
    Orphaned,
}

/// Counts and samples of one comparison.
#[derive(Default)]
struct Tally {
    checked: u64,
    counts: HashMap<Class, u64>,
    samples: HashMap<Class, Vec<String>>,
    /// Keys to repair (those with a change in the topic).
    repair: Vec<String>,
    /// Drifted copies of keys with no change in the topic.
    unrepairable: u64,
}

impl Tally {
    fn add(&mut self, class: Class, key: &str, repairable: bool, sample: impl FnOnce() -> String) {
        self.checked += 1;
        *self.counts.entry(class).or_default() += 1;
        if class == Class::Ok {
            return;
        }
        let s = self.samples.entry(class).or_default();
        if s.len() < SAMPLES {
            s.push(sample());
        }
        if repairable {
            self.repair.push(key.to_string());
        } else {
            self.unrepairable += 1;
        }
    }

    fn count(&self, c: Class) -> u64 {
        self.counts.get(&c).copied().unwrap_or(0)
    }

    fn drift(&self) -> u64 {
        self.count(Class::Stale) + self.count(Class::Missing) + self.count(Class::Orphaned)
    }

    fn line(&self, what: &str) -> String {
        format!(
            "  {what} {}: ok {}, stale {}, missing {}, orphaned {}\n",
            self.checked,
            self.count(Class::Ok),
            self.count(Class::Stale),
            self.count(Class::Missing),
            self.count(Class::Orphaned),
        )
    }

    fn samples_text(&self) -> String {
        let mut out = String::new();
        for (c, name) in [
            (Class::Stale, "stale"),
            (Class::Missing, "missing"),
            (Class::Orphaned, "orphaned"),
        ] {
            if let Some(s) = self.samples.get(&c) {
                out.push_str(&format!("    {name}: {}\n", s.join("; ")));
            }
        }
        out
    }
}

/// Runs `ecst reconcile`.
pub async fn run(cfg: &Config, opts: &Options) -> Result<Report, ReconcileError> {
    let (Some(sink), Some(mongo)) = (cfg.sink.as_ref(), cfg.mongo.as_ref()) else {
        return Err(ReconcileError::NotConfigured);
    };
    let selected: Vec<&MappingConfig> = sink
        .mappings
        .iter()
        .filter(|m| opts.mapping.as_deref().is_none_or(|n| n == m.name))
        .collect();
    if let Some(name) = &opts.mapping
        && selected.is_empty()
    {
        return Err(ReconcileError::UnknownMapping(name.clone()));
    }
    let registry =
        crate::app::registry(cfg).map_err(|e| ReconcileError::Registry(e.to_string()))?;
    let writer = MongoWriter::connect(mongo.uri.expose(), &mongo.database).await?;
    crate::sink::server_supports(&writer, &sink.mappings)?;
    let mut text = String::new();
    let mut clean = true;
    let mut states: HashMap<String, TopicState> = HashMap::new();
    for m in selected {
        if !states.contains_key(&m.topic) {
            let st = latest_per_key(cfg, &registry, m).await?;
            states.insert(m.topic.clone(), st);
        }
        let Some(state) = states.get(&m.topic) else {
            continue;
        };
        let mapping = Mapping::new(m.clone());
        text.push_str(&format!(
            "mapping {} ({}, collection {}, topic {}): {} keys in the topic ({} messages, {} undecodable: see the dead-letter topic)\n",
            m.name,
            describe(m),
            m.collection,
            m.topic,
            state.keys.len(),
            state.messages,
            state.undecodable,
        ));
        let tally = compare(&writer, &mapping, state).await?;
        let what = if m.kind == MappingKind::Document {
            "documents"
        } else {
            "copies"
        };
        text.push_str(&tally.line(what));
        text.push_str(&tally.samples_text());
        if tally.drift() == 0 {
            continue;
        }
        if !opts.repair {
            clean = false;
            continue;
        }
        let statements = repair(&writer, m, state, &tally.repair).await?;
        text.push_str(&format!(
            "  repaired {} keys ({statements} statements); left: {} copies of keys with no change in the topic (nothing says what they should be: fix or remove those parents)\n",
            tally.repair.iter().collect::<HashSet<_>>().len(),
            tally.unrepairable,
        ));
        let after = compare(&writer, &mapping, state).await?;
        text.push_str(&after.line(&format!("after the repair, {what}")));
        text.push_str(&after.samples_text());
        clean &= after.drift() == 0;
    }
    writer.close().await;
    Ok(Report { text, clean })
}

/// The mapping's shape in one phrase.
fn describe(m: &MappingConfig) -> String {
    match m.kind {
        MappingKind::Document => "document".into(),
        MappingKind::Embedded => format!(
            "embedded at {} by {}",
            m.target_path.as_deref().unwrap_or_default(),
            m.match_path.as_deref().unwrap_or_default()
        ),
    }
}

/// A key's identity for lookups: numbers by value (a parent may hold `1` as an int32 where the
/// key is an int64, and MongoDB matches them), everything else as canonical extended JSON.
fn key_string(b: &Bson) -> String {
    match b {
        Bson::Int32(i) => format!("n:{i}"),
        Bson::Int64(i) => format!("n:{i}"),
        Bson::Double(d) if d.fract() == 0.0 && d.abs() < 9.0e15 => format!("n:{}", *d as i64),
        other => other.clone().into_canonical_extjson().to_string(),
    }
}

/// The value at a dotted path of `d` (no array traversal).
fn get_path<'d>(d: &'d Document, path: &str) -> Option<&'d Bson> {
    let mut cur = d;
    let mut parts = path.split('.').peekable();
    while let Some(p) = parts.next() {
        let v = cur.get(p)?;
        if parts.peek().is_none() {
            return Some(v);
        }
        cur = v.as_document()?;
    }
    None
}

/// `d` with its keys sorted at every level: copies compare by content, not field order.
fn canonical(b: &Bson) -> Bson {
    match b {
        Bson::Document(d) => {
            let mut keys: Vec<&String> = d.keys().collect();
            keys.sort();
            let mut out = Document::new();
            for k in keys {
                if let Some(v) = d.get(k) {
                    out.insert(k.clone(), canonical(v));
                }
            }
            Bson::Document(out)
        }
        Bson::Array(a) => Bson::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

fn same(a: &Document, b: &Document) -> bool {
    canonical(&Bson::Document(a.clone())) == canonical(&Bson::Document(b.clone()))
}

/// Reads `m.topic` to its end as of now and folds it to the latest change per key.
async fn latest_per_key(
    cfg: &Config,
    registry: &Registry,
    m: &MappingConfig,
) -> Result<TopicState, ReconcileError> {
    let mapping = Mapping::new(m.clone());
    let topic = m.topic.clone();
    let kafka_err = |detail: String| ReconcileError::Kafka {
        topic: topic.clone(),
        detail,
    };
    let mut cc = committed_reader_config(&cfg.kafka, format!("{}-reconcile", cfg.name));
    cc.set("enable.partition.eof", "true");
    // The blocking reader hands messages over a bounded channel: memory holds the folded state,
    // not the topic.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<rdkafka::message::OwnedMessage>(1024);
    let t = topic.clone();
    let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let consumer: BaseConsumer = cc.create().map_err(|e| e.to_string())?;
        let md = consumer
            .fetch_metadata(Some(&t), Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let partitions: Vec<i32> = md
            .topics()
            .first()
            .map(|x| x.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        if partitions.is_empty() {
            return Err("the topic does not exist (has the source run?)".into());
        }
        let mut tpl = TopicPartitionList::new();
        let mut open = HashSet::new();
        for p in partitions {
            let (low, high) = consumer
                .fetch_watermarks(&t, p, Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            if high > low {
                tpl.add_partition_offset(&t, p, Offset::Beginning)
                    .map_err(|e| e.to_string())?;
                open.insert(p);
            }
        }
        if open.is_empty() {
            return Ok(());
        }
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let mut progress_at = Instant::now();
        while !open.is_empty() {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(msg)) => {
                    progress_at = Instant::now();
                    if tx.blocking_send(msg.detach()).is_err() {
                        return Ok(());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    open.remove(&p);
                }
                Some(Err(e)) => return Err(e.to_string()),
                None if progress_at.elapsed() > READ_STALL => {
                    return Err(format!(
                        "no progress reading the topic for {} s",
                        READ_STALL.as_secs()
                    ));
                }
                None => {}
            }
        }
        Ok(())
    });
    let mut st = TopicState {
        keys: HashMap::new(),
        messages: 0,
        undecodable: 0,
    };
    let mut said = Instant::now();
    while let Some(msg) = rx.recv().await {
        st.messages += 1;
        if said.elapsed() >= PROGRESS_EVERY {
            said = Instant::now();
            tracing::info!(topic = %topic, messages = st.messages, keys = st.keys.len(), "reading the change topic");
        }
        let headers = crate::sink::headers_of(&msg);
        let ev = match decode_message(registry, msg.key(), msg.payload(), &headers).await {
            Ok(Some(ev)) => ev,
            // A tombstone: its delete came just before it.
            Ok(None) => continue,
            Err(e) => {
                st.undecodable += 1;
                tracing::warn!(topic = %topic, partition = msg.partition(), offset = msg.offset(), error = %e, "a message that does not decode is left out");
                continue;
            }
        };
        fold(&mapping, &mut st.keys, ev);
    }
    reader
        .await
        .map_err(|e| kafka_err(e.to_string()))?
        .map_err(kafka_err)?;
    Ok(st)
}

/// Folds one change into the per-key state: the highest version wins.
fn fold(mapping: &Mapping, keys: &mut HashMap<String, Latest>, ev: DecodedEvent) {
    if ev.op == Op::Truncate {
        for l in keys.values_mut() {
            if l.event().version < ev.version {
                *l = Latest::Gone(ev.clone());
            }
        }
        return;
    }
    let Ok(key) = mapping.key_value(&ev.key) else {
        return;
    };
    let k = key_string(&key);
    if keys
        .get(&k)
        .is_some_and(|l| l.event().version >= ev.version)
    {
        return;
    }
    let latest = if ev.op == Op::Delete {
        Latest::Gone(ev)
    } else {
        Latest::Row(ev)
    };
    keys.insert(k, latest);
}

/// The verdict on `copy` (what a parent holds at the target, `None`: nothing) of a key whose
/// latest change is `latest`, for the mapping `m`; `match_field` is the key's field inside the
/// copy, when the match path lies inside it.
fn classify(
    m: &Mapping,
    latest: Option<&Latest>,
    copy: Option<&Document>,
    match_field: Option<&str>,
) -> Class {
    let only_key = |c: &Document| match match_field {
        Some(f) => c.keys().all(|k| k == f),
        None => c.is_empty(),
    };
    match latest {
        None => Class::Orphaned,
        Some(Latest::Row(ev)) => {
            let Some(row) = ev.after.as_ref() else {
                return Class::Stale;
            };
            let mut expected = m.project(row);
            if m.cfg.kind == MappingKind::Document {
                expected.remove("_id");
                expected.remove(VERSION_FIELD);
            }
            match copy {
                None => Class::Missing,
                Some(c) if same(c, &expected) => Class::Ok,
                Some(c) if m.cfg.kind == MappingKind::Embedded && only_key(c) => Class::Missing,
                Some(_) => Class::Stale,
            }
        }
        Some(Latest::Gone(ev)) => match (gone_policy(m, ev), copy) {
            (DeletePolicy::Keep, _) => Class::Ok,
            (DeletePolicy::Unset, None) => Class::Ok,
            (DeletePolicy::Unset, Some(c))
                if m.cfg.kind == MappingKind::Embedded && only_key(c) =>
            {
                Class::Ok
            }
            (DeletePolicy::Mark, Some(c)) if c.get_bool(DELETED_FIELD) == Ok(true) => Class::Ok,
            _ => Class::Orphaned,
        },
    }
}

/// What a copy of a row that is gone should look like: `on_truncate` for a TRUNCATE, else
/// `on_delete`.
fn gone_policy(m: &Mapping, ev: &DecodedEvent) -> DeletePolicy {
    if ev.op != Op::Truncate {
        return m.cfg.on_delete;
    }
    match m.cfg.on_truncate {
        TruncatePolicy::Keep => DeletePolicy::Keep,
        TruncatePolicy::Unset => DeletePolicy::Unset,
        TruncatePolicy::Mark => DeletePolicy::Mark,
    }
}

/// Compares the mapping's collection with the topic's state.
async fn compare(
    writer: &MongoWriter,
    m: &Mapping,
    state: &TopicState,
) -> Result<Tally, ReconcileError> {
    let coll = writer.database().collection::<Document>(&m.cfg.collection);
    let mut tally = Tally::default();
    let mut said = Instant::now();
    match m.cfg.kind {
        MappingKind::Document => {
            let mut seen = HashSet::new();
            let mut cursor = coll.find(doc! {}).await.map_err(SinkError::mongo)?;
            while let Some(d) = cursor.try_next().await.map_err(SinkError::mongo)? {
                let Some(id) = d.get("_id") else { continue };
                let k = key_string(id);
                let mut copy = d.clone();
                copy.remove("_id");
                copy.remove(VERSION_FIELD);
                let latest = state.keys.get(&k);
                let class = classify(m, latest, Some(&copy), None);
                seen.insert(k.clone());
                tally.add(class, &k, latest.is_some(), || format!("_id {id}"));
                progress(&mut said, m, tally.checked);
            }
            for (k, latest) in &state.keys {
                if matches!(latest, Latest::Row(_)) && !seen.contains(k) {
                    let class = classify(m, Some(latest), None, None);
                    tally.add(class, k, true, || format!("key {k}: no document"));
                }
            }
        }
        MappingKind::Embedded => {
            let match_path = m.cfg.match_path.clone().unwrap_or_default();
            let target = m.cfg.target_path.clone().unwrap_or_default();
            let mut cursor = coll
                .find(doc! { match_path.as_str(): { "$exists": true } })
                .await
                .map_err(SinkError::mongo)?;
            while let Some(d) = cursor.try_next().await.map_err(SinkError::mongo)? {
                let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                // (parent's element, the copy, its key) for each copy the parent holds.
                let mut copies: Vec<(Option<usize>, Option<&Document>, &Bson)> = Vec::new();
                let match_field;
                match m.array() {
                    Some(a) => {
                        match_field = a
                            .matcher
                            .strip_prefix(a.target.as_str())
                            .and_then(|r| r.strip_prefix('.'))
                            .map(str::to_string);
                        let elems = get_path(&d, &a.array).and_then(Bson::as_array);
                        for (i, e) in elems.into_iter().flatten().enumerate() {
                            let Some(e) = e.as_document() else { continue };
                            if let Some(key) = get_path(e, &a.matcher) {
                                let copy = get_path(e, &a.target).and_then(Bson::as_document);
                                copies.push((Some(i), copy, key));
                            }
                        }
                    }
                    None => {
                        match_field = match_path
                            .strip_prefix(target.as_str())
                            .and_then(|r| r.strip_prefix('.'))
                            .map(str::to_string);
                        if let Some(key) = get_path(&d, &match_path) {
                            let copy = get_path(&d, &target).and_then(Bson::as_document);
                            copies.push((None, copy, key));
                        }
                    }
                }
                for (elem, copy, key) in copies {
                    if matches!(key, Bson::Null) {
                        continue;
                    }
                    let k = key_string(key);
                    let latest = state.keys.get(&k);
                    let class = classify(m, latest, copy, match_field.as_deref());
                    tally.add(class, &k, latest.is_some(), || match elem {
                        Some(i) => format!("_id {id} element {i} (key {key})"),
                        None => format!("_id {id} (key {key})"),
                    });
                }
                progress(&mut said, m, tally.checked);
            }
        }
    }
    Ok(tally)
}

fn progress(said: &mut Instant, m: &Mapping, checked: u64) {
    if said.elapsed() >= PROGRESS_EVERY {
        *said = Instant::now();
        tracing::info!(mapping = %m.cfg.name, checked, "comparing copies");
    }
}

/// Re-applies the latest change of each of `keys` through the repair guard; returns the number of
/// statements written.
async fn repair(
    writer: &MongoWriter,
    m: &MappingConfig,
    state: &TopicState,
    keys: &[String],
) -> Result<usize, ReconcileError> {
    let mapping = Mapping::for_repair(m.clone());
    let mut seen = HashSet::new();
    let mut truncates = HashSet::new();
    let mut stmts: Vec<Tagged> = Vec::new();
    for k in keys {
        if !seen.insert(k) {
            continue;
        }
        let Some(latest) = state.keys.get(k) else {
            continue;
        };
        let ev = latest.event();
        // A TRUNCATE is one statement for every key it removed.
        if ev.op == Op::Truncate && !truncates.insert(ev.version.clone()) {
            continue;
        }
        match mapping.statements(ev) {
            Ok(list) => stmts.extend(list.into_iter().map(|stmt| Tagged { entry: 0, stmt })),
            Err(e) => {
                tracing::warn!(key = %k, error = %e, "this key's change cannot be mapped; left")
            }
        }
    }
    let n = stmts.len();
    for chunk in stmts.chunks(500) {
        let outcome = writer.apply(&m.collection, chunk).await?;
        for (_, error) in outcome.failed {
            tracing::warn!(mapping = %m.name, error = %error, "a repair statement failed");
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyChangePolicy;
    use std::collections::BTreeMap;

    fn users(on_delete: DeletePolicy) -> Mapping {
        Mapping::new(MappingConfig {
            name: "u".into(),
            topic: "t".into(),
            kind: MappingKind::Embedded,
            collection: "purchase_order".into(),
            match_path: Some("user.id".into()),
            target_path: Some("user".into()),
            fields: Some(vec!["id".into(), "email".into()]),
            rename: BTreeMap::new(),
            on_delete,
            on_key_change: KeyChangePolicy::Follow,
            on_truncate: TruncatePolicy::Mark,
            on_error: crate::config::ErrorPolicy::DeadLetter,
        })
    }

    fn change(op: Op, id: i32, email: &str, version: &str) -> DecodedEvent {
        let row = doc! { "id": id, "email": email, "lastname": "x" };
        DecodedEvent {
            op,
            key: doc! { "id": id },
            before: Some(row.clone()),
            after: (op != Op::Delete).then_some(row),
            version: version.into(),
            source_ts_ms: None,
            read_ts_ms: None,
            old_key: None,
            new_key: None,
        }
    }

    #[test]
    fn the_highest_version_of_a_key_wins_whatever_order_the_changes_arrive_in() {
        let m = users(DeletePolicy::Keep);
        let mut keys = HashMap::new();
        fold(&m, &mut keys, change(Op::Update, 1, "new@x", "v3"));
        fold(&m, &mut keys, change(Op::Read, 1, "old@x", "v1"));
        let Some(Latest::Row(ev)) = keys.get("n:1") else {
            panic!("{keys:?}");
        };
        assert_eq!(ev.version, "v3");
        fold(&m, &mut keys, change(Op::Delete, 1, "new@x", "v4"));
        assert!(matches!(keys.get("n:1"), Some(Latest::Gone(_))));
        let mut t = change(Op::Truncate, 0, "", "v9");
        t.key = doc! {};
        fold(&m, &mut keys, change(Op::Read, 2, "b@x", "v2"));
        fold(&m, &mut keys, t);
        assert!(matches!(keys.get("n:2"), Some(Latest::Gone(e)) if e.op == Op::Truncate));
    }

    #[test]
    fn a_copy_is_ok_stale_missing_or_orphaned_by_its_rows_latest_change_and_the_delete_policy() {
        let m = users(DeletePolicy::Mark);
        let row = Latest::Row(change(Op::Update, 1, "a@x", "v2"));
        let key = Some("id");
        // Field order does not matter; a different value does.
        let c = doc! { "email": "a@x", "id": 1 };
        assert_eq!(classify(&m, Some(&row), Some(&c), key), Class::Ok);
        let c = doc! { "id": 1, "email": "drift@x" };
        assert_eq!(classify(&m, Some(&row), Some(&c), key), Class::Stale);
        assert_eq!(classify(&m, Some(&row), None, key), Class::Missing);
        assert_eq!(
            classify(&m, Some(&row), Some(&doc! { "id": 1 }), key),
            Class::Missing
        );
        assert_eq!(classify(&m, None, Some(&c), key), Class::Orphaned);
        let gone = Latest::Gone(change(Op::Delete, 1, "a@x", "v3"));
        let marked = doc! { "id": 1, "email": "a@x", "__deleted": true };
        assert_eq!(classify(&m, Some(&gone), Some(&marked), key), Class::Ok);
        let unmarked = doc! { "id": 1, "email": "a@x" };
        assert_eq!(
            classify(&m, Some(&gone), Some(&unmarked), key),
            Class::Orphaned
        );
        let keep = users(DeletePolicy::Keep);
        assert_eq!(
            classify(&keep, Some(&gone), Some(&unmarked), key),
            Class::Ok
        );
        let unset = users(DeletePolicy::Unset);
        assert_eq!(
            classify(&unset, Some(&gone), Some(&doc! { "id": 1 }), key),
            Class::Ok
        );
        assert_eq!(
            classify(&unset, Some(&gone), Some(&unmarked), key),
            Class::Orphaned
        );
    }

    #[test]
    fn keys_match_across_integer_widths_as_mongodb_matches_them() {
        assert_eq!(key_string(&Bson::Int32(7)), key_string(&Bson::Int64(7)));
        assert_eq!(key_string(&Bson::Double(7.0)), key_string(&Bson::Int64(7)));
        assert_ne!(
            key_string(&Bson::String("7".into())),
            key_string(&Bson::Int64(7))
        );
    }
}
