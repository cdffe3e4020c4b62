//! Consistent initial snapshot, chunked by primary key.
//!
//! Consistency: on MariaDB, `START TRANSACTION WITH CONSISTENT SNAPSHOT` followed by
//! `SHOW STATUS LIKE 'binlog_snapshot_%'` yields the binlog position that matches the snapshot
//! exactly, with **no lock at all** (MariaDB's binlog-aware consistent snapshot). On MySQL the
//! position is taken under `FLUSH TABLES WITH READ LOCK`, released as soon as the snapshot
//! transaction is open (milliseconds). Streaming then starts at that position: every change
//! committed after the snapshot is in the binlog after it, every change before is in the rows
//! read, so nothing is lost or doubled at the hand-over.
//!
//! Chunking: rows are read in primary-key order, `chunk_size` rows per query
//! (`WHERE (pk) > (last) ORDER BY pk LIMIT n`), inside the one snapshot transaction, so memory is
//! bounded by one chunk and the channel. Events carry `source.snapshot = "true"` (`"last"` on
//! the final row) and the snapshot position as their version, so the sink never lets a snapshot
//! row overwrite a newer streamed change.
//!
//! Progress and resume: after each chunk the snapshot sends a [`SourceMsg::SnapshotProgress`]
//! with its [`SnapshotSegment`]s, which the producer stores in the same Kafka transaction as the
//! chunk's events. A restart resumes after the last stored boundary, in a new consistent read;
//! `source::window` explains how the stream then stays exact. Tables whose key does not order
//! the same in Rust and MySQL are checkpointed only at their end (see [`window::orderable`]);
//! on MariaDB the session hands them to the online snapshot instead (`source::online`), which
//! pages by the server's comparison and stores its progress with every chunk.

use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;

use super::decode::{Origin, convert};
use super::table_map::from_information_schema;
use super::window;
use super::{Outbox, SourceError, SourceMsg, connect};
use crate::config::{MysqlConfig, SnapshotLocking};
use crate::events::{ChangeEvent, Op, SourceInfo, TableSchema, Value};
use crate::metrics as m;
use crate::offsets::{BinlogPosition, SnapshotSegment};

/// Snapshots `tables`, resuming after the last of `resume` (empty: from the start), and
/// returns every segment (the stream starts at the first segment's position) and, on MySQL, the
/// GTID set at that position when it is this run's (a fresh snapshot).
pub async fn run_snapshot(
    cfg: &MysqlConfig,
    tables: &[String],
    chunk: ChunkBounds,
    locks: LockPolicy,
    epoch: u64,
    tx: &Outbox,
    resume: Vec<SnapshotSegment>,
) -> Result<(Vec<SnapshotSegment>, Option<String>), SourceError> {
    let fresh = resume.is_empty();
    let mut conn = connect(cfg).await?;
    conn.query_drop("SET SESSION time_zone = '+00:00'").await?;
    conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await?;
    let version: String = conn
        .query_first("SELECT VERSION()")
        .await?
        .unwrap_or_default();
    let mariadb = version.contains("MariaDB");
    let LockPolicy {
        wait_s: lock_wait_s,
        locking,
    } = locks;
    // MySQL: the GTID set at the snapshot's position (read under the same lock).
    let mut executed: Option<String> = None;
    let method = match (locking, mariadb) {
        // `online` reads here only what the online snapshot cannot (a resumed snapshot of an
        // earlier method, a table added without a primary key): as `auto` would.
        (SnapshotLocking::Auto | SnapshotLocking::Online, true) => Method::ConsistentSnapshot,
        (SnapshotLocking::Auto | SnapshotLocking::Online, false) => {
            Method::GlobalLock { fallback: true }
        }
        (SnapshotLocking::Global, true) => Method::ConsistentSnapshot,
        (SnapshotLocking::Global, false) => Method::GlobalLock { fallback: false },
        (SnapshotLocking::Tables, _) => Method::TableLocks,
    };
    // Waiting for a lock is bounded, so a long query makes this attempt fail (and retry later)
    // instead of stalling every writer queued behind the lock request.
    conn.query_drop(format!(
        "SET SESSION lock_wait_timeout = {}",
        lock_wait_s.max(1)
    ))
    .await?;
    let (position, table_locks) = match method {
        Method::ConsistentSnapshot => (open_consistent_read(&mut conn).await?, false),
        Method::GlobalLock { fallback } => {
            match lock(&mut conn, "FLUSH TABLES WITH READ LOCK", lock_wait_s).await {
                Ok(()) => {
                    // The global read lock is held only while the position is read and the snapshot
                    // transaction opened.
                    let opened = async {
                        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
                            .await?;
                        super::preflight::binlog_status(&mut conn).await
                    }
                    .await;
                    conn.query_drop("UNLOCK TABLES").await?;
                    let (position, set) = opened?;
                    executed = set;
                    (position, false)
                }
                // 1227/1045/1044: the server refuses FTWRL to this user (RDS, Aurora).
                Err(SourceError::Mysql(mysql_async::Error::Server(e)))
                    if fallback && matches!(e.code, 1227 | 1045 | 1044) =>
                {
                    tracing::warn!(error = %e.message, "FLUSH TABLES WITH READ LOCK refused: snapshotting under per-table locks instead (writers of the captured tables wait until the snapshot ends; source.snapshot_locking)");
                    let (position, set) = table_locked(&mut conn, tables, lock_wait_s).await?;
                    executed = set;
                    (position, true)
                }
                Err(e) => return Err(e),
            }
        }
        Method::TableLocks => {
            let (position, set) = table_locked(&mut conn, tables, lock_wait_s).await?;
            executed = set;
            (position, true)
        }
    };
    if position.file.is_empty() {
        return Err(SourceError::NoBinlogPosition);
    }
    let (first_table, first_key) = resume
        .last()
        .map_or((0, None), |s| (s.tables_done, s.last_key.clone()));
    if resume.is_empty() {
        tracing::info!(%position, tables = tables.len(), "snapshot started");
    } else {
        tracing::info!(%position, tables = tables.len(), tables_done = first_table, resume_after_key = ?first_key, "snapshot resumed after the last committed chunk");
    }
    let mut segments = resume;
    segments.push(SnapshotSegment {
        at: position.clone(),
        tables_done: first_table,
        last_key: first_key.clone(),
    });
    metrics::gauge!(m::SNAPSHOT_RUNNING).set(1.0);
    let ts_ms = crate::events::now_ms();
    let file: std::sync::Arc<str> = std::sync::Arc::from(position.file.as_str());
    let mut schemas = Vec::new();
    for qn in tables {
        let (db, table) = qn.split_once('.').unwrap_or(("", qn));
        schemas.push(std::sync::Arc::new(
            from_information_schema(&mut conn, db, table).await?,
        ));
    }
    let last_table = schemas.len().saturating_sub(1);
    // Rows handed over by this run of the snapshot (test pause points count them).
    let mut sent_rows: u64 = 0;
    // Progress is logged at most every PROGRESS_LOG_EVERY (a line per chunk was 4,000 lines
    // for 1,000 small tables); each table's end is always logged.
    let mut progress_logged = Instant::now();
    for (ti, schema) in schemas.iter().enumerate().skip(first_table) {
        let qn = schema.qualified_name();
        let estimate: Option<u64> = conn
            .exec_first(
                "SELECT TABLE_ROWS FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                (&schema.db, &schema.table),
            )
            .await?
            .flatten();
        let estimate = estimate.unwrap_or(0);
        metrics::gauge!(m::SNAPSHOT_ROWS_TOTAL, m::TABLE_LABEL => qn.clone()).set(estimate as f64);
        let started = Instant::now();
        let mut done: u64 = 0;
        let mut last_key: Option<Vec<Value>> = if ti == first_table {
            first_key.clone()
        } else {
            None
        };
        let mut pending: Option<ChangeEvent> = None;
        let mut out = Handover {
            tx,
            schema,
            ti,
            template: SourceInfo {
                ts_ms,
                snapshot: "true",
                server_id: 0,
                gtid: None,
                file: file.clone(),
                pos: position.pos,
                row: 0,
                epoch,
                read_ts_ms: ts_ms,
            },
            pending: &mut pending,
            segments: &mut segments,
            sent_rows: &mut sent_rows,
        };
        // Chunks start small and grow while rows are narrow: no chunk holds more than
        // `chunk.bytes` of values (a table of 1 MB rows is read a few dozen rows at a time).
        let mut limit = chunk.rows.min(FIRST_CHUNK_ROWS);
        loop {
            let (n, bytes) = if schema.key.is_empty() {
                // No key to page by: one scan, streamed and handed over in bounded batches.
                let n = stream_keyless(&mut conn, &mut out, chunk).await?;
                (n, 0)
            } else {
                let rows = read_chunk(&mut conn, schema, last_key.as_deref(), limit).await?;
                let n = rows.len();
                let bytes: usize = rows.iter().map(|r| row_bytes(r)).sum();
                if let Some(row) = rows.last() {
                    last_key = Some(schema.key_of(row));
                }
                out.hand_over(rows).await?;
                (n, bytes)
            };
            done += n as u64;
            metrics::gauge!(m::SNAPSHOT_ROWS_DONE, m::TABLE_LABEL => qn.clone()).set(done as f64);
            let secs = started.elapsed().as_secs_f64().max(1e-6);
            let rate = done as f64 / secs;
            let eta_s = if rate > 0.0 {
                estimate.saturating_sub(done) as f64 / rate
            } else {
                0.0
            };
            if progress_logged.elapsed() >= PROGRESS_LOG_EVERY {
                progress_logged = Instant::now();
                tracing::info!(table = %qn, rows_done = done, rows_total = estimate, rows_per_s = rate as u64, eta_s = eta_s as u64, "snapshot progress");
            }
            if schema.key.is_empty() || (n as u64) < u64::from(limit) {
                break;
            }
            limit = next_limit(limit, n, bytes, chunk);
        }
        if let Some(mut ev) = pending.take() {
            if ti == last_table {
                ev.source.snapshot = "last";
            }
            tx.send(SourceMsg::Changes(vec![ev])).await?;
        }
        if let Some(seg) = segments.last_mut() {
            seg.tables_done = ti + 1;
            seg.last_key = None;
        }
        tx.send(SourceMsg::SnapshotProgress(segments.clone()))
            .await?;
        // The estimate gives way to the count: done == total says this table is finished.
        metrics::gauge!(m::SNAPSHOT_ROWS_TOTAL, m::TABLE_LABEL => qn.clone()).set(done as f64);
        tracing::info!(table = %qn, rows = done, "snapshot of table finished");
    }
    conn.query_drop(if table_locks {
        "UNLOCK TABLES"
    } else {
        "COMMIT"
    })
    .await?;
    metrics::gauge!(m::SNAPSHOT_RUNNING).set(0.0);
    tracing::info!(%position, "snapshot finished");
    Ok((segments, executed.filter(|_| fresh)))
}

/// Opens a consistent read on MariaDB and returns the binlog position it matches exactly
/// (`binlog_snapshot_file/position`, no lock). The position's file is empty where the server
/// has no such status (MySQL).
pub(super) async fn open_consistent_read(
    conn: &mut mysql_async::Conn,
) -> Result<BinlogPosition, SourceError> {
    conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
        .await?;
    let rows: Vec<(String, String)> = conn.query("SHOW STATUS LIKE 'binlog_snapshot_%'").await?;
    let get = |k: &str| {
        rows.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    let file = get("Binlog_snapshot_file").unwrap_or_default();
    let pos = get("Binlog_snapshot_position")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    Ok(BinlogPosition { file, pos })
}

/// The snapshot's locking: `source.snapshot_locking` and `source.snapshot_lock_wait_s`.
#[derive(Debug, Clone, Copy)]
pub struct LockPolicy {
    /// Seconds a lock is waited for.
    pub wait_s: u64,
    /// The method.
    pub locking: SnapshotLocking,
}

/// How a snapshot's position is made consistent with its rows (`source.snapshot_locking`).
#[derive(Debug, Clone, Copy)]
enum Method {
    /// MariaDB: the read view's own binlog position, no lock.
    ConsistentSnapshot,
    /// FTWRL for milliseconds; `fallback`: per-table locks where the server refuses it.
    GlobalLock { fallback: bool },
    /// `LOCK TABLES … READ` for the whole snapshot.
    TableLocks,
}

/// Runs a lock statement; a lock wait timeout is the classed `SnapshotLock` error.
async fn lock(
    conn: &mut mysql_async::Conn,
    stmt: &str,
    lock_wait_s: u64,
) -> Result<(), SourceError> {
    match conn.query_drop(stmt).await {
        Ok(()) => Ok(()),
        // 1205: lock wait timeout exceeded.
        Err(mysql_async::Error::Server(e)) if e.code == 1205 => Err(SourceError::SnapshotLock {
            seconds: lock_wait_s,
            detail: e.message,
        }),
        Err(e) => Err(e.into()),
    }
}

/// Read-locks every table to snapshot (held until the snapshot's end: the rows cannot change
/// while they are read, so the binlog position read now is consistent with all of them), and
/// reads the position. No transaction is opened: one would release the locks.
async fn table_locked(
    conn: &mut mysql_async::Conn,
    tables: &[String],
    lock_wait_s: u64,
) -> Result<(BinlogPosition, Option<String>), SourceError> {
    let list: Vec<String> = tables
        .iter()
        .map(|t| {
            let (db, table) = t.split_once('.').unwrap_or(("", t));
            format!("{}.{} READ", quote_ident(db), quote_ident(table))
        })
        .collect();
    lock(
        conn,
        &format!("LOCK TABLES {}", list.join(", ")),
        lock_wait_s,
    )
    .await?;
    super::preflight::binlog_status(conn).await
}

/// Rows of a table's first chunk (see [`next_limit`]).
pub(super) const FIRST_CHUNK_ROWS: u32 = 256;

/// The least time between two "snapshot progress" log lines.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(10);

/// How much one snapshot chunk may hold.
#[derive(Debug, Clone, Copy)]
pub struct ChunkBounds {
    /// Rows (`source.snapshot_chunk_size`).
    pub rows: u32,
    /// Bytes of decoded values (`source.snapshot_chunk_max_bytes`).
    pub bytes: usize,
}

/// The next chunk's row limit after one of `n` rows and `bytes`: what fits in the byte bound at
/// this chunk's mean row size, at most double the last limit, within 1 ..= `bounds.rows`.
pub fn next_limit(limit: u32, n: usize, bytes: usize, bounds: ChunkBounds) -> u32 {
    let mean = (bytes / n.max(1)).max(1);
    let fits = u32::try_from(bounds.bytes / mean).unwrap_or(u32::MAX);
    fits.min(limit.saturating_mul(2))
        .clamp(1, bounds.rows.max(1))
}

pub(super) use super::handover::row_bytes;

/// Hands snapshot rows to the producer loop: one change event per row, the table's last row
/// held back (it is marked `snapshot = last` when the table is the last one), and a progress
/// checkpoint after each batch whose last key orders like MySQL's.
struct Handover<'a> {
    tx: &'a Outbox,
    schema: &'a std::sync::Arc<TableSchema>,
    ti: usize,
    template: SourceInfo,
    pending: &'a mut Option<ChangeEvent>,
    segments: &'a mut Vec<SnapshotSegment>,
    sent_rows: &'a mut u64,
}

impl Handover<'_> {
    async fn hand_over(&mut self, rows: Vec<Vec<Value>>) -> Result<(), SourceError> {
        let mut batch = Vec::with_capacity(rows.len());
        for row in rows {
            if let Some(ev) = self.pending.take() {
                batch.push(ev);
            }
            *self.pending = Some(ChangeEvent {
                schema: self.schema.clone(),
                op: Op::Read,
                before: None,
                after: Some(row),
                source: self.template.clone(),
            });
        }
        let Some(sent_key) = batch.last().map(|ev| ev.key()) else {
            return Ok(());
        };
        *self.sent_rows += batch.len() as u64;
        self.tx.send(SourceMsg::Changes(batch)).await?;
        // Checkpoint after the last row *sent* (the held-back one is not covered yet).
        if window::orderable(&sent_key)
            && let Some(seg) = self.segments.last_mut()
        {
            seg.tables_done = self.ti;
            seg.last_key = Some(sent_key);
            self.tx
                .send(SourceMsg::SnapshotProgress(self.segments.clone()))
                .await?;
        }
        crate::failpoint::pause_if_armed("snapshot.rows", *self.sent_rows).await;
        Ok(())
    }
}

/// A table without a primary key: one `SELECT` read as a stream, handed over in batches of at
/// most `bounds` (never the whole table in memory). Returns the rows read.
async fn stream_keyless(
    conn: &mut mysql_async::Conn,
    out: &mut Handover<'_>,
    bounds: ChunkBounds,
) -> Result<usize, SourceError> {
    let schema = out.schema.clone();
    let cols: Vec<String> = schema
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let sql = format!(
        "SELECT {} FROM {}.{}",
        cols.join(", "),
        quote_ident(&schema.db),
        quote_ident(&schema.table)
    );
    // A prepared statement: the binary protocol, as every snapshot read (`decode::Origin`).
    let mut result = conn.exec_iter(sql, ()).await?;
    let mut batch: Vec<Vec<Value>> = Vec::new();
    let mut bytes = 0usize;
    let mut n = 0usize;
    while let Some(row) = result.next().await? {
        let decoded = decode_row(&schema, row)?;
        bytes += row_bytes(&decoded);
        batch.push(decoded);
        n += 1;
        if batch.len() >= bounds.rows as usize || bytes >= bounds.bytes {
            out.hand_over(std::mem::take(&mut batch)).await?;
            bytes = 0;
        }
    }
    drop(result);
    out.hand_over(batch).await?;
    Ok(n)
}

fn decode_row(schema: &TableSchema, row: mysql_async::Row) -> Result<Vec<Value>, SourceError> {
    let values: Vec<mysql_async::Value> = row
        .unwrap_raw()
        .into_iter()
        .map(|v| v.unwrap_or(mysql_async::Value::NULL))
        .collect();
    let mut decoded = Vec::with_capacity(values.len());
    for (col, v) in schema.columns.iter().zip(values) {
        decoded.push(convert(col, v, Origin::Snapshot, false)?);
    }
    Ok(decoded)
}

fn quote_ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// One chunk of a keyed table, in key order after `after`.
pub(super) async fn read_chunk(
    conn: &mut mysql_async::Conn,
    schema: &TableSchema,
    after: Option<&[Value]>,
    chunk_size: u32,
) -> Result<Vec<Vec<Value>>, SourceError> {
    let cols: Vec<String> = schema
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let from = format!("{}.{}", quote_ident(&schema.db), quote_ident(&schema.table));
    let key_cols: Vec<String> = schema
        .key
        .iter()
        .filter_map(|&i| schema.columns.get(i))
        .map(|c| quote_ident(&c.name))
        .collect();
    let mut params: Vec<mysql_async::Value> = Vec::new();
    let order = key_cols.join(", ");
    let filter = match after {
        Some(key) => {
            for v in key {
                params.push(to_param(v));
            }
            let marks = vec!["?"; key.len()].join(", ");
            format!("WHERE ({order}) > ({marks})")
        }
        None => String::new(),
    };
    let sql = format!(
        "SELECT {} FROM {from} {filter} ORDER BY {order} LIMIT {chunk_size}",
        cols.join(", ")
    );
    let rows: Vec<mysql_async::Row> = conn
        .exec(sql, mysql_async::Params::Positional(params))
        .await?;
    rows.into_iter().map(|r| decode_row(schema, r)).collect()
}

/// A key value back as a query parameter (keyset pagination).
fn to_param(v: &Value) -> mysql_async::Value {
    use mysql_async::Value as P;
    match v {
        Value::Null => P::NULL,
        Value::Boolean(b) => P::Int(i64::from(*b)),
        Value::Int(i) => P::Int(i64::from(*i)),
        Value::Long(i) => P::Int(*i),
        Value::Decimal(s) | Value::String(s) => P::Bytes(s.clone().into_bytes()),
        Value::Float(f) => P::Float(*f),
        Value::Double(d) => P::Double(*d),
        Value::Date(d) => {
            let (y, m, dd) = civil_from_days(i64::from(*d));
            P::Date(y as u16, m as u8, dd as u8, 0, 0, 0, 0)
        }
        Value::Micros(us) => {
            let secs = us.div_euclid(1_000_000);
            let micros = us.rem_euclid(1_000_000) as u32;
            let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
            let sod = secs.rem_euclid(86_400);
            P::Date(
                y as u16,
                m as u8,
                d as u8,
                (sod / 3600) as u8,
                (sod % 3600 / 60) as u8,
                (sod % 60) as u8,
                micros,
            )
        }
        Value::TimeMicros(us) => {
            let neg = *us < 0;
            let a = us.unsigned_abs();
            let secs = a / 1_000_000;
            P::Time(
                neg,
                (secs / 86_400) as u32,
                (secs % 86_400 / 3600) as u8,
                (secs % 3600 / 60) as u8,
                (secs % 60) as u8,
                (a % 1_000_000) as u32,
            )
        }
        Value::Bytes(b) => P::Bytes(b.clone()),
    }
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_grow_while_rows_are_narrow_and_shrink_to_the_byte_bound_for_wide_ones() {
        let b = ChunkBounds {
            rows: 10_000,
            bytes: 32 << 20,
        };
        // 256 narrow rows: double, up to the row bound.
        assert_eq!(next_limit(256, 256, 256 * 100, b), 512);
        assert_eq!(next_limit(8_000, 8_000, 8_000 * 100, b), 10_000);
        // 1 MB rows: what fits in 32 MiB.
        assert_eq!(next_limit(256, 256, 256 << 20, b), 32);
        // Rows larger than the bound: one at a time, never zero.
        assert_eq!(next_limit(32, 1, 64 << 20, b), 1);
    }
    use crate::source::decode::days_from_civil;

    #[test]
    fn civil_days_round_trip() {
        for d in [-1_000_000i64, -1, 0, 19_782, 2_932_896] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }
}
