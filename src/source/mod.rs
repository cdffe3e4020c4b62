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
//! **Backpressure.** The channel is bounded (`source.channel_capacity` rows and
//! `source.channel_max_bytes` of their values) and the producer waits
//! when librdkafka's queue is full, so a Kafka or registry outage pauses the reader with bounded
//! memory.
//!
//! **Continuity.** Before a session resumes, it checks that the stored position was written by
//! this server and is still valid here; if not, it snapshots anew in a new epoch (`offsets`).
//!
//! **Snapshots.** A fresh snapshot reads every table in one consistent read (`snapshot`: no
//! lock on MariaDB, FTWRL for milliseconds or table locks on MySQL), or, with
//! `snapshot_locking = "online"` (and `auto` on MySQL with `source.watermark_table`), takes no
//! lock at all: the stream starts at the binlog's end and every table is read by the online
//! snapshot (`online`, chunks placed at a read view's position on MariaDB or between
//! watermarks, `watermark`).
//!
//! Layout: `error` (the classed errors), `handover` (reader → producer loop), `publisher`
//! (encoding and transactional producing), `pump` (the producer loop and when it commits),
//! `snapshot`, `online` and `binlog` (the readers), `watermark` (placing online chunks without
//! a read view's position); this file holds the session: start-up checks, loading the stored
//! position and the reader task.

mod auth;
pub mod binlog;
pub mod charset;
mod compressed;
pub mod decode;
pub mod decoder;
mod error;
mod handover;
mod json;
pub mod online;
pub mod preflight;
mod publisher;
mod pump;
pub mod retention;
pub mod signal;
pub mod snapshot;
pub mod table_map;
pub mod watermark;
pub mod window;
pub mod xa;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::config::{Config, MysqlConfig, SnapshotLocking, SnapshotMode, SourceConfig, TlsMode};
use crate::error::{Classify, ErrorClass};
use crate::events::registry::Registry;
use crate::kafka::{
    KafkaClientError, MAX_MESSAGE_BYTES, TopicSpec, committed_reader_config, ensure_topics,
};
use crate::metrics::{self as m, Readiness};
use crate::offsets::{
    self, BinlogPosition, OnlineState, OnlineTable, SnapshotSegment, SourceOffset,
};
use crate::retry::{RetryLoop, Verdict};
use crate::shutdown::ShutdownRx;
pub use error::SourceError;
pub use handover::{Outbox, SourceMsg};
use publisher::{Publisher, transactional_producer};
use pump::{Lineage, pump};
use window::Window;

/// The GTID state at `start`: MySQL's set when the snapshot read one; on MariaDB, the server's
/// own answer for that position (`BINLOG_GTID_POS`). `None` when neither is known: positions are
/// then stored without one, and a failover stops the source instead of resuming.
///
/// Only the server's "no such function" (1305, MySQL) means "not known". Any other error (the
/// connection cut, the server down) is returned: taking it for "not known" would store every
/// position of this run without its GTID state, so that a later failover, which this lookup
/// would have allowed, stops the source for good.
async fn initial_gtid_state(
    cfg: &MysqlConfig,
    start: &BinlogPosition,
    mysql_set: Option<&str>,
) -> Result<Option<crate::gtid::GtidState>, SourceError> {
    if let Some(s) = mysql_set {
        return Ok(crate::gtid::GtidState::parse_mysql(s).ok());
    }
    let asked = async {
        let mut conn = connect(cfg).await?;
        crate::failpoint::pause_if_armed("stream.gtid_lookup", 0).await;
        let r: Option<Option<String>> = conn
            .exec_first("SELECT BINLOG_GTID_POS(?, ?)", (&start.file, start.pos))
            .await?;
        conn.disconnect().await?;
        Ok::<_, SourceError>(r.flatten())
    }
    .await;
    match asked {
        Ok(Some(s)) => Ok(crate::gtid::GtidState::parse_mariadb(&s)
            .map_err(|e| tracing::warn!(error = %e, "the server's GTID position is unreadable"))
            .ok()),
        Ok(None) => {
            // Seen when an event larger than the server's max_allowed_packet lies earlier in
            // that binlog file: the server's scan of the file stops there.
            tracing::warn!(
                position = %start,
                "MariaDB gives no GTID state for the start position (BINLOG_GTID_POS is NULL): \
                 positions are stored without one, and a failover to another server stops the \
                 source instead of resuming"
            );
            Ok(None)
        }
        // MySQL has no BINLOG_GTID_POS (1305): its state comes from snapshots only.
        Err(SourceError::Mysql(mysql_async::Error::Server(e))) if e.code == 1305 => {
            tracing::debug!(error = %e, "no GTID state for the start position");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The shape of each of `tables`, from `information_schema`, on one connection.
async fn shapes(
    cfg: &MysqlConfig,
    tables: &[String],
) -> Result<Vec<(String, crate::events::TableSchema)>, SourceError> {
    let mut conn = connect(cfg).await?;
    let mut out = Vec::with_capacity(tables.len());
    for t in tables {
        let (db, table) = t.split_once('.').unwrap_or(("", t));
        out.push((
            t.clone(),
            table_map::from_information_schema(&mut conn, db, table).await?,
        ));
    }
    conn.disconnect().await?;
    Ok(out)
}

/// Whether every one of `tables` has a primary key (an online snapshot pages by it).
async fn all_keyed(cfg: &MysqlConfig, tables: &[String]) -> Result<bool, SourceError> {
    Ok(shapes(cfg, tables)
        .await?
        .iter()
        .all(|(_, s)| !s.key.is_empty()))
}

/// Those of `tables` with a primary key that does not order the same in Rust as in MySQL
/// ([`window::key_orderable`]): the initial snapshot could checkpoint them only at their end,
/// so on MariaDB the online snapshot reads them instead.
async fn paged_by_the_server(
    cfg: &MysqlConfig,
    tables: &[String],
) -> Result<Vec<String>, SourceError> {
    Ok(shapes(cfg, tables)
        .await?
        .into_iter()
        .filter(|(_, s)| !s.key.is_empty() && !window::key_orderable(s))
        .map(|(t, _)| t)
        .collect())
}

/// A producer that is broken, or fenced, or whose transaction state is unknown, is dropped
/// (purging its queue, off the async workers); the next session creates a new one, whose
/// `init_transactions` aborts what this one left open.
async fn replace_producer(publisher: &mut Option<Publisher>) {
    if let Some(p) = publisher.take() {
        let _ = tokio::task::spawn_blocking(move || drop(p)).await;
    }
}

/// Whether a snapshot with no lock can read every table online: a definite error where
/// `snapshot_locking = "online"` asks for it and it cannot; `auto` falls back to its locks.
async fn online_initial_possible(
    src: &SourceConfig,
    mysql: &MysqlConfig,
    method: &online::Method,
) -> Result<bool, SourceError> {
    let asked = src.snapshot_locking == SnapshotLocking::Online;
    if let Some(why) = method.unsupported_why() {
        return if asked {
            Err(SourceError::OnlineLocking {
                why: format!(
                    "{why}. Fix: set source.watermark_table (a table ecst may write to; see the README's MySQL section), or choose snapshot_locking = \"global\" or \"tables\""
                ),
            })
        } else {
            Ok(false)
        };
    }
    let keyless: Vec<String> = shapes(mysql, &src.tables)
        .await?
        .into_iter()
        .filter(|(_, s)| s.key.is_empty())
        .map(|(t, _)| t)
        .collect();
    if keyless.is_empty() {
        return Ok(true);
    }
    if asked {
        return Err(SourceError::OnlineLocking {
            why: format!(
                "{} {} no primary key to page by. Fix: add one, or choose snapshot_locking = \"auto\", \"global\" or \"tables\"",
                keyless.join(", "),
                if keyless.len() == 1 { "has" } else { "have" }
            ),
        });
    }
    tracing::warn!(tables = ?keyless, "a snapshot with no lock needs a primary key in every table: this snapshot takes the locks of snapshot_locking = \"auto\" instead");
    Ok(false)
}

/// Whether two table lists name the same tables (in any order).
fn same_tables(a: &[String], b: &[String]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}

/// The password to connect with: `password_file`'s content now, when it is set (a rotated
/// secret is picked up at the next connection without a restart), else the configured one.
fn current_password(cfg: &MysqlConfig) -> Option<String> {
    if let Some(file) = &cfg.password_file {
        match std::fs::read_to_string(file) {
            Ok(s) => return Some(s.trim_end_matches(['\n', '\r']).to_string()),
            Err(e) => {
                tracing::warn!(file = %file, error = %e, "cannot read mysql.password_file again: connecting with the password read at start");
            }
        }
    }
    cfg.password.as_ref().map(|p| p.expose().to_string())
}

/// Handshakes a refused login gets before the refusal counts (see `connect`).
const AUTH_ATTEMPTS: u32 = 3;

/// Opens a MySQL connection per config, within the connect timeout.
///
/// With `password_file`, a refused password (ERROR 1045) is transient: during a rotation the
/// server takes the new password before the file has it, and each retry reads the file again.
pub async fn connect(cfg: &MysqlConfig) -> Result<mysql_async::Conn, SourceError> {
    let mut opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(cfg.host.clone())
        .tcp_port(cfg.port)
        .user(Some(cfg.user.clone()))
        .pass(current_password(cfg))
        // The protocol's largest packet (1 GiB, the server's replica-side limit). By default the
        // driver takes the server's max_allowed_packet (often 64 MiB), while a row event may be
        // larger (an UPDATE's before and after images of a 40 MiB value): the stream then failed
        // on it for ever, in every source reading that server, whatever table it was on.
        .max_allowed_packet(Some(1 << 30))
        .prefer_socket(false);
    if cfg.tls == TlsMode::Required {
        let mut ssl = mysql_async::SslOpts::default();
        if let Some(ca) = &cfg.ca_file {
            ssl = ssl.with_root_certs(vec![std::path::PathBuf::from(ca).into()]);
        }
        opts = opts.ssl_opts(ssl);
    }
    // A refused login is tried again (a new handshake, a new nonce) before it counts: the
    // driver's ed25519 proof is refused for about 1 login in 150 with the right password (748
    // logins measured, 5 refused; the C client: 700 of 700 taken). A wrong password is refused
    // every time, so it still stops the source, after AUTH_ATTEMPTS handshakes.
    let mut attempt = 1;
    let outcome = loop {
        let fut = mysql_async::Conn::new(opts.clone());
        let outcome =
            tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms), fut).await;
        match &outcome {
            Ok(Err(mysql_async::Error::Server(e)))
                if matches!(e.code, 1045 | 1698) && attempt < AUTH_ATTEMPTS =>
            {
                tracing::debug!(attempt, user = %cfg.user, "mysql refused the login: trying once more");
                attempt += 1;
            }
            _ => break outcome,
        }
    };
    match outcome {
        Ok(Err(mysql_async::Error::Server(e))) if e.code == 1045 && cfg.password_file.is_some() => {
            Err(SourceError::PasswordRefused {
                user: cfg.user.clone(),
                file: cfg.password_file.clone().unwrap_or_default(),
                detail: e.message,
            })
        }
        Ok(Err(mysql_async::Error::Server(e))) if matches!(e.code, 1045 | 1698) => {
            Err(SourceError::AuthRefused {
                user: cfg.user.clone(),
                code: e.code,
                detail: e.message,
                plugin: auth::plugin_of(cfg).await.to_string(),
            })
        }
        Ok(conn) => Ok(conn?),
        Err(_) => Err(SourceError::ConnectTimeout {
            host: cfg.host.clone(),
            port: cfg.port,
        }),
    }
}

/// The offsets topic's settings: compacted, in small segments that roll every 10 minutes and
/// are cleaned as soon as a tenth of them is superseded, so the topic holds little more than
/// the last position of each source. (Kafka never compacts the active segment: with the
/// defaults, 1 GiB or 7 days, a source committing every 100 ms left hundreds of MB behind.)
fn offsets_topic_config() -> Vec<(&'static str, String)> {
    vec![
        ("cleanup.policy", "compact".to_string()),
        ("segment.bytes", (16u64 << 20).to_string()),
        ("segment.ms", "600000".to_string()),
        ("min.cleanable.dirty.ratio", "0.1".to_string()),
    ]
}

/// Records read back from the end of the offsets topic before reading it from its start: the
/// last position of a source is almost always among them (each commit writes one, and
/// compaction removes the older ones), so a restart does not read the whole topic.
const OFFSETS_TAIL: i64 = 1000;

/// How long reading the offsets topic may go without any progress before it is an error
/// (a broker that answers nothing); a large topic that keeps delivering takes as long as it takes.
const OFFSETS_STALL: Duration = Duration::from_secs(60);

/// Reads the last committed offset of `name` from the offsets topic (read_committed): from the
/// last [`OFFSETS_TAIL`] records, else (another source's records fill the tail) from the start.
///
/// It reads up to the partition's high-water mark as of its start (a record at or past it), or
/// to the end of the partition as the broker reports it (`enable.partition.eof`, which counts
/// the records a `read_committed` consumer never delivers: aborted transactions, commit
/// markers), whichever comes first: no idle heuristic that a slow fetch could fool, and no
/// fixed deadline that a large topic could exceed. The end alone is not enough while a source
/// runs (`ecst check`, `ecst offsets show`): it commits many times a second, each fetch finds
/// more, and the end was chased for as long as it ran. At a source's own start, its
/// `init_transactions` has already aborted anything still open, so the end is final.
pub async fn load_offset(cfg: &Config, topic: &str) -> Result<Option<SourceOffset>, SourceError> {
    let mut cc = committed_reader_config(&cfg.kafka, format!("{}-offsets-reader", cfg.name));
    cc.set("enable.partition.eof", "true");
    let name = cfg.name.clone();
    let topic = topic.to_string();
    let t = topic.clone();
    let res = tokio::task::spawn_blocking(move || -> Result<Option<SourceOffset>, String> {
        let consumer: BaseConsumer = cc.create().map_err(|e| e.to_string())?;
        // A topic created a moment ago may have no leader yet: wait for one (briefly) rather
        // than fail the session and retry it with a warning on every first start.
        let electing = Instant::now();
        let (low, high) = loop {
            match consumer.fetch_watermarks(&t, 0, Duration::from_secs(10)) {
                Err(KafkaError::MetadataFetch(
                    RDKafkaErrorCode::NotLeaderForPartition
                    | RDKafkaErrorCode::LeaderNotAvailable
                    | RDKafkaErrorCode::UnknownTopicOrPartition,
                )) if electing.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => break other.map_err(|e| e.to_string())?,
            }
        };
        if high <= low {
            return Ok(None);
        }
        // The tail first; the whole partition only when the tail holds nothing of ours.
        let tail = (high - OFFSETS_TAIL).max(low);
        let mut from = tail;
        loop {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&t, 0, Offset::Offset(from))
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
                            last =
                                Some(SourceOffset::from_bytes(payload).map_err(|e| e.to_string())?);
                        }
                        // Everything committed before this read began is read.
                        if msg.offset() + 1 >= high {
                            break;
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
            if last.is_some() || from == low {
                return Ok(last);
            }
            from = low;
        }
    })
    .await
    .map_err(|e| SourceError::Task(e.to_string()))?;
    res.map_err(|detail| SourceError::Offsets { topic, detail })
}

/// The position to resume from after the producer was replaced: what the offsets topic holds
/// (`loaded`), unless it is older than what this process itself committed (`known`, set only
/// when `commit_transaction` succeeded). A read that misses a committed transaction would
/// re-publish it (duplicates); a newer stored position is a commit that was reported failed
/// but landed, and the topic is right. Positions that cannot be ordered (another numbering, a
/// snapshot's progress at one position) keep the topic's.
fn reconcile_reload(
    known: Option<SourceOffset>,
    loaded: Option<SourceOffset>,
) -> Option<SourceOffset> {
    let Some(k) = known else {
        return loaded;
    };
    match &loaded {
        None => {
            tracing::warn!(
                committed = %k.position,
                "the offsets topic does not show the position this process committed: resuming from the committed one"
            );
            Some(k)
        }
        Some(l) if l.progress_cmp(&k) == Some(std::cmp::Ordering::Less) => {
            tracing::warn!(
                committed = %k.position,
                stored = %l.position,
                "the offsets topic shows an older position than this process committed: resuming from the committed one"
            );
            Some(k)
        }
        Some(l) if l.progress_cmp(&k) == Some(std::cmp::Ordering::Greater) => {
            tracing::info!(
                committed = %k.position,
                stored = %l.position,
                "a transaction reported as failed was committed: resuming after it"
            );
            loaded
        }
        Some(_) => loaded,
    }
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
    // Seen by `ecst offsets reset` for as long as this function runs.
    let _presence = crate::presence::announce_source(&cfg, shutdown.clone());
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
    // The retention poller follows the committed position; it ends with this function.
    let (progress, progress_rx) = tokio::sync::watch::channel(None);
    let progress = Arc::new(progress);
    let poller = tokio::spawn(retention::watch(
        mysql.clone(),
        progress_rx,
        shutdown.clone(),
    ));
    let _poller = crate::shutdown::AbortOnDrop(poller);
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
            &progress,
        )
        .await;
        readiness.source_ready.store(false, Ordering::Relaxed);
        // A transaction the broker refused (not a fatal producer state, not a timeout) is
        // aborted with the same producer: a new one's init_transactions would fence a newer
        // instance of this source that fenced this one while it committed (the broker may
        // report that commit as an unknown error). If this producer was fenced, the abort says
        // so, and the source stops.
        let refused_txn = matches!(
            &res,
            Err(SourceError::Kafka(KafkaClientError::Broker(KafkaError::Transaction(t)))) if !t.is_fatal()
        );
        let mut res = res;
        if refused_txn && let Some(p) = publisher.as_mut() {
            match p.try_abort().await {
                // A commit reported as failed may have landed: the stored position is read
                // again, as when the producer is replaced.
                Ok(()) => match load_offset(&cfg, &cfg.offsets_topic()).await {
                    Ok(loaded) => {
                        committed = reconcile_reload(committed.take(), loaded);
                        tracing::info!(
                            "the refused kafka transaction is aborted; the same producer goes on"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the stored position could not be read again: the producer is replaced");
                        replace_producer(&mut publisher).await;
                    }
                },
                Err(fenced) if fenced.class() == ErrorClass::Definite => res = Err(fenced),
                Err(e) => {
                    tracing::warn!(error = %e, "the refused kafka transaction could not be aborted: the producer is replaced");
                    replace_producer(&mut publisher).await;
                }
            }
        } else if matches!(&res, Err(SourceError::Kafka(_))) {
            // A fenced, broken or unreachable producer is replaced; its successor's
            // init_transactions aborts what it left open (an abort here would wait on the same
            // broken link). Dropping it purges its queue, off the async workers.
            replace_producer(&mut publisher).await;
        } else if let Some(p) = publisher.as_mut() {
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
    progress: &Arc<tokio::sync::watch::Sender<Option<retention::Committed>>>,
) -> Result<(), SourceError> {
    let offsets_topic = cfg.offsets_topic();
    let mut topics = vec![
        TopicSpec {
            name: offsets_topic.clone(),
            partitions: 1,
            config: offsets_topic_config(),
        },
        signal::topic_spec(cfg),
    ];
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
            bytes_since_commit: 0,
            opened_at: Instant::now(),
            streamed_since_commit: 0,
            streamed_commits: 0,
            last_commit_took: Duration::ZERO,
            counts: HashMap::new(),
            last_change_ts_ms: 0,
            progress: progress.clone(),
            message_keyed: HashMap::new(),
        });
        // The producer's init_transactions aborted any transaction a previous incarnation left
        // open, so the committed offset read now is final.
        let loaded = load_offset(cfg, &offsets_topic).await?;
        *committed = reconcile_reload(committed.take(), loaded);
    }
    // The poller knows where we stand before the first commit of this session.
    if let Some(o) = committed.as_ref() {
        progress.send_if_modified(|p| {
            let fresh = p.is_none();
            if fresh {
                *p = Some(retention::Committed {
                    position: o.position.clone(),
                    commit_ts_ms: 0,
                });
            }
            fresh
        });
    }
    let Some(publisher) = publisher.as_mut() else {
        return Err(SourceError::Task("no publisher".into()));
    };

    let stored = committed.clone().filter(|o| o.snapshot_completed);
    // The session's table order: a snapshot's progress (`tables_done`) indexes it, so an
    // interrupted snapshot resumes in the order it stored.
    let mut tables: Vec<String> = src.tables.clone();
    // An interrupted snapshot of the same tables resumes after its last committed chunk
    // (`snapshot_mode = always` starts over on each process start, as documented).
    let mut resume: Vec<SnapshotSegment> = committed
        .as_ref()
        .filter(|o| {
            !o.snapshot_completed
                && same_tables(&o.tables, &src.tables)
                && !(first && src.snapshot_mode == SnapshotMode::Always)
        })
        .map(|o| {
            tables = o.tables.clone();
            o.snapshot_segments.clone()
        })
        .unwrap_or_default();
    // Tables added to `source.tables` since the stored snapshot: they are snapshotted now, as
    // the rest of a snapshot that read the other tables at the stored position. The stream then
    // resumes at that position for the others, and for the added ones admits only changes after
    // their read (`window`): nothing is lost, nothing doubled, and the topics replay exactly.
    let added: Vec<String> = stored
        .as_ref()
        .map(|o| {
            src.tables
                .iter()
                .filter(|t| !o.tables.contains(t))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let mut snapshot_added = false;
    if let Some(o) = stored.as_ref().filter(|_| !added.is_empty()) {
        if src.snapshot_mode == SnapshotMode::Never {
            tracing::warn!(tables = ?added, "tables added to source.tables are not snapshotted (snapshot_mode = never): only their changes from now on are captured");
        } else if !o.snapshot_segments.is_empty() {
            tracing::warn!(tables = ?added, "tables added to source.tables will be snapshotted at the next start: the stream is still replaying a resumed snapshot's stretch");
            tables = o.tables.clone();
        } else if !(first && src.snapshot_mode == SnapshotMode::Always) {
            let kept: Vec<String> = o
                .tables
                .iter()
                .filter(|t| src.tables.contains(t))
                .cloned()
                .collect();
            resume = vec![SnapshotSegment {
                at: o.position.clone(),
                tables_done: kept.len(),
                last_key: None,
            }];
            tables = kept.into_iter().chain(added.iter().cloned()).collect();
            snapshot_added = true;
        }
    }
    let needed_position = stored
        .as_ref()
        .map(|o| &o.position)
        .or_else(|| resume.first().map(|s| &s.at));
    let preflight::Preflight { checks, identity } =
        preflight::check_mysql(mysql, &src.tables, needed_position).await?;
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
    // Online snapshots go on from the stored state, for the tables still captured.
    let mut online = stored
        .as_ref()
        .map(|o| o.online.clone())
        .or_else(|| {
            committed.as_ref().map(|o| OnlineState {
                tables: Vec::new(),
                signals_next: o.online.signals_next,
            })
        })
        .unwrap_or_default();
    online.tables.retain(|t| src.tables.contains(&t.table));
    // MariaDB gives a read view's exact binlog position, and a watermark table places chunks on
    // any server: an added table with a primary key is snapshotted online while every table
    // streams on (`online`), instead of before the stream resumes.
    let mariadb = identity.server_uuid.is_none();
    let method = online::Method::choose(mariadb, src.watermark_table.as_deref(), &cfg.name);
    if matches!(method, online::Method::Watermarks { .. })
        && !watermark::commits_in_binlog_order(&mut connect(mysql).await?).await?
    {
        return Err(SourceError::CommitOrder);
    }
    if snapshot_added && method.supported() && all_keyed(mysql, &added).await? {
        tracing::info!(tables = ?added, streaming_from = ?needed_position.map(ToString::to_string), "tables added to source.tables since the last snapshot: snapshotting them online while every table streams on");
        snapshot_added = false;
        resume.clear();
        for t in &added {
            if !online.tables.iter().any(|q| &q.table == t) {
                online.tables.push(OnlineTable {
                    table: t.clone(),
                    last_key: None,
                    rows_done: 0,
                });
            }
        }
    } else if snapshot_added {
        tracing::info!(tables = ?added, "tables added to source.tables since the last snapshot: snapshotting them before the stream resumes (no online snapshot: the server is MySQL without source.watermark_table, or a table has no primary key)");
    }
    let mut need_snapshot = match (src.snapshot_mode, &stored) {
        _ if snapshot_added => true,
        (SnapshotMode::Always, _) if first => true,
        (SnapshotMode::Never, _) => false,
        (_, None) => true,
        (_, Some(_)) => false,
    };
    // A position written by another server is no position here, whatever its file is called:
    // resuming at its byte offset would read another server's events from an arbitrary point.
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
    // A failover to a server that has every transaction the stored position covers (a
    // promoted replica): the position is found again by its GTID state (MariaDB's
    // `@slave_connect_state`, MySQL's GTID dump), in a new epoch, with no snapshot.
    let gtid_failover: Option<String> = match (&foreign, committed.as_ref()) {
        (Some(_), Some(o)) => preflight::resumable_by_gtid(o.gtid_set.as_deref(), &identity),
        _ => None,
    };
    let foreign = match (&gtid_failover, foreign) {
        (Some(set), Some(why)) => {
            tracing::warn!(%why, gtid = %set, "the stored position was written by another server that this one has replicated: resuming after its GTIDs, in a new epoch");
            None
        }
        (_, f) => f,
    };
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
    let purged = gtid_failover.is_none() && (purged || foreign.is_some());
    if purged {
        // A new snapshot of every table covers what the online ones would read.
        online.tables.clear();
    }
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
    // `snapshot_locking = "online"`, and `auto` on MySQL with a watermark table: a fresh
    // snapshot takes no lock and no consistent read. The stream starts at the binlog's end and
    // every table is read by the online snapshot while all of them stream.
    let online_initial = need_snapshot
        && resume.is_empty()
        && !snapshot_added
        && match src.snapshot_locking {
            SnapshotLocking::Online => true,
            SnapshotLocking::Auto => !mariadb && src.watermark_table.is_some(),
            SnapshotLocking::Global | SnapshotLocking::Tables => false,
        };
    let online_initial = online_initial && online_initial_possible(src, mysql, &method).await?;
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
        // Another server's positions: a new epoch, so they sort after every earlier version.
        Some(e) if gtid_failover.is_some() => offsets::next_epoch(Some(e), now_s),
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
    // The GTID state at `start`, when it is known here (else the reader asks the server).
    let mut start_gtid: Option<String> = None;
    let start = match (&stored, need_snapshot) {
        // By GTID: the server finds the place; the file and offset come with its first events.
        _ if gtid_failover.is_some() => {
            start_gtid = gtid_failover.clone();
            Some(BinlogPosition {
                file: String::new(),
                pos: 4,
            })
        }
        _ if online_initial => {
            let mut conn = connect(mysql).await?;
            let (end, executed) = preflight::binlog_status(&mut conn).await?;
            tracing::info!(position = %end, tables = src.tables.len(), method = ?method, "snapshot with no lock (snapshot_locking): streaming from the binlog's current end while every table is read online");
            start_gtid = executed;
            online.tables = tables
                .iter()
                .map(|t| OnlineTable {
                    table: t.clone(),
                    last_key: None,
                    rows_done: 0,
                })
                .collect();
            Some(end)
        }
        (Some(o), false) => {
            start_gtid = o.gtid_set.clone();
            Some(o.position.clone())
        }
        (None, false) => {
            // snapshot_mode = never and nothing stored: start at the current end.
            let mut conn = connect(mysql).await?;
            let (end, executed) = preflight::binlog_status(&mut conn).await?;
            tracing::info!(position = %end, "no stored position and snapshot_mode = never: streaming from the binlog's current end");
            start_gtid = executed;
            Some(end)
        }
        (_, true) => None,
    };
    if start.is_none() {
        online.tables.clear();
    }
    // On MariaDB, a table whose key has a text column is read by the online snapshot once the
    // others are read: it pages by the server's own comparison and stores its progress with
    // every chunk, where the initial snapshot could store it only at the table's end (a whole
    // table in one Kafka transaction, read again from its start after a kill). The stored
    // table order puts them last, so the initial snapshot's progress indexes the others alone;
    // a resumed snapshot keeps the split it stored.
    if start.is_none() && method.supported() && !snapshot_added {
        let later: Vec<String> = if resume.is_empty() {
            let later = paged_by_the_server(mysql, &tables).await?;
            tables = tables
                .iter()
                .filter(|t| !later.contains(t))
                .chain(later.iter())
                .cloned()
                .collect();
            later
        } else {
            committed
                .iter()
                .flat_map(|o| o.online.tables.iter().map(|t| t.table.clone()))
                .filter(|t| tables.contains(t))
                .collect()
        };
        if !later.is_empty() {
            tracing::info!(tables = ?later, "tables keyed by text are snapshotted online, in chunks checkpointed one by one, once the others are read");
        }
        online.tables = later
            .into_iter()
            .map(|table| OnlineTable {
                table,
                last_key: None,
                rows_done: 0,
            })
            .collect();
    }
    // What the initial snapshot reads: every table but those read online.
    let snapshot_tables: Vec<String> = tables
        .iter()
        .filter(|t| !online.tables.iter().any(|o| &o.table == *t))
        .cloned()
        .collect();

    let (tx, mut rx) = Outbox::new(src.channel_capacity, src.channel_max_bytes);
    let reader_cfg = mysql.clone();
    let session_tables = tables.clone();
    let chunk = snapshot::ChunkBounds {
        rows: src.snapshot_chunk_size,
        bytes: src.snapshot_chunk_max_bytes,
    };
    let locks = snapshot::LockPolicy {
        wait_s: src.snapshot_lock_wait_s,
        locking: src.snapshot_locking,
    };
    let reader_shutdown = shutdown.clone();
    // Streaming inside the stretch a resumed snapshot spanned keeps filtering after a restart.
    let stored_window = stored
        .as_ref()
        .filter(|_| !online_initial)
        .and_then(|o| Window::new(&o.snapshot_segments, &o.tables));
    let gtid_connect = gtid_failover.clone();
    // A stored position inside a split transaction (only when resuming from it).
    let within = if need_snapshot {
        None
    } else {
        committed.as_ref().and_then(|o| o.within.clone())
    };
    let beside = binlog::Beside {
        online: online::Online::new(mysql.clone(), epoch, chunk, online.clone(), method),
        signals: Some(signal::listen(
            cfg,
            online.signals_next.unwrap_or(0),
            shutdown.clone(),
        )),
    };
    let reader = tokio::spawn(async move {
        let (start, window, state) = match start {
            Some(p) => {
                let state = match start_gtid.as_deref().map(crate::gtid::GtidState::parse) {
                    Some(Ok(s)) => Some(s),
                    _ if gtid_connect.is_some() => None,
                    _ => initial_gtid_state(&reader_cfg, &p, None).await?,
                };
                (p, stored_window, state)
            }
            None => {
                let (segments, mysql_set) = snapshot::run_snapshot(
                    &reader_cfg,
                    &snapshot_tables,
                    chunk,
                    locks,
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
                let state = initial_gtid_state(&reader_cfg, &start, mysql_set.as_deref()).await?;
                let gtid_set = state.as_ref().map(ToString::to_string);
                tx.send(SourceMsg::SnapshotDone { segments, gtid_set })
                    .await?;
                (start, window, state)
            }
        };
        binlog::run_reader(
            reader_cfg,
            tables.into_iter().collect::<HashSet<_>>(),
            binlog::Start { at: start, within },
            epoch,
            window,
            binlog::Gtid {
                state,
                connect: gtid_connect,
            },
            beside,
            tx,
            reader_shutdown,
        )
        .await
    });
    let abort_reader = reader.abort_handle();
    let result = pump(
        src,
        session_tables,
        online,
        publisher,
        committed,
        !need_snapshot || online_initial,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(pos: u64) -> SourceOffset {
        SourceOffset {
            position: BinlogPosition {
                file: "mariadb-bin.000004".into(),
                pos,
            },
            gtid: None,
            gtid_set: None,
            snapshot_completed: true,
            tables: Vec::new(),
            epoch: 1,
            server_id: None,
            server_uuid: None,
            snapshot_segments: Vec::new(),
            online: OnlineState::default(),
            within: None,
        }
    }

    #[test]
    fn a_reload_older_than_what_this_process_committed_resumes_from_the_committed_position() {
        assert_eq!(
            reconcile_reload(Some(at(900)), Some(at(400))),
            Some(at(900))
        );
        assert_eq!(reconcile_reload(Some(at(900)), None), Some(at(900)));
    }

    #[test]
    fn inside_a_split_transaction_a_reload_with_fewer_rows_published_loses_to_the_committed_one() {
        let inside = |rows: u64| SourceOffset {
            within: Some(crate::offsets::Within {
                gtid: None,
                rows: [("db.t".to_string(), rows)].into_iter().collect(),
                next_row: rows as u32,
            }),
            ..at(400)
        };
        assert_eq!(
            reconcile_reload(Some(inside(200)), Some(inside(100))),
            Some(inside(200))
        );
        assert_eq!(
            reconcile_reload(Some(inside(100)), Some(at(400))),
            Some(inside(100))
        );
        assert_eq!(
            reconcile_reload(Some(inside(100)), Some(inside(300))),
            Some(inside(300))
        );
        assert_eq!(
            reconcile_reload(Some(inside(100)), Some(at(500))),
            Some(at(500))
        );
    }

    #[test]
    fn a_reload_newer_than_what_this_process_committed_is_a_commit_that_landed_and_wins() {
        assert_eq!(
            reconcile_reload(Some(at(400)), Some(at(900))),
            Some(at(900))
        );
        assert_eq!(reconcile_reload(None, Some(at(400))), Some(at(400)));
        assert_eq!(
            reconcile_reload(Some(at(400)), Some(at(400))),
            Some(at(400))
        );
    }
}
