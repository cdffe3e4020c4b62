//! The binlog reader: a MariaDB/MySQL replica connection whose events go through the
//! [`Decoder`] into the hand-over to the producer loop.
//!
//! Protocol adapter (see `BINLOG-NOTES.md`): before the dump we send
//! `@mariadb_slave_capability=4` (else MariaDB replaces GTID events by `BEGIN` queries) and
//! `@master_heartbeat_period` (heartbeats while idle). Every event's CRC32 is verified when the
//! server logs checksums. What the events mean — positions, boundaries, refusals — is the
//! decoder's (see its module note); this module only moves them.
//!
//! Failure modes: any read error, a CRC mismatch or silence longer than twice the heartbeat ends
//! the reader with a transient error; the source then aborts the open Kafka transaction and
//! reconnects from the last *committed* position, so partial transactions are re-read, never
//! duplicated.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use mysql_async::BinlogStreamRequest;
use mysql_async::prelude::Queryable;
use mysql_common::binlog::events::Event;

use super::charset::Collations;
use super::decoder::{Capture, Catalog, Decoder, Emit};
use super::online::Online;
use super::retention::binlog_files;
use super::signal::Signal;
use super::table_map::{from_information_schema, server_collations, with_defaults};
use super::window::Window;
use super::xa::PreparedScan;
use super::{Outbox, SourceError, SourceMsg, connect};
use crate::config::MysqlConfig;
use crate::events::TableSchema;
use crate::gtid::GtidState;
use crate::metrics as m;
use crate::offsets::BinlogPosition;
use crate::shutdown::ShutdownRx;

/// The server as the decoder's [`Catalog`]: a side connection per question (the streaming one is
/// busy). Questions are rare: a new table shape with NOT NULL columns, a TRUNCATE of a table
/// not seen yet.
struct Server<'a>(&'a MysqlConfig);

impl Catalog for Server<'_> {
    async fn add_defaults(&mut self, schema: &mut TableSchema) -> Result<(), SourceError> {
        let mut side = connect(self.0).await?;
        with_defaults(&mut side, schema).await?;
        side.disconnect().await?;
        Ok(())
    }

    async fn collations(&mut self) -> Result<Collations, SourceError> {
        let mut side = connect(self.0).await?;
        let c = server_collations(&mut side).await?;
        side.disconnect().await?;
        Ok(c)
    }

    async fn shape(&mut self, db: &str, table: &str) -> Result<TableSchema, SourceError> {
        let mut side = connect(self.0).await?;
        let s = from_information_schema(&mut side, db, table).await?;
        side.disconnect().await?;
        Ok(s)
    }

    async fn prepared_xa(
        &mut self,
        xid: &str,
        from: Option<&BinlogPosition>,
        before: &BinlogPosition,
    ) -> Result<Option<Vec<Event>>, SourceError> {
        if let Some(at) = from {
            return scan_for_prepared(self.0, xid, at, before, true).await;
        }
        let mut side = connect(self.0).await?;
        let files = binlog_files(&mut side).await?;
        side.disconnect().await?;
        let Some(last) = files.iter().position(|f| f.name == before.file) else {
            return Ok(None);
        };
        for f in files[..=last].iter().rev() {
            tracing::info!(xid, file = %f.name, "searching the binlog for the prepared part of a committed XA transaction");
            let at = BinlogPosition {
                file: f.name.clone(),
                pos: 4,
            };
            if let Some(found) = scan_for_prepared(self.0, xid, &at, before, false).await? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }
}

/// Reads `at.file` from `at.pos` on a dump connection of its own, through a [`PreparedScan`]
/// for `xid`, up to the file's end or `before` (or, when `first`, the first complete group).
/// The dump is non-blocking: it ends where the binlog ends instead of waiting for more.
async fn scan_for_prepared(
    cfg: &MysqlConfig,
    xid: &str,
    at: &BinlogPosition,
    before: &BinlogPosition,
    first: bool,
) -> Result<Option<Vec<Event>>, SourceError> {
    let mut conn = connect(cfg).await?;
    conn.query_drop("SET @mariadb_slave_capability = 4").await?;
    let request = BinlogStreamRequest::new(SIDE_DUMP_SERVER_ID)
        .with_filename(at.file.as_bytes())
        .with_pos(at.pos)
        .with_non_blocking();
    let mut stream = conn.get_binlog_stream(request).await?;
    let mut scan = PreparedScan::new(xid);
    let silent = Duration::from_millis(cfg.heartbeat_ms.saturating_mul(2).max(10_000));
    loop {
        let event = match tokio::time::timeout(silent, stream.next()).await {
            Err(_) => {
                return Err(SourceError::Stalled {
                    silent_ms: silent.as_millis() as u64,
                });
            }
            Ok(None) => break,
            Ok(Some(event)) => event?,
        };
        let header = event.header();
        let pos = u64::from(header.log_pos());
        if header.event_type_raw() == super::decoder::ROTATE_EVENT {
            // The dump's first rotate is a fake one (no position); a real one ends the file.
            if pos == 0 {
                continue;
            }
            break;
        }
        if at.file == before.file && pos > before.pos {
            break;
        }
        let here = BinlogPosition {
            file: at.file.clone(),
            pos,
        };
        if scan.feed(&event, &here)? && first {
            break;
        }
    }
    // (A non-blocking dump that reached its end has closed its side already.)
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.close()).await;
    Ok(scan.finish())
}

/// The server id of a side dump (`scan_for_prepared`): 0, which no replica may use, so it
/// never replaces a replica's dump, nor the stream's own.
const SIDE_DUMP_SERVER_ID: u32 = 0;

impl Emit for Outbox {
    async fn emit(&mut self, msg: SourceMsg) -> Result<(), SourceError> {
        self.send(msg).await
    }
}

/// Where the stream starts.
#[derive(Debug)]
pub struct Start {
    /// A transaction boundary.
    pub at: BinlogPosition,
    /// What of the transaction after `at` is published already (a split, see
    /// `source::decoder`).
    pub within: Option<crate::offsets::Within>,
}

/// Where the stream's GTIDs start.
#[derive(Debug, Default)]
pub struct Gtid {
    /// What `start` covers, when known: every boundary then carries the state it covers.
    pub state: Option<GtidState>,
    /// A GTID state to start after, instead of `start`'s file and offset (a failover: the
    /// stored position was another server's): a MariaDB GTID position or a MySQL GTID set.
    pub connect: Option<String>,
}

/// Online snapshots and the signals that queue them, beside the stream (`source::online`).
pub struct Beside {
    /// The online snapshots still to run.
    pub online: Online,
    /// Signals (`ecst snapshot`), when the source listens for them.
    pub signals: Option<tokio::sync::mpsc::Receiver<Result<Signal, SourceError>>>,
}

/// Reads the binlog from `start` (or after `gtid.connect`) and sends messages to `tx` until an
/// error or shutdown; online snapshot chunks are read between events and placed in the stream
/// where the module note of `source::online` says.
#[allow(clippy::too_many_arguments)]
pub async fn run_reader(
    cfg: MysqlConfig,
    tables: HashSet<String>,
    start: Start,
    epoch: u64,
    window: Option<Window>,
    gtid: Gtid,
    beside: Beside,
    mut tx: Outbox,
    mut shutdown: ShutdownRx,
) -> Result<(), SourceError> {
    let Beside {
        mut online,
        mut signals,
    } = beside;
    let captured = tables.clone();
    let Start { at: start, within } = start;
    let mut conn = connect(&cfg).await?;
    let checksum: Option<String> = conn.query_first("SELECT @@global.binlog_checksum").await?;
    let crc = checksum
        .as_deref()
        .is_some_and(|c| c.eq_ignore_ascii_case("CRC32"));
    let heartbeat_ns = cfg.heartbeat_ms.saturating_mul(1_000_000);
    conn.query_drop("SET @mariadb_slave_capability = 4").await?;
    // MySQL: the GTID set to start after, as the dump request takes it.
    let mut mysql_sids = Vec::new();
    if let Some(state) = &gtid.connect {
        if state.contains(':') {
            // MySQL sends every transaction not in the set (COM_BINLOG_DUMP_GTID); the set's
            // text is what `@@gtid_executed` prints, one `uuid[:tag]:intervals` per source.
            for group in state.split(',').map(str::trim).filter(|g| !g.is_empty()) {
                mysql_sids.push(
                    group
                        .parse::<mysql_common::packets::Sid<'static>>()
                        .map_err(|e| SourceError::Unsupported {
                            what: format!("a stored GTID set the dump request cannot carry ({e})"),
                            fix: "re-snapshot (snapshot_mode = \"always\" once)".into(),
                            position: start.clone(),
                        })?,
                );
            }
        } else {
            // MariaDB finds the place after these GTIDs itself (strict: a server that lacks
            // one refuses with 1236 instead of starting elsewhere).
            conn.exec_drop("SET @slave_connect_state = ?", (state,))
                .await?;
            conn.query_drop("SET @slave_gtid_strict_mode = 1").await?;
            conn.query_drop("SET @slave_gtid_ignore_duplicates = 0")
                .await?;
        }
    }
    conn.query_drop(format!("SET @master_heartbeat_period = {heartbeat_ns}"))
        .await?;
    let mut request = BinlogStreamRequest::new(cfg.server_id)
        .with_filename(start.file.as_bytes())
        .with_pos(start.pos);
    if !mysql_sids.is_empty() {
        request = request.with_gtid().with_gtid_set(mysql_sids);
    }
    let mut stream = conn.get_binlog_stream(request).await?;
    match &gtid.connect {
        Some(state) => tracing::info!(gtid = %state, "binlog stream started after a GTID position"),
        None => tracing::info!(position = %start, "binlog stream started"),
    }
    if let Some(w) = &within {
        tracing::info!(position = %start, gtid = w.gtid.as_deref().unwrap_or("-"), rows_published = w.total(), "resuming inside a source transaction that was split across Kafka transactions: its published rows are skipped");
    }

    let watchdog = Duration::from_millis(cfg.heartbeat_ms.saturating_mul(2).max(1_000));
    let mut decoder = Decoder::new(Capture::Only(tables), &start, epoch, window)
        .with_gtid_state(gtid.state)
        .with_within(within)
        .with_watermarks(online.watch());
    let mut server = Server(&cfg);
    let mut heard = std::time::Instant::now()
        .checked_sub(Duration::from_secs(2))
        .unwrap_or_else(std::time::Instant::now);
    loop {
        let read_chunk = online.wants_read(&decoder);
        let next = tokio::select! {
            biased;
            // PRIORITY 1: shutdown stops intake at once; the open transaction is re-read later.
            () = shutdown.wait() => return Ok(()),
            // PRIORITY 2: the next event, or a stall.
            n = tokio::time::timeout(watchdog, stream.next()) => n,
            // PRIORITY 3: a signal (`ecst snapshot`).
            Some(signal) = async { signals.as_mut()?.recv().await }, if signals.is_some() => {
                online.on_signal(signal?, &captured, &decoder, &tx).await?;
                continue;
            }
            // PRIORITY 4: no event waiting: the next online snapshot chunk.
            () = online.ready(), if read_chunk => {
                online.read_next(&mut decoder, &tx).await?;
                continue;
            }
        };
        let event = match next {
            Err(_) => {
                return Err(SourceError::Stalled {
                    silent_ms: watchdog.as_millis() as u64,
                });
            }
            Ok(None) => return Err(SourceError::StreamEnded),
            Ok(Some(Err(e))) => return Err(SourceError::Mysql(e)),
            Ok(Some(Ok(ev))) => ev,
        };
        if heard.elapsed() >= Duration::from_secs(1) {
            heard = std::time::Instant::now();
            metrics::gauge!(m::SOURCE_LAST_EVENT_TS).set(m::now_s().floor());
        }
        decoder.on_event(&event, crc, &mut server, &mut tx).await?;
        online.after_event(&mut decoder, &tx).await?;
    }
}
