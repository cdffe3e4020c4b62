//! Every metric name and label key, described once, plus the `/metrics` `/health` `/ready`
//! endpoint.
//!
//! Names follow Prometheus conventions (`_total` counters, `_seconds` histograms). Labels are
//! low-cardinality (`table`, `mapping`, `class`), never a key value. Emission happens per batch or
//! per transaction, not inside per-row loops, except where a counter increment is the whole cost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Label: `db.table`.
pub const TABLE_LABEL: &str = "table";
/// Label: mapping name.
pub const MAPPING_LABEL: &str = "mapping";
/// Label: error class (`transient` / `definite`).
pub const CLASS_LABEL: &str = "class";
/// Label: component (`source` / `sink`).
pub const COMPONENT_LABEL: &str = "component";
/// Label: what a DDL statement did to a table.
pub const OP_LABEL: &str = "op";
/// Label: kind of an error (a server error code such as `mysql_1040`, or a client error family).
pub const KIND_LABEL: &str = "kind";
/// Label: a Kafka change topic.
pub const TOPIC_LABEL: &str = "topic";

/// Gauge, labels `component`: 1 while the component retries a run of transient errors.
pub const COMPONENT_RETRYING: &str = "ecst_component_retrying";
/// Gauge, labels `component`: Unix time (s) of the component's last failure.
pub const COMPONENT_LAST_ERROR_TS: &str = "ecst_component_last_error_timestamp_seconds";
/// Counter, labels `component`, `kind`: transient failures by kind.
pub const COMPONENT_ERRORS_TOTAL: &str = "ecst_component_errors_total";

/// Counter, labels `table`: change events committed to Kafka.
pub const SOURCE_EVENTS_TOTAL: &str = "ecst_source_events_total";
/// Counter: Kafka transactions committed by the source.
pub const SOURCE_TRANSACTIONS_TOTAL: &str = "ecst_source_kafka_transactions_total";
/// Counter: commits inside a source transaction too large for one Kafka transaction
/// (`source.max_transaction_bytes`).
pub const SOURCE_TRANSACTION_SPLITS_TOTAL: &str = "ecst_source_transaction_splits_total";
/// Gauge: milliseconds between the last committed source transaction's MySQL commit and now.
pub const SOURCE_MS_BEHIND: &str = "ecst_source_ms_behind_source";
/// Gauge: binlog file sequence number of the last committed position.
pub const SOURCE_BINLOG_FILE: &str = "ecst_source_binlog_file_seq";
/// Gauge: byte position of the last committed position.
pub const SOURCE_BINLOG_POS: &str = "ecst_source_binlog_position";
/// Counter, labels `table`, `op` (`truncate`, `drop`, `rename`): DDL that truncated, dropped or
/// renamed a captured table.
pub const SOURCE_TABLE_LIFECYCLE_TOTAL: &str = "ecst_source_table_lifecycle_total";
/// Gauge, labels `table`: snapshot rows read so far.
pub const SNAPSHOT_ROWS_DONE: &str = "ecst_snapshot_rows_done";
/// Gauge, labels `table`: estimated rows of the table being snapshotted; its row count once its
/// snapshot is finished.
pub const SNAPSHOT_ROWS_TOTAL: &str = "ecst_snapshot_rows_total";
/// Gauge: 1 while a snapshot runs.
pub const SNAPSHOT_RUNNING: &str = "ecst_snapshot_running";
/// Counter: online snapshot chunks read again because the stream had passed their read view
/// (`source::online`); a steady rise means the chunks chase a stream that never pauses.
pub const SNAPSHOT_CHUNKS_REREAD_TOTAL: &str = "ecst_snapshot_chunks_reread_total";
/// Counter: rows an online snapshot chunk read between watermarks left out because a
/// transaction between the watermarks changed them: the stream's changes stand for them
/// (`source::watermark`).
pub const SNAPSHOT_ROWS_LEFT_TO_STREAM_TOTAL: &str = "ecst_snapshot_rows_left_to_stream_total";
/// Counter: reconnects/restarts of the source after transient errors.
pub const SOURCE_RESTARTS_TOTAL: &str = "ecst_source_restarts_total";
/// Counter: HTTP requests sent to the schema registry, by `op` (`register`, `subjects`,
/// `compatibility`, `latest`, `schema`); answers served from the cache are not counted.
pub const REGISTRY_REQUESTS_TOTAL: &str = "ecst_registry_requests_total";
/// Counter, labels `mapping`: change events applied to MongoDB.
pub const SINK_APPLIED_TOTAL: &str = "ecst_sink_applied_total";
/// Counter, labels `mapping`: events skipped because the stored copy was newer (version guard).
pub const SINK_STALE_TOTAL: &str = "ecst_sink_stale_skipped_total";
/// Counter, labels `topic`: messages sent to the dead-letter topic, by the topic they came from.
pub const SINK_DLQ_TOTAL: &str = "ecst_sink_dead_letter_total";
/// Counter, labels `component`, `class`: retries after errors.
pub const RETRIES_TOTAL: &str = "ecst_retries_total";
/// Gauge, labels `topic`: messages not yet applied on the partitions this process is assigned
/// (high watermark minus the next offset to apply), refreshed every few seconds.
pub const SINK_CONSUMER_LAG: &str = "ecst_sink_consumer_lag";
/// Gauge, labels `mapping`, `topic`: always 1; which topic each mapping reads.
pub const SINK_MAPPING_INFO: &str = "ecst_sink_mapping_info";
/// Histogram (seconds): MySQL commit → MongoDB acknowledged, from the source timestamp header.
pub const END_TO_END_LATENCY: &str = "ecst_end_to_end_latency_seconds";
/// Histogram (seconds): ecst read the change from the binlog → MongoDB acknowledged
/// (millisecond precision; MariaDB stamps commits in whole seconds only).
pub const PIPELINE_LATENCY: &str = "ecst_pipeline_latency_seconds";
/// Histogram (seconds): ecst read the change from the binlog → the sink began writing its batch
/// to MongoDB: ecst's own share of [`PIPELINE_LATENCY`] (the rest is MongoDB's write).
pub const PIPELINE_BEFORE_WRITE: &str = "ecst_pipeline_before_write_seconds";
/// Histogram (seconds): duration of one source Kafka transaction commit (flush + end marker).
pub const SOURCE_COMMIT_SECONDS: &str = "ecst_source_commit_seconds";
/// Histogram (seconds): duration of one sink batch write to MongoDB.
pub const SINK_BATCH_SECONDS: &str = "ecst_sink_batch_write_seconds";
/// Gauge: Unix time (s) the process started (the standard name: restarts show as changes).
pub const PROCESS_START_TS: &str = "process_start_time_seconds";
/// Gauge: Unix time (s) the binlog reader last received an event, heartbeats included (set at
/// most once a second): a stream that is connected but hears nothing shows as an old value.
pub const SOURCE_LAST_EVENT_TS: &str = "ecst_source_last_event_timestamp_seconds";

/// Gauge: sequence number of the server's newest binlog file (its end), polled.
pub const SERVER_BINLOG_FILE: &str = "ecst_source_server_binlog_file_seq";
/// Gauge: size of the server's newest binlog file (the end position), polled.
pub const SERVER_BINLOG_POS: &str = "ecst_source_server_binlog_position";
/// Gauge: binlog bytes between the committed position and the server's end.
pub const BINLOG_BYTES_BEHIND: &str = "ecst_source_binlog_bytes_behind";
/// Gauge: binlog files on the server older than the committed position's file (0: that file is
/// the next a purge removes); -1 when that file is gone.
pub const BINLOG_FILES_BEFORE: &str = "ecst_source_binlog_files_before_position";
/// Gauge: the server's automatic binlog purge age in seconds (0: it never purges by age).
pub const BINLOG_EXPIRE_SECONDS: &str = "ecst_source_binlog_expire_seconds";
/// Gauge: the earliest an automatic purge can remove the committed position's file, in seconds
/// from now (a lower bound); only set while the server purges by age.
pub const BINLOG_PURGE_MARGIN_SECONDS: &str = "ecst_source_binlog_purge_margin_seconds";

/// Seconds since the Unix epoch, now.
pub fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Readiness flags set by the components, and the cause of each retry run under way.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Source connected and streaming (or not configured).
    pub source_ready: AtomicBool,
    /// Sink consuming (or not configured).
    pub sink_ready: AtomicBool,
    /// Component → what its retry run says (set by `retry::RetryLoop`).
    retrying: Mutex<BTreeMap<&'static str, String>>,
}

impl Readiness {
    /// Whether every configured component is ready and none is retrying.
    pub fn ready(&self) -> bool {
        self.source_ready.load(Ordering::Relaxed)
            && self.sink_ready.load(Ordering::Relaxed)
            && self.retrying.lock().map(|r| r.is_empty()).unwrap_or(false)
    }

    /// Marks `component` as retrying with `status` (`None`: no longer).
    pub fn set_retrying(&self, component: &'static str, status: Option<String>) {
        if let Ok(mut r) = self.retrying.lock() {
            match status {
                Some(s) => r.insert(component, s),
                None => r.remove(component),
            };
        }
    }

    /// One line per reason the process is not ready (empty when ready).
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(r) = self.retrying.lock() {
            out.extend(r.iter().map(|(c, s)| format!("{c}: {s}")));
        }
        for (component, flag) in [("source", &self.source_ready), ("sink", &self.sink_ready)] {
            if !flag.load(Ordering::Relaxed) && !out.iter().any(|l| l.starts_with(component)) {
                out.push(format!("{component}: starting"));
            }
        }
        out
    }
}

/// Installs the global recorder and describes every metric once. Returns the render handle.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0, 30.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe_counter!(SOURCE_EVENTS_TOTAL, "Change events produced to Kafka");
    describe_counter!(
        SOURCE_TRANSACTIONS_TOTAL,
        "Kafka transactions committed by the source"
    );
    describe_counter!(
        SOURCE_TRANSACTION_SPLITS_TOTAL,
        "Commits inside a source transaction too large for one Kafka transaction"
    );
    describe_gauge!(
        SOURCE_MS_BEHIND,
        Unit::Milliseconds,
        "Source lag behind the MySQL commit time"
    );
    describe_gauge!(
        SOURCE_BINLOG_FILE,
        "Binlog file sequence of the committed position"
    );
    describe_gauge!(
        SOURCE_BINLOG_POS,
        "Binlog byte position of the committed position"
    );
    describe_gauge!(SNAPSHOT_ROWS_DONE, "Snapshot rows read so far");
    describe_gauge!(
        SNAPSHOT_ROWS_TOTAL,
        "Estimated rows of the table being snapshotted"
    );
    describe_gauge!(SNAPSHOT_RUNNING, "1 while a snapshot runs");
    describe_counter!(
        SNAPSHOT_CHUNKS_REREAD_TOTAL,
        "Online snapshot chunks read again because the stream had passed their read view"
    );
    describe_counter!(
        SNAPSHOT_ROWS_LEFT_TO_STREAM_TOTAL,
        "Online snapshot rows left out of a chunk read between watermarks because the stream changed them there"
    );
    describe_counter!(
        SOURCE_RESTARTS_TOTAL,
        "Source restarts after transient errors"
    );
    describe_counter!(
        REGISTRY_REQUESTS_TOTAL,
        "HTTP requests sent to the schema registry (cached answers not counted)"
    );
    describe_counter!(SINK_APPLIED_TOTAL, "Change events applied to MongoDB");
    describe_counter!(
        SINK_STALE_TOTAL,
        "Events skipped because the stored copy was newer"
    );
    describe_counter!(SINK_DLQ_TOTAL, "Messages sent to the dead-letter topic");
    describe_counter!(RETRIES_TOTAL, "Retries after errors");
    describe_counter!(
        SOURCE_TABLE_LIFECYCLE_TOTAL,
        "DDL that truncated, dropped or renamed a captured table"
    );
    describe_gauge!(
        COMPONENT_RETRYING,
        "1 while the component retries a run of transient errors"
    );
    describe_gauge!(
        COMPONENT_LAST_ERROR_TS,
        Unit::Seconds,
        "Unix time of the component's last failure"
    );
    describe_counter!(
        COMPONENT_ERRORS_TOTAL,
        "Transient failures of the component by kind"
    );
    describe_gauge!(SINK_CONSUMER_LAG, "Sink consumer lag in messages");
    describe_histogram!(
        END_TO_END_LATENCY,
        Unit::Seconds,
        "MySQL commit to MongoDB applied"
    );
    describe_histogram!(
        SOURCE_COMMIT_SECONDS,
        Unit::Seconds,
        "Source Kafka transaction commit duration"
    );
    describe_histogram!(
        SINK_BATCH_SECONDS,
        Unit::Seconds,
        "Sink batch write duration"
    );
    describe_histogram!(
        PIPELINE_LATENCY,
        Unit::Seconds,
        "ecst read the change from the binlog to MongoDB applied"
    );
    describe_histogram!(
        PIPELINE_BEFORE_WRITE,
        Unit::Seconds,
        "ecst read the change from the binlog to the sink's MongoDB write began (ecst's own share)"
    );
    describe_gauge!(PROCESS_START_TS, "Unix time the process started");
    describe_gauge!(
        SOURCE_LAST_EVENT_TS,
        "Unix time the binlog reader last received an event (heartbeats included)"
    );
    describe_gauge!(
        SINK_MAPPING_INFO,
        "Which topic each sink mapping reads (always 1)"
    );
    describe_gauge!(
        SERVER_BINLOG_FILE,
        "Sequence number of the server's newest binlog file"
    );
    describe_gauge!(
        SERVER_BINLOG_POS,
        Unit::Bytes,
        "Size of the server's newest binlog file (its end position)"
    );
    describe_gauge!(
        BINLOG_BYTES_BEHIND,
        Unit::Bytes,
        "Binlog bytes between the committed position and the server's end"
    );
    describe_gauge!(
        BINLOG_FILES_BEFORE,
        "Binlog files older than the committed position's file (-1: that file is gone)"
    );
    describe_gauge!(
        BINLOG_EXPIRE_SECONDS,
        Unit::Seconds,
        "The server's automatic binlog purge age (0: never by age)"
    );
    describe_gauge!(
        BINLOG_PURGE_MARGIN_SECONDS,
        Unit::Seconds,
        "Earliest an automatic purge can remove the committed position's file, from now"
    );
    metrics::gauge!(PROCESS_START_TS).set(now_s().floor());
    Ok(handle)
}

/// Seconds between reloads of the status page.
const STATUS_REFRESH_S: u32 = 2;

/// Serves `/metrics`, `/health`, `/ready` and the status page `/` until the listener task is
/// dropped.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, readiness: Arc<Readiness>) {
    // Rates on the status page are measured between its requests, over a few seconds.
    let rates = Arc::new(Mutex::new(crate::status::Rates::default()));
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        let readiness = readiness.clone();
        let rates = rates.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let Ok(n) = sock.read(&mut buf).await else {
                return;
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let text = "text/plain; version=0.0.4";
            let (status, kind, body) = match path {
                "/metrics" => ("200 OK", text, handle.render()),
                "/health" => ("200 OK", text, "ok\n".to_string()),
                "/ready" if readiness.ready() => ("200 OK", text, "ready\n".to_string()),
                "/ready" => (
                    "503 Service Unavailable",
                    text,
                    format!("not ready\n{}\n", readiness.not_ready_reasons().join("\n")),
                ),
                "/" | "/index.html" => {
                    let cur = crate::status::Sample::parse(&handle.render());
                    let prev = rates
                        .lock()
                        .ok()
                        .and_then(|mut r| r.push(std::time::Instant::now(), &cur));
                    let not_ready = if readiness.ready() {
                        Vec::new()
                    } else {
                        readiness.not_ready_reasons()
                    };
                    let st = crate::status::Status::build(
                        &cur,
                        prev.as_ref().map(|(s, dt)| (s, *dt)),
                        now_s(),
                        not_ready,
                    );
                    (
                        "200 OK",
                        "text/html; charset=utf-8",
                        crate::status::render_html(&st, STATUS_REFRESH_S),
                    )
                }
                _ => ("404 Not Found", text, "not found\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            // A client that went away is not our problem.
            if let Err(e) = sock.write_all(resp.as_bytes()).await {
                tracing::debug!(error = %e, "metrics client went away");
            }
        });
    }
}
