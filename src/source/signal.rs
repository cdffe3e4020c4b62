//! Signals to a running source, through Kafka: `ecst snapshot db.table` writes one record to the
//! source's signals topic (`<name>.signals`, one partition), and the running source reads it and
//! starts an online snapshot of those tables (`source::online`).
//!
//! Why Kafka and not a signal table in MySQL (Debezium's default channel): ecst's MySQL user only
//! reads, and the signals topic sits beside the offsets topic that ecst already owns. A source
//! that is not running finds the signal when it starts.
//!
//! Exactly once: the offset of the next signal to read is stored with the source position
//! (`offsets::OnlineState::signals_next`), in the same Kafka transaction as the effect of the
//! signals before it. A signal read but not yet committed is read again after a restart; asking
//! for a table already being snapshotted is a no-op, so reading it twice changes nothing.
//!
//! The listener is a blocking thread polling a `read_committed` consumer assigned to the one
//! partition (no group: nothing is committed to Kafka's group offsets). It hands each signal to
//! the binlog reader through a small bounded channel and ends when the reader drops the
//! receiving end or on shutdown; the consumer is dropped on that thread, never on an async
//! worker.

use std::time::Duration;

use mysql_async::prelude::Queryable;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::SourceError;
use crate::config::Config;
use crate::kafka::{TopicSpec, client_config, committed_reader_config, ensure_topics};
use crate::shutdown::ShutdownRx;

/// The only signal so far: snapshot these tables online.
const EXECUTE_SNAPSHOT: &str = "execute-snapshot";

/// A signal as written to the topic (JSON, keyed by the source's name).
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    /// What to do (`execute-snapshot`).
    #[serde(rename = "type")]
    kind: String,
    /// `db.table` names.
    tables: Vec<String>,
}

/// One signal read from the topic.
#[derive(Debug)]
pub struct Signal {
    /// Its offset in the topic (the next one to read is this + 1).
    pub offset: i64,
    /// The tables to snapshot, or why the record is not a signal ecst understands.
    pub tables: Result<Vec<String>, String>,
}

/// The source's signals topic.
pub fn signals_topic(cfg: &Config) -> String {
    format!("{}.signals", cfg.name)
}

/// How the signals topic is created (one partition: signals are read in order).
pub fn topic_spec(cfg: &Config) -> TopicSpec {
    TopicSpec {
        name: signals_topic(cfg),
        partitions: 1,
        config: Vec::new(),
    }
}

/// Writes an `execute-snapshot` signal for `tables` and says where it was written. Refused,
/// naming the table, for a table the source does not capture (`source.tables`), one without a
/// primary key, and on a server that cannot snapshot online (MySQL): the source would refuse
/// them too, in its log only.
pub async fn request_snapshot(cfg: &Config, tables: &[String]) -> Result<String, SourceError> {
    let captured = cfg
        .source
        .as_ref()
        .map(|s| s.tables.clone())
        .unwrap_or_default();
    for t in tables {
        if !captured.iter().any(|c| c == t) {
            return Err(SourceError::NotCaptured {
                table: t.clone(),
                tables: captured.join(", "),
            });
        }
    }
    if let Some(mysql) = cfg.mysql.as_ref() {
        let mut conn = super::connect(mysql).await?;
        let version: String = conn
            .query_first("SELECT VERSION()")
            .await?
            .unwrap_or_default();
        for t in tables {
            let method = super::online::Method::choose(
                version.contains("MariaDB"),
                cfg.source
                    .as_ref()
                    .and_then(|s| s.watermark_table.as_deref()),
                &cfg.name,
            );
            let why = if let Some(why) = method.unsupported_why() {
                Some(why)
            } else {
                let (db, table) = t.split_once('.').unwrap_or(("", t));
                let shape = super::table_map::from_information_schema(&mut conn, db, table).await?;
                shape
                    .key
                    .is_empty()
                    .then_some("the table has no primary key to page it by")
            };
            if let Some(why) = why {
                return Err(SourceError::OnlineUnsupported {
                    table: t.clone(),
                    why: why.into(),
                });
            }
        }
        conn.disconnect().await?;
    }
    let topic = signals_topic(cfg);
    ensure_topics(&cfg.kafka, &[topic_spec(cfg)]).await?;
    let bad = |detail: String| SourceError::Signals {
        topic: topic.clone(),
        detail,
    };
    let producer: FutureProducer = client_config(&cfg.kafka)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        .create()
        .map_err(|e: KafkaError| bad(e.to_string()))?;
    let payload = serde_json::to_vec(&Wire {
        kind: EXECUTE_SNAPSHOT.into(),
        tables: tables.to_vec(),
    })
    .map_err(|e| bad(e.to_string()))?;
    let delivered = producer
        .send(
            FutureRecord::to(&topic)
                .key(cfg.name.as_bytes())
                .payload(&payload),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| bad(e.to_string()))?;
    Ok(format!(
        "snapshot of {} asked ({topic} partition {} offset {}): the running source reads it online while every table streams on (a stopped one when it starts); progress in its log (\"online snapshot\") and in ecst_snapshot_rows_done\n",
        tables.join(", "),
        delivered.partition,
        delivered.offset
    ))
}

/// Reads the signals topic from `from` on a blocking thread; the receiver gets each signal in
/// order. Ends on shutdown or when the receiver is dropped. A consumer that cannot be set up is
/// an error on the channel: the reader then restarts its session (transient) rather than run
/// without its signals.
pub fn listen(
    cfg: &Config,
    from: i64,
    shutdown: ShutdownRx,
) -> mpsc::Receiver<Result<Signal, SourceError>> {
    let (tx, rx) = mpsc::channel(16);
    let topic = signals_topic(cfg);
    let name = cfg.name.clone();
    let cc = committed_reader_config(&cfg.kafka, format!("{}-signals-reader", cfg.name));
    std::thread::spawn(move || {
        let fail = |detail: String| SourceError::Signals {
            topic: topic.clone(),
            detail,
        };
        let consumer: BaseConsumer = match cc.create() {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.blocking_send(Err(fail(e.to_string())));
                return;
            }
        };
        let mut tpl = TopicPartitionList::new();
        if let Err(e) = tpl
            .add_partition_offset(&topic, 0, Offset::Offset(from))
            .and_then(|()| consumer.assign(&tpl))
        {
            let _ = tx.blocking_send(Err(fail(e.to_string())));
            return;
        }
        while !shutdown.is_triggered() && !tx.is_closed() {
            let Some(polled) = consumer.poll(Duration::from_millis(250)) else {
                continue;
            };
            let signal: Signal = match polled {
                Ok(msg) => {
                    if msg.key() != Some(name.as_bytes()) {
                        continue;
                    }
                    let tables = msg
                        .payload()
                        .ok_or_else(|| "an empty record".to_string())
                        .and_then(|p| serde_json::from_slice::<Wire>(p).map_err(|e| e.to_string()))
                        .and_then(|w| {
                            if w.kind == EXECUTE_SNAPSHOT {
                                Ok(w.tables)
                            } else {
                                Err(format!("unknown signal type `{}`", w.kind))
                            }
                        });
                    Signal {
                        offset: msg.offset(),
                        tables,
                    }
                }
                // The topic not there yet (no signal ever sent) is no error.
                Err(KafkaError::PartitionEOF(_)) => continue,
                Err(e)
                    if e.rdkafka_error_code().is_some_and(|c| {
                        c == rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition
                    }) =>
                {
                    continue;
                }
                // librdkafka retries on its own (a broker down, an idle connection closed):
                // the signal is read once the broker answers again.
                Err(e) => {
                    tracing::debug!(topic = %topic, error = %e, "signals topic not readable for now");
                    continue;
                }
            };
            if tx.blocking_send(Ok(signal)).is_err() {
                break;
            }
        }
    });
    rx
}
