//! `ecst offsets show | reset`: the stored positions of both halves, as an operator needs them,
//! and a safe way to move them.
//!
//! The source's position is the last committed record of its offsets topic (read like the
//! source reads it at start: `read_committed`, to the partition's end). The sink's is its
//! consumer group's committed offset per partition, beside the partition's high watermark, so
//! the lag is visible without Control Center.
//!
//! `reset` writes a new source record, or commits new offsets for the sink group, only while
//! that half is stopped: a running source is a member of its presence group and a running sink
//! of its own group ([`crate::presence`]); either refuses the reset, naming the members. Without
//! `--yes` it prints what it would write and writes nothing. The targets keep the copies'
//! version order: a position on the same server keeps the epoch (an earlier position replays
//! changes the copies already have, which their version guard skips; a later one skips changes,
//! which the plan says), a full re-snapshot starts a new epoch at the next start (as
//! `snapshot_mode = "always"` does), and re-snapshotting one table reads it as a table added to
//! `source.tables` (the others stream on, the window keeps its topic exact).

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::kafka::client_config;
use crate::offsets::{BinlogPosition, SourceOffset};

/// Errors of reading positions.
#[derive(Debug, thiserror::Error)]
pub enum PositionsError {
    /// The stored source position could not be read.
    #[error("source position: {0}")]
    Source(#[from] crate::source::SourceError),
    /// Kafka metadata or offsets could not be read.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A blocking task failed.
    #[error("task: {0}")]
    Task(String),
    /// The half to move is running.
    #[error(
        "the {what} is running ({} in consumer group `{group}`): stop it first, then reset (a member of a process killed with -9 leaves after the broker's session timeout, about 45 s)",
        .members.join(", ")
    )]
    Running {
        /// `source` or `sink`.
        what: &'static str,
        /// Its group.
        group: String,
        /// The members seen.
        members: Vec<String>,
    },
    /// A target that cannot be applied to what is stored.
    #[error("{0}")]
    Refused(String),
}

impl crate::error::Classify for PositionsError {
    fn class(&self) -> crate::error::ErrorClass {
        crate::error::ErrorClass::Definite
    }
}

/// Where `reset --source` moves the source.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceTarget {
    /// A binlog position of the same server (`FILE:POS`, a transaction boundary).
    Position(BinlogPosition),
    /// The binlog's current end: every change until now is skipped.
    Now,
    /// A full re-snapshot at the next start, in a new epoch.
    Resnapshot,
    /// A re-snapshot of one table at the next start; the others stream on.
    ResnapshotTable(String),
}

impl std::str::FromStr for SourceTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "now" => Ok(SourceTarget::Now),
            "resnapshot" => Ok(SourceTarget::Resnapshot),
            _ => {
                if let Some(t) = s.strip_prefix("resnapshot-table:") {
                    return Ok(SourceTarget::ResnapshotTable(t.to_string()));
                }
                let p = s.strip_prefix("position:").unwrap_or(s);
                p.parse().map(SourceTarget::Position).map_err(|_| {
                    format!("`{s}`: expected now, resnapshot, resnapshot-table:DB.TABLE or position:FILE:POS")
                })
            }
        }
    }
}

/// Where `reset --sink` moves the sink group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkTarget {
    /// Every partition's first offset: the copies are re-applied (the version guard keeps them).
    Earliest,
    /// Every partition's end: every change until now is skipped.
    Latest,
    /// The first offset at or after this time (ms since the epoch).
    Timestamp(i64),
}

impl std::str::FromStr for SinkTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "earliest" => Ok(SinkTarget::Earliest),
            "latest" => Ok(SinkTarget::Latest),
            _ => s
                .strip_prefix("timestamp:")
                .and_then(|t| t.parse().ok())
                .map(SinkTarget::Timestamp)
                .ok_or_else(|| {
                    format!("`{s}`: expected earliest, latest or timestamp:MILLISECONDS")
                }),
        }
    }
}

/// A consumer in the sink's group (never joining it: it only reads and commits offsets) and
/// every partition of the mappings' topics that exists (blocking: broker round trips).
fn sink_group(
    cfg: &Config,
    sink: &crate::config::SinkConfig,
) -> Result<(BaseConsumer, TopicPartitionList), PositionsError> {
    let mut cc = client_config(&cfg.kafka);
    cc.set("group.id", &sink.group_id)
        .set("enable.auto.commit", "false");
    let c: BaseConsumer = cc.create()?;
    let md = c.fetch_metadata(None, Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in md
        .topics()
        .iter()
        .filter(|t| sink.mappings.iter().any(|m| m.topic == t.name()))
    {
        for p in t.partitions() {
            tpl.add_partition(t.name(), p.id());
        }
    }
    Ok((c, tpl))
}

/// Refuses when `group` has members.
fn refuse_if_running(cfg: &Config, what: &'static str, group: &str) -> Result<(), PositionsError> {
    let members = crate::presence::members(cfg, group)?;
    if members.is_empty() {
        Ok(())
    } else {
        Err(PositionsError::Running {
            what,
            group: group.to_string(),
            members,
        })
    }
}

/// Moves the stored positions (see the module note); `apply = false` only says what it would do.
pub async fn reset(
    cfg: &Config,
    source: Option<SourceTarget>,
    sink: Option<SinkTarget>,
    apply: bool,
) -> Result<String, PositionsError> {
    let mut out = String::new();
    let verb = if apply {
        "moved"
    } else {
        "would move (dry run; --yes applies)"
    };
    if let Some(target) = source {
        let group = crate::presence::source_group(cfg);
        let cfg2 = cfg.clone();
        tokio::task::spawn_blocking(move || refuse_if_running(&cfg2, "source", &group))
            .await
            .map_err(|e| PositionsError::Task(e.to_string()))??;
        let topic = cfg.offsets_topic();
        let stored = crate::source::load_offset(cfg, &topic).await?;
        let Some(old) = stored else {
            return Err(PositionsError::Refused(
                "no stored source position: nothing to move (the first start snapshots per snapshot_mode)".into(),
            ));
        };
        let mut new = old.clone();
        let note = match &target {
            SourceTarget::Position(p) => {
                new.position = p.clone();
                new.gtid = None;
                // Unknown for a hand-given position: the next start asks the server for it.
                new.gtid_set = None;
                new.snapshot_segments.clear();
                new.snapshot_completed = true;
                new.within = None;
                "changes between the two positions are replayed (the copies skip what they have) or skipped (if it lies ahead)"
            }
            SourceTarget::Now => {
                let mysql = cfg.mysql.as_ref().ok_or_else(|| {
                    PositionsError::Refused("`now` needs the [mysql] section".into())
                })?;
                let mut conn = crate::source::connect(mysql).await?;
                let (end, executed) = crate::source::preflight::binlog_status(&mut conn).await?;
                let _ = conn.disconnect().await;
                new.position = end;
                new.gtid = None;
                new.gtid_set = executed;
                new.snapshot_segments.clear();
                new.snapshot_completed = true;
                new.within = None;
                "every change until now is skipped: the copies keep their current values until each row changes again"
            }
            SourceTarget::Resnapshot => {
                new.snapshot_completed = false;
                new.snapshot_segments.clear();
                new.within = None;
                new.tables.clear();
                new.online.tables.clear();
                "the next start snapshots every table in a new epoch"
            }
            SourceTarget::ResnapshotTable(t) => {
                if !old.tables.iter().any(|x| x == t) {
                    return Err(PositionsError::Refused(format!(
                        "`{t}` is not among the snapshotted tables ({})",
                        old.tables.join(", ")
                    )));
                }
                if !old.snapshot_segments.is_empty() || !old.snapshot_completed {
                    return Err(PositionsError::Refused(
                        "a snapshot is still in progress (or its stretch is still replayed): reset a table once it has finished".into(),
                    ));
                }
                new.tables.retain(|x| x != t);
                new.online.tables.retain(|x| &x.table != t);
                "the next start snapshots this table while the others stream on from the stored position"
            }
        };
        out.push_str(&format!(
            "source `{}`: {verb} from {} to {}: {note}\n",
            cfg.name,
            describe(&old),
            describe(&new)
        ));
        if apply {
            write_source_offset(cfg, &new).await?;
        }
    }
    if let (Some(target), Some(sink)) = (sink, &cfg.sink) {
        let group = sink.group_id.clone();
        let sink_cfg = sink.clone();
        let cfg2 = cfg.clone();
        let lines = tokio::task::spawn_blocking(move || -> Result<Vec<String>, PositionsError> {
            refuse_if_running(&cfg2, "sink", &group)?;
            let (c, current) = sink_group(&cfg2, &sink_cfg)?;
            let committed = c.committed_offsets(current.clone(), Duration::from_secs(10))?;
            let wanted = match target {
                SinkTarget::Timestamp(ms) => {
                    let mut q = TopicPartitionList::new();
                    for el in current.elements() {
                        q.add_partition_offset(el.topic(), el.partition(), Offset::Offset(ms))?;
                    }
                    c.offsets_for_times(q, Duration::from_secs(10))?
                }
                _ => {
                    let mut w = TopicPartitionList::new();
                    for el in current.elements() {
                        let (low, high) = c.fetch_watermarks(
                            el.topic(),
                            el.partition(),
                            Duration::from_secs(10),
                        )?;
                        let at = if target == SinkTarget::Earliest {
                            low
                        } else {
                            high
                        };
                        w.add_partition_offset(el.topic(), el.partition(), Offset::Offset(at))?;
                    }
                    w
                }
            };
            let mut commit = TopicPartitionList::new();
            let mut lines = Vec::new();
            for el in wanted.elements() {
                // A time after the last record: the end.
                let at = match el.offset() {
                    Offset::Offset(o) => o,
                    _ => {
                        c.fetch_watermarks(el.topic(), el.partition(), Duration::from_secs(10))?
                            .1
                    }
                };
                let was = committed
                    .find_partition(el.topic(), el.partition())
                    .map(|e| match e.offset() {
                        Offset::Offset(o) => o.to_string(),
                        _ => "none".into(),
                    })
                    .unwrap_or_else(|| "none".into());
                lines.push(format!(
                    "  {}[{}]  {was} -> {at}",
                    el.topic(),
                    el.partition()
                ));
                commit.add_partition_offset(el.topic(), el.partition(), Offset::Offset(at))?;
            }
            if apply && commit.count() > 0 {
                c.commit(&commit, CommitMode::Sync)?;
            }
            Ok(lines)
        })
        .await
        .map_err(|e| PositionsError::Task(e.to_string()))??;
        out.push_str(&format!("sink group `{}`: {verb}:\n", sink.group_id));
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    Ok(out)
}

/// One line of a stored source position.
fn describe(o: &SourceOffset) -> String {
    if !o.snapshot_completed {
        return format!("a snapshot to redo (epoch {})", o.epoch);
    }
    format!(
        "{} (epoch {}, tables {})",
        o.position,
        o.epoch,
        if o.tables.is_empty() {
            "-".to_string()
        } else {
            o.tables.join(", ")
        }
    )
}

/// The online snapshots still running (the first is being read), and the signals read.
fn online_line(o: &crate::offsets::OnlineState) -> String {
    let running = if o.tables.is_empty() {
        "no online snapshot running".to_string()
    } else {
        o.tables
            .iter()
            .map(|t| match &t.last_key {
                Some(k) => format!("{} ({} rows, after key {k:?})", t.table, t.rows_done),
                None => format!("{} (not started)", t.table),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match o.signals_next {
        Some(n) => format!("{running}; signals read up to offset {n}"),
        None => running,
    }
}

/// Appends `o` to the offsets topic as the source's last position (the source reads the last
/// record at its start).
async fn write_source_offset(cfg: &Config, o: &SourceOffset) -> Result<(), PositionsError> {
    let cc = client_config(&cfg.kafka);
    let topic = cfg.offsets_topic();
    let key = cfg.name.clone();
    let bytes = o.to_bytes();
    tokio::task::spawn_blocking(move || -> Result<(), PositionsError> {
        let p: ThreadedProducer<DefaultProducerContext> = cc.create()?;
        p.send(BaseRecord::to(&topic).key(key.as_bytes()).payload(&bytes))
            .map_err(|(e, _)| e)?;
        p.flush(Duration::from_secs(10))?;
        Ok(())
    })
    .await
    .map_err(|e| PositionsError::Task(e.to_string()))?
}

/// Renders what is stored, one fact per line.
pub async fn show(cfg: &Config) -> Result<String, PositionsError> {
    let mut out = String::new();
    if cfg.source.is_some() {
        let topic = cfg.offsets_topic();
        match crate::source::load_offset(cfg, &topic).await? {
            None => out.push_str(&format!(
                "source `{}`: no stored position in `{topic}` (the next start snapshots per snapshot_mode)\n",
                cfg.name
            )),
            Some(o) => {
                out.push_str(&format!("source `{}` (topic `{topic}`):\n", cfg.name));
                out.push_str(&format!("  position        {}\n", o.position));
                if let Some(w) = &o.within {
                    out.push_str(&format!(
                        "  inside          the transaction after it ({}), split across Kafka transactions: {} of its rows published\n",
                        w.gtid.as_deref().unwrap_or("no GTID"),
                        w.total()
                    ));
                }
                out.push_str(&format!(
                    "  gtid            {}\n",
                    o.gtid.as_deref().unwrap_or("-")
                ));
                out.push_str(&format!(
                    "  gtid state      {}\n",
                    o.gtid_set.as_deref().unwrap_or("- (a failover stops the source)")
                ));
                out.push_str(&format!("  epoch           {}\n", o.epoch));
                out.push_str(&format!(
                    "  written by      server_id {}{}\n",
                    o.server_id.map_or("-".into(), |i| i.to_string()),
                    o.server_uuid
                        .as_deref()
                        .map(|u| format!(", server_uuid {u}"))
                        .unwrap_or_default()
                ));
                out.push_str(&format!(
                    "  snapshot        {}\n",
                    if o.snapshot_completed {
                        if o.snapshot_segments.is_empty() {
                            "completed".to_string()
                        } else {
                            format!(
                                "completed; the stream still replays a resumed snapshot's stretch ({} segments)",
                                o.snapshot_segments.len()
                            )
                        }
                    } else {
                        format!(
                            "interrupted after {} segment(s); the next start resumes it",
                            o.snapshot_segments.len()
                        )
                    }
                ));
                out.push_str(&format!("  tables          {}\n", o.tables.join(", ")));
                out.push_str(&format!("  online          {}\n", online_line(&o.online)));
            }
        }
    }
    if let Some(sink) = &cfg.sink {
        let group = sink.group_id.clone();
        let sink_cfg = sink.clone();
        let cfg2 = cfg.clone();
        let lines = tokio::task::spawn_blocking(move || -> Result<Vec<String>, PositionsError> {
            let (c, tpl) = sink_group(&cfg2, &sink_cfg)?;
            let committed = c.committed_offsets(tpl, Duration::from_secs(10))?;
            let mut lines = Vec::new();
            for el in committed.elements() {
                let (_, high) =
                    c.fetch_watermarks(el.topic(), el.partition(), Duration::from_secs(10))?;
                let (at, lag) = match el.offset() {
                    Offset::Offset(o) => (o.to_string(), (high - o).max(0).to_string()),
                    _ => ("none".to_string(), "-".to_string()),
                };
                lines.push(format!(
                    "  {}[{}]  committed {at}  end {high}  lag {lag}",
                    el.topic(),
                    el.partition()
                ));
            }
            Ok(lines)
        })
        .await
        .map_err(|e| PositionsError::Task(e.to_string()))??;
        out.push_str(&format!(
            "sink group `{group}` (the source writes in transactions, whose commit marker counts: lag 1 is caught up):\n"
        ));
        if lines.is_empty() {
            out.push_str("  no change topic exists yet\n");
        }
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Value;
    use crate::offsets::{OnlineState, OnlineTable};

    #[test]
    fn the_online_line_names_each_running_table_with_its_progress_and_the_signals_read() {
        assert_eq!(
            online_line(&OnlineState::default()),
            "no online snapshot running"
        );
        let o = OnlineState {
            tables: vec![
                OnlineTable {
                    table: "test.big".into(),
                    last_key: Some(vec![Value::Long(1200)]),
                    rows_done: 1200,
                },
                OnlineTable {
                    table: "test.users".into(),
                    last_key: None,
                    rows_done: 0,
                },
            ],
            signals_next: Some(3),
        };
        assert_eq!(
            online_line(&o),
            "test.big (1200 rows, after key [Long(1200)]), test.users (not started); signals read up to offset 3"
        );
    }
}
