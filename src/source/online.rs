//! Online snapshots of single tables while every captured table keeps streaming: for a table
//! added to `source.tables` of a deployment that already streams, and on demand
//! (`ecst snapshot db.table`, through `source::signal`). No lock is taken, and nothing waits.
//!
//! This is DBLog's idea (Andreakis & Papapanagiotou, 2020; Debezium's incremental snapshots):
//! interleave key-ordered chunks of the table with the binlog stream, and place each chunk in
//! the stream where it cannot move any row backwards. DBLog brackets each chunk between two
//! watermark writes and drops from the chunk every key the stream changed between them. MariaDB
//! lets us do without the writes (ecst's user only reads) and without dropping anything: a chunk
//! is read inside `START TRANSACTION WITH CONSISTENT SNAPSHOT`, whose `binlog_snapshot_position`
//! is the **exact** binlog position `P` of that read view — every transaction before `P` is in
//! the rows read, none after it.
//!
//! **The rule.** A chunk read at `P` is handed to the producer exactly when the stream's resume
//! point `B` (the last transaction boundary, with nothing of the next transaction published:
//! [`Decoder::resume_point`]) satisfies `B ≤ P ≤ S`, where `S` ≥ `B` is how far the stream is
//! read with nothing open (a heartbeat heard between transactions, [`Decoder::settled_to`]; no
//! transaction ends between `B` and `S`). Then, for every key `k` of the chunk:
//!
//! * every change to `k` before `P` lies before `B`, so it was published before the chunk, and
//!   the chunk's row already shows it;
//! * every change to `k` after `P` is published after the chunk.
//!
//! So in each key's order the chunk's row sits exactly where its read view was taken, and its
//! version (`P`, row 0) sorts after the changes before `P` and before those after it
//! (`offsets::version_of`: a change is placed at its transaction's start plus its row index).
//!
//! If the stream is still before `P` (`B < P`: the server committed more than was read yet),
//! the chunk waits until the stream reaches it. If the stream is already past `P` when the chunk
//! is read or while it waits (`P < B`: a transaction written to the binlog before its read view
//! included it, or a boundary that jumped over `P`), the chunk is dropped and read again a little
//! later, at a new read view, which then lies at or after `B`. Keys are never compared in Rust,
//! so any key (text in any collation, composite, binary) is paged by the server's own
//! `ORDER BY`. Chunks are read only once the stream is past the stretch a resumed initial
//! snapshot spanned (`source::window`), where a row's changes are filtered by the position it
//! was read at.
//!
//! **Exactly once.** A chunk and the progress it makes ([`OnlineState`]: the table's last key)
//! reach the producer loop together, and the progress is stored with a resume position in the
//! same Kafka transaction as the chunk's rows. After a crash the stream resumes at the stored
//! position and the snapshot after the stored key; what was published but not committed is
//! aborted with its transaction. Reading a chunk twice is harmless anyway: a row at a later read
//! view is a later version.
//!
//! **Bounds.** A chunk holds at most `source.snapshot_chunk_size` rows and
//! `source.snapshot_chunk_max_bytes` of values (it starts small and grows while rows are
//! narrow, as the initial snapshot's chunks do); one chunk is in memory at a time, and it goes
//! through the same permit-bounded hand-over as every change.
//!
//! **Where it runs.** The read view's position is MariaDB's. Where `source.watermark_table` is
//! set (the way on MySQL, which has no binlog position tied to a read view, and a choice on
//! MariaDB), chunks are placed by watermarks instead ([`Method::Watermarks`], DBLog's method:
//! `source::watermark` argues it). On MySQL without a watermark table, a table added to
//! `source.tables` is snapshotted at the start, before the stream resumes, as it was before
//! online snapshots existed, and `ecst snapshot` is refused with that fix. Tables without a
//! primary key cannot be paged; they are refused the same way (loudly, in the log and in
//! `ecst check`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;

use super::decoder::Decoder;
use super::snapshot::{ChunkBounds, FIRST_CHUNK_ROWS, next_limit, read_chunk, row_bytes};
use super::table_map::from_information_schema;
use super::watermark::Watch;
use super::{Outbox, SourceError, SourceMsg, connect};
use crate::config::MysqlConfig;
use crate::events::{ChangeEvent, Op, SourceInfo, TableSchema, Value};
use crate::metrics as m;
use crate::offsets::{BinlogPosition, OnlineState, OnlineTable};

/// The longest wait before a chunk read behind the stream is read again.
const MAX_RETRY_WAIT: Duration = Duration::from_millis(200);

/// Where a chunk read at `at` goes, the stream standing at resume point `resume` and read with
/// nothing open up to `settled` (the rule of the module note).
#[derive(Debug, PartialEq, Eq)]
enum Placement {
    /// `resume ≤ at ≤ settled`: hand it over now.
    Now,
    /// `resume < at`, beyond `settled`: the stream has not reached the read view yet.
    Wait,
    /// `at < resume`, or positions that do not compare (another file numbering): the stream has
    /// passed the read view; read the chunk again.
    ReadAgain,
}

fn placement(resume: &BinlogPosition, settled: &BinlogPosition, at: &BinlogPosition) -> Placement {
    use std::cmp::Ordering::{Equal, Greater, Less};
    match (resume.partial_cmp(at), at.partial_cmp(settled)) {
        (Some(Less | Equal), Some(Less | Equal)) => Placement::Now,
        (Some(Less), Some(Greater)) => Placement::Wait,
        _ => Placement::ReadAgain,
    }
}

/// How chunks are placed in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// At the read view's exact binlog position (MariaDB's `binlog_snapshot_position`).
    ReadView,
    /// Between two writes to `table` (`source::watermark`), as the row of `source`.
    Watermarks {
        /// `source.watermark_table`.
        table: String,
        /// This source's name, its row in the table.
        source: String,
    },
    /// Neither: MySQL without `source.watermark_table`.
    Unsupported,
}

impl Method {
    /// The method for a server (`mariadb`) and the configured watermark table, which is
    /// chosen wherever it is set.
    pub fn choose(mariadb: bool, watermark_table: Option<&str>, source: &str) -> Method {
        match (watermark_table, mariadb) {
            (Some(t), _) => Method::Watermarks {
                table: t.to_string(),
                source: source.to_string(),
            },
            (None, true) => Method::ReadView,
            (None, false) => Method::Unsupported,
        }
    }

    /// Whether online snapshots can run.
    pub fn supported(&self) -> bool {
        *self != Method::Unsupported
    }

    /// What the stream must watch for.
    pub fn watch(&self) -> Option<Watch> {
        match self {
            Method::Watermarks { table, source } => Some(Watch::new(table.clone(), source.clone())),
            _ => None,
        }
    }

    /// Why online snapshots cannot run, when they cannot.
    pub fn unsupported_why(&self) -> Option<&'static str> {
        (*self == Method::Unsupported).then_some(
            "this server gives no binlog position for a consistent read (MySQL) and source.watermark_table is not set",
        )
    }
}

/// A chunk read and not yet handed over.
struct Chunk {
    /// The read view's exact binlog position; by watermarks, the resume point it is handed
    /// over at (set then).
    at: BinlogPosition,
    /// Read between watermarks: the binlog's end after the high one was written.
    marks_end: Option<BinlogPosition>,
    /// The key of its last row as read (before any row is dropped): the next chunk's start.
    last_key: Option<Vec<Value>>,
    /// Its rows, in key order.
    rows: Vec<Vec<Value>>,
    /// The shape they were read with.
    schema: Arc<TableSchema>,
    /// Fewer rows than asked for: the table ends with this chunk.
    last: bool,
    /// The row limit it was read with (the next one grows from it).
    limit: u32,
    /// Its rows' approximate bytes.
    bytes: usize,
}

/// The online snapshots of one reader session.
pub struct Online {
    cfg: MysqlConfig,
    epoch: u64,
    bounds: ChunkBounds,
    state: OnlineState,
    method: Method,
    /// The last watermark number written (they grow across sessions: the clock's microseconds
    /// at least).
    mark: u64,
    /// The side connection chunks are read on.
    conn: Option<mysql_async::Conn>,
    pending: Option<Chunk>,
    /// The row limit of the next chunk.
    limit: u32,
    /// A chunk read behind the stream: the next read waits until then.
    not_before: Option<Instant>,
    /// Reads behind the stream in a row (the wait doubles with each).
    behind: u32,
    /// When the first table's snapshot started (this session).
    started: Instant,
}

impl Online {
    /// The online snapshots of `state`, read from `cfg`'s server by `method` (none is run when
    /// it is unsupported).
    pub fn new(
        cfg: MysqlConfig,
        epoch: u64,
        bounds: ChunkBounds,
        state: OnlineState,
        method: Method,
    ) -> Self {
        if let Some(t) = state.tables.first() {
            if method.supported() {
                tracing::info!(table = %t.table, after_key = ?t.last_key, queued = state.tables.len(), "online snapshot running while the stream goes on");
            } else {
                let tables: Vec<&str> = state.tables.iter().map(|t| t.table.as_str()).collect();
                tracing::error!(
                    ?tables,
                    "online snapshots stored by an earlier run cannot go on here (this server gives no binlog position for a consistent read and source.watermark_table is not set): set source.watermark_table, or re-snapshot these tables with `ecst offsets reset --source resnapshot-table:DB.TABLE` while the source is stopped"
                );
            }
        }
        let running = !state.tables.is_empty();
        metrics::gauge!(m::SNAPSHOT_RUNNING).set(if running { 1.0 } else { 0.0 });
        Online {
            cfg,
            epoch,
            bounds,
            state,
            method,
            mark: 0,
            conn: None,
            pending: None,
            limit: FIRST_CHUNK_ROWS.min(bounds.rows.max(1)),
            not_before: None,
            behind: 0,
            started: Instant::now(),
        }
    }

    /// What the stream must watch for (the watermarks, when chunks are placed by them).
    pub fn watch(&self) -> Option<Watch> {
        self.method.watch()
    }

    /// Whether a chunk should be read now: the stream is at a resume point, and past the stretch
    /// a resumed snapshot spanned (inside it, a row's changes are filtered by the position it
    /// was read at, which a chunk read there could precede).
    pub fn wants_read(&self, decoder: &Decoder) -> bool {
        // (Checked before every event: the cheap fields first, so a source with no online
        // snapshot running asks the decoder nothing.)
        !self.state.tables.is_empty()
            && self.method.supported()
            && self.pending.is_none()
            && decoder.resume_point().is_some()
            && !decoder.in_window()
    }

    /// Resolves when the next chunk may be read (at once, or after a read behind the stream).
    pub async fn ready(&self) {
        if let Some(t) = self.not_before {
            tokio::time::sleep_until(t.into()).await;
        }
    }

    /// Reads the next chunk of the first table, and hands it over at once if the stream stands
    /// at its position.
    pub async fn read_next(
        &mut self,
        decoder: &mut Decoder,
        tx: &Outbox,
    ) -> Result<(), SourceError> {
        let Some(t) = self.state.tables.first() else {
            return Ok(());
        };
        let (table, after, rows_done) = (t.table.clone(), t.last_key.clone(), t.rows_done);
        if self.conn.is_none() {
            let mut c = connect(&self.cfg).await?;
            c.query_drop("SET SESSION time_zone = '+00:00'").await?;
            c.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .await?;
            c.query_drop("SET SESSION autocommit = 1").await?;
            self.conn = Some(c);
        }
        // Watermark numbers grow across sessions and restarts: never below the clock's
        // microseconds, so a watermark of an earlier session is never taken for this one's.
        let marks = match &self.method {
            Method::Watermarks { table: wt, source } => {
                let now = u64::try_from(crate::events::now_ms()).unwrap_or(0) * 1000;
                let low = self.mark.saturating_add(1).max(now);
                self.mark = low + 1;
                Some((wt.clone(), source.clone(), low))
            }
            _ => None,
        };
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let (db, name) = table.split_once('.').unwrap_or(("", &table));
        let limit = self.limit;
        let read = async {
            let Some((wt, source, low)) = &marks else {
                let at = super::snapshot::open_consistent_read(conn).await?;
                let schema = from_information_schema(conn, db, name).await?;
                let rows = if schema.key.is_empty() {
                    Vec::new()
                } else {
                    read_chunk(conn, &schema, after.as_deref(), limit).await?
                };
                // A concurrent ALTER between the shape and the read: read again with the new
                // shape.
                let again = from_information_schema(conn, db, name).await?;
                conn.query_drop("COMMIT").await?;
                return Ok::<_, SourceError>((at, None, schema, rows, again));
            };
            // By watermarks (`source::watermark`): the stream records the keys changed
            // between the two writes, and the read happens between them, in autocommit.
            let schema = from_information_schema(conn, db, name).await?;
            if let Some(w) = decoder.watermarks_mut() {
                w.open(table.clone(), *low, low + 1);
            }
            super::watermark::write(conn, wt, source, *low).await?;
            let rows = if schema.key.is_empty() {
                Vec::new()
            } else {
                read_chunk(conn, &schema, after.as_deref(), limit).await?
            };
            crate::failpoint::pause_if_armed("online.between_watermarks", rows_done).await;
            super::watermark::write(conn, wt, source, low + 1).await?;
            let (end, _) = super::preflight::binlog_status(conn).await?;
            let again = from_information_schema(conn, db, name).await?;
            Ok((end.clone(), Some(end), schema, rows, again))
        }
        .await;
        let (at, marks_end, schema, rows, again) = match read {
            Ok(r) => r,
            // Dropped (or renamed) while it was being read: the stream logs and counts that
            // (`table_lifecycle`); its snapshot ends here, and every other table streams on.
            Err(SourceError::TableNotFound { .. }) => {
                let _ = conn.query_drop("ROLLBACK").await;
                close_window(decoder);
                tracing::error!(table = %table, rows_done = self.state.tables.first().map_or(0, |t| t.rows_done), "the table of the running online snapshot is gone (dropped or renamed): its snapshot ends unfinished");
                return self.finish_first(decoder, tx).await;
            }
            Err(e) => {
                // The connection's state is unknown: a new one next time.
                self.conn = None;
                close_window(decoder);
                return Err(e);
            }
        };
        let refused = if marks_end.is_none() && at.file.is_empty() {
            Some(
                "this server gives no binlog position for a consistent read (binlog_snapshot_position: MySQL) and source.watermark_table is not set",
            )
        } else if schema.key.is_empty() {
            Some("the table has no primary key to page it by")
        } else {
            None
        };
        if let Some(why) = refused {
            close_window(decoder);
            // Refused, loudly, without stopping the stream of every other table: the session's
            // start routes added tables it cannot snapshot online to the snapshot at the start,
            // so only a signal ends here (`ecst snapshot` refuses these itself).
            let err = SourceError::OnlineUnsupported {
                table: table.clone(),
                why: why.into(),
            };
            tracing::error!(table = %table, error = %err, "online snapshot refused");
            return self.finish_first(decoder, tx).await;
        }
        if again.columns.len() != schema.columns.len()
            || again
                .columns
                .iter()
                .zip(&schema.columns)
                .any(|(a, b)| a.name != b.name || a.kind != b.kind)
        {
            close_window(decoder);
            tracing::info!(table = %table, "table altered while a chunk was read: reading it again");
            return Ok(());
        }
        let n = rows.len();
        let bytes = rows.iter().map(|r| row_bytes(r)).sum();
        let last_key = rows.last().map(|r| schema.key_of(r));
        self.pending = Some(Chunk {
            at,
            marks_end,
            last_key,
            rows,
            schema: Arc::new(schema),
            last: n < limit as usize,
            limit,
            bytes,
        });
        self.place(decoder, tx).await
    }

    /// Ends the first table's snapshot without reading more of it, and stores that.
    async fn finish_first(&mut self, decoder: &Decoder, tx: &Outbox) -> Result<(), SourceError> {
        if !self.state.tables.is_empty() {
            self.state.tables.remove(0);
        }
        self.limit = FIRST_CHUNK_ROWS.min(self.bounds.rows.max(1));
        if self.state.tables.is_empty() {
            metrics::gauge!(m::SNAPSHOT_RUNNING).set(0.0);
        }
        tx.send(SourceMsg::OnlineProgress {
            state: self.state.clone(),
            at: decoder.resume_point(),
        })
        .await
    }

    /// After each event: hands the waiting chunk over if the stream now stands at its position,
    /// or drops it if the stream went past.
    pub async fn after_event(
        &mut self,
        decoder: &mut Decoder,
        tx: &Outbox,
    ) -> Result<(), SourceError> {
        if self.pending.is_none() {
            return Ok(());
        }
        self.place(decoder, tx).await
    }

    /// The rule of the module note.
    async fn place(&mut self, decoder: &mut Decoder, tx: &Outbox) -> Result<(), SourceError> {
        if self.pending.as_ref().is_some_and(|c| c.marks_end.is_some()) {
            return self.place_by_watermarks(decoder, tx).await;
        }
        let (Some(chunk), Some(resume), Some(settled)) = (
            self.pending.as_ref(),
            decoder.resume_point(),
            decoder.settled_to(),
        ) else {
            return Ok(());
        };
        match placement(&resume, &settled, &chunk.at) {
            Placement::Now => {
                let Some(chunk) = self.pending.take() else {
                    return Ok(());
                };
                self.behind = 0;
                self.not_before = None;
                self.hand_over(chunk, &resume, tx).await
            }
            Placement::Wait => Ok(()),
            Placement::ReadAgain => {
                let read_at = chunk.at.to_string();
                self.pending = None;
                self.behind = self.behind.saturating_add(1);
                let wait = Duration::from_millis(5)
                    .saturating_mul(1 << self.behind.min(6))
                    .min(MAX_RETRY_WAIT);
                self.not_before = Some(Instant::now() + wait);
                metrics::counter!(m::SNAPSHOT_CHUNKS_REREAD_TOTAL).increment(1);
                tracing::debug!(%read_at, stream_at = %resume, "online snapshot chunk read behind the stream: reading it again");
                Ok(())
            }
        }
    }

    /// The rule of `source::watermark`: once the high watermark's transaction has ended, the
    /// chunk goes in at the resume point without the keys changed between the watermarks.
    async fn place_by_watermarks(
        &mut self,
        decoder: &mut Decoder,
        tx: &Outbox,
    ) -> Result<(), SourceError> {
        let passed = decoder.watermarks_mut().is_some_and(|w| w.passed());
        if !passed {
            // Read with nothing open past where the binlog ended after the high watermark,
            // and the watermark was not in it: the server does not log it (a loud stop, not a
            // snapshot that waits for ever).
            if let (Some(settled), Some(Some(end))) = (
                decoder.settled_to(),
                self.pending.as_ref().map(|c| c.marks_end.clone()),
            ) && settled.partial_cmp(&end).is_some_and(|o| o.is_ge())
                && let Method::Watermarks { table, .. } = &self.method
            {
                return Err(SourceError::WatermarkUnseen {
                    table: table.clone(),
                    end,
                });
            }
            return Ok(());
        }
        let Some(resume) = decoder.resume_point() else {
            return Ok(());
        };
        let changed = close_window(decoder);
        let Some(mut chunk) = self.pending.take() else {
            return Ok(());
        };
        let read = chunk.rows.len();
        if !changed.is_empty() {
            let schema = chunk.schema.clone();
            chunk
                .rows
                .retain(|r| !changed.contains(&super::watermark::key_text(&schema.key_of(r))));
        }
        let dropped = read - chunk.rows.len();
        if dropped > 0 {
            metrics::counter!(m::SNAPSHOT_ROWS_LEFT_TO_STREAM_TOTAL).increment(dropped as u64);
            tracing::debug!(table = %chunk.schema.qualified_name(), dropped, "rows changed between the watermarks: their changes in the stream stand for them");
        }
        self.behind = 0;
        self.not_before = None;
        chunk.at = resume.clone();
        self.hand_over(chunk, &resume, tx).await
    }

    /// Publishes a chunk and the progress it makes, at the resume point `at`.
    async fn hand_over(
        &mut self,
        chunk: Chunk,
        at: &BinlogPosition,
        tx: &Outbox,
    ) -> Result<(), SourceError> {
        let Some(entry) = self.state.tables.first_mut() else {
            return Ok(());
        };
        let table = entry.table.clone();
        let now = crate::events::now_ms();
        let template = SourceInfo {
            ts_ms: now,
            snapshot: "incremental",
            server_id: 0,
            gtid: None,
            file: Arc::from(chunk.at.file.as_str()),
            pos: chunk.at.pos,
            row: 0,
            epoch: self.epoch,
            read_ts_ms: now,
        };
        let n = chunk.rows.len();
        if let Some(last) = chunk.last_key {
            entry.last_key = Some(last);
        }
        entry.rows_done += n as u64;
        let done = entry.rows_done;
        if n > 0 {
            let events = chunk
                .rows
                .into_iter()
                .map(|row| ChangeEvent {
                    schema: chunk.schema.clone(),
                    op: Op::Read,
                    before: None,
                    after: Some(row),
                    source: template.clone(),
                })
                .collect();
            tx.send(SourceMsg::Changes(events)).await?;
        }
        metrics::gauge!(m::SNAPSHOT_ROWS_DONE, m::TABLE_LABEL => table.clone()).set(done as f64);
        if chunk.last {
            self.state.tables.remove(0);
            self.limit = FIRST_CHUNK_ROWS.min(self.bounds.rows.max(1));
            metrics::gauge!(m::SNAPSHOT_ROWS_TOTAL, m::TABLE_LABEL => table.clone())
                .set(done as f64);
            tracing::info!(table = %table, rows = done, read_at = %chunk.at, took_s = self.started.elapsed().as_secs(), "online snapshot of table finished");
            self.started = Instant::now();
            match self.state.tables.first() {
                Some(next) => {
                    tracing::info!(table = %next.table, "online snapshot running while the stream goes on");
                }
                None => metrics::gauge!(m::SNAPSHOT_RUNNING).set(0.0),
            }
        } else {
            self.limit = next_limit(chunk.limit, n, chunk.bytes, self.bounds);
            tracing::debug!(table = %table, rows_done = done, read_at = %chunk.at, "online snapshot chunk published");
        }
        tx.send(SourceMsg::OnlineProgress {
            state: self.state.clone(),
            at: Some(at.clone()),
        })
        .await?;
        crate::failpoint::pause_if_armed("online.rows", done).await;
        Ok(())
    }

    /// Takes a signal: queues its tables (those not queued yet) and stores where the signals
    /// were read to, with the next boundary (or at once, at a resume point).
    pub async fn on_signal(
        &mut self,
        signal: super::signal::Signal,
        captured: &std::collections::HashSet<String>,
        decoder: &Decoder,
        tx: &Outbox,
    ) -> Result<(), SourceError> {
        match signal.tables {
            Ok(tables) => {
                for t in tables {
                    if !captured.contains(&t) {
                        tracing::error!(table = %t, offset = signal.offset, "snapshot signal for a table this source does not capture: ignored (add it to source.tables; an added table is snapshotted online at the next start)");
                    } else if let Some(why) = self.method.unsupported_why() {
                        tracing::error!(table = %t, offset = signal.offset, error = %SourceError::OnlineUnsupported { table: t.clone(), why: why.into() }, "snapshot signal refused");
                    } else if self.state.tables.iter().any(|q| q.table == t) {
                        tracing::info!(table = %t, offset = signal.offset, "snapshot signal for a table already being snapshotted online: nothing to add");
                    } else {
                        tracing::info!(table = %t, offset = signal.offset, "snapshot signal: the table is snapshotted online while the stream goes on");
                        if self.state.tables.is_empty() {
                            self.started = Instant::now();
                            metrics::gauge!(m::SNAPSHOT_RUNNING).set(1.0);
                        }
                        self.state.tables.push(OnlineTable {
                            table: t,
                            last_key: None,
                            rows_done: 0,
                        });
                    }
                }
            }
            Err(why) => {
                tracing::error!(offset = signal.offset, %why, "unreadable record in the signals topic: ignored");
            }
        }
        self.state.signals_next = Some(signal.offset.saturating_add(1));
        tx.send(SourceMsg::OnlineProgress {
            state: self.state.clone(),
            at: decoder.resume_point(),
        })
        .await
    }
}

/// Ends the stream's watermark window, if one is open: the keys changed in it.
fn close_window(decoder: &mut Decoder) -> std::collections::HashSet<String> {
    decoder
        .watermarks_mut()
        .map(super::watermark::Watch::close)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> BinlogPosition {
        s.parse().expect("a position")
    }

    #[test]
    fn a_chunk_goes_in_exactly_where_the_stream_stands_at_its_read_view() {
        // The stream's resume point is the read view.
        assert_eq!(
            placement(&p("b.000002:900"), &p("b.000002:900"), &p("b.000002:900")),
            Placement::Now
        );
        // Read view between the resume point and a heartbeat heard after it (no transaction
        // ends in between: MariaDB's binlog checkpoint events, say).
        assert_eq!(
            placement(&p("b.000002:900"), &p("b.000002:1000"), &p("b.000002:950")),
            Placement::Now
        );
    }

    #[test]
    fn a_chunk_read_ahead_of_the_stream_waits_and_one_behind_it_is_read_again() {
        assert_eq!(
            placement(&p("b.000002:900"), &p("b.000002:900"), &p("b.000002:1200")),
            Placement::Wait
        );
        assert_eq!(
            placement(&p("b.000002:900"), &p("b.000003:4"), &p("b.000003:120")),
            Placement::Wait
        );
        // The stream already published changes after the read view: the chunk could move
        // those rows backwards.
        assert_eq!(
            placement(&p("b.000002:900"), &p("b.000002:900"), &p("b.000002:800")),
            Placement::ReadAgain
        );
        assert_eq!(
            placement(&p("b.000003:4"), &p("b.000003:4"), &p("b.000002:800")),
            Placement::ReadAgain
        );
        // Another numbering (RESET MASTER, a renamed log): never placed by guess.
        assert_eq!(
            placement(
                &p("b.000002:900"),
                &p("b.000002:900"),
                &p("other.000002:900")
            ),
            Placement::ReadAgain
        );
    }
}
