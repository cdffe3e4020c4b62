//! `ecst offsets show`: the stored positions of both halves, as an operator needs them.
//!
//! The source's position is the last committed record of its offsets topic (read like the
//! source reads it at start: `read_committed`, to the partition's end). The sink's is its
//! consumer group's committed offset per partition, beside the partition's high watermark, so
//! the lag is visible without Control Center. Nothing here writes: moving positions (`reset`)
//! is not offered yet, because a moved source position must also move the epoch (`offsets`).

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::kafka::client_config;

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
            }
        }
    }
    if let Some(sink) = &cfg.sink {
        let mut topics: Vec<String> = sink.mappings.iter().map(|m| m.topic.clone()).collect();
        topics.sort();
        topics.dedup();
        let mut cc = client_config(&cfg.kafka);
        cc.set("group.id", &sink.group_id)
            .set("enable.auto.commit", "false");
        let group = sink.group_id.clone();
        let lines = tokio::task::spawn_blocking(move || -> Result<Vec<String>, PositionsError> {
            let c: BaseConsumer = cc.create()?;
            let md = c.fetch_metadata(None, Duration::from_secs(10))?;
            let mut tpl = TopicPartitionList::new();
            for t in md
                .topics()
                .iter()
                .filter(|t| topics.iter().any(|x| x == t.name()))
            {
                for p in t.partitions() {
                    tpl.add_partition(t.name(), p.id());
                }
            }
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
