//! The binlog reader: a MariaDB/MySQL replica connection turned into [`SourceMsg`]s.
//!
//! Protocol adapter (see `BINLOG-NOTES.md`): before the dump we send
//! `@mariadb_slave_capability=4` (else MariaDB replaces GTID events by `BEGIN` queries) and
//! `@master_heartbeat_period` (heartbeats while idle). MariaDB GTID events (type 162) are decoded
//! by hand from the raw body. The first (fake) ROTATE arrives before the format description, so
//! its name still carries the 4 CRC bytes: they are stripped. Every event's CRC32 is verified.
//!
//! Ordering and boundaries: rows are sent as they are decoded (a 100,000-row transaction is never
//! held in memory), and a [`SourceMsg::Commit`] follows each XID/COMMIT or standalone DDL. Only
//! those positions are ever stored, because the protocol cannot resume inside a transaction.
//!
//! Positions come from the stream, never from a header field a server may leave at 0. MariaDB
//! 11.4 (`binlog_legacy_event_pos = OFF`, its default) writes `end_log_pos 0` in the header of
//! every event copied from a transaction cache; only events written directly (GTID, XID, …)
//! carry one. So:
//! * a change is placed at its transaction's start — the end of its GTID (or BEGIN) event, else
//!   the last boundary — plus its row index in the transaction ([`TxPlace`]). That orders every
//!   change of a server's binlog exactly, and it compares with boundaries as the change itself
//!   would: after the previous transaction's end, before its own;
//! * a boundary whose header has no position (a COMMIT query or DDL written from a cache) is
//!   *deferred*: the transaction is complete, but its resume point is only known exactly from the
//!   next event that has one — the next GTID event starts there (`end - size`), a heartbeat
//!   reports it, a rotate replaces it. Computing it by summing event sizes would be wrong: the
//!   server does not send every event of the file (ANNOTATE_ROWS is skipped unless asked for).
//!
//! Failure modes: any read error, a CRC mismatch or silence longer than twice the heartbeat ends
//! the reader with a transient error; the source then aborts the open Kafka transaction and
//! reconnects from the last *committed* position, so partial transactions are re-read, never
//! duplicated.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mysql_async::BinlogStreamRequest;
use mysql_async::prelude::Queryable;
use mysql_common::binlog::consts::BinlogChecksumAlg;
use mysql_common::binlog::events::{EventData, RowsEventData, TableMapEvent};

use super::decode::decode_rows;
use super::table_map::{BinlogTable, from_information_schema, from_table_map, with_defaults};
use super::window::Window;
use super::{Outbox, SourceError, SourceMsg, connect};
use crate::config::MysqlConfig;
use crate::events::{ChangeEvent, Op, SourceInfo};
use crate::metrics as m;
use crate::offsets::BinlogPosition;
use crate::shutdown::ShutdownRx;

const ROTATE_EVENT: u8 = 4;
const QUERY_EVENT: u8 = 2;
const XID_EVENT: u8 = 16;
const FORMAT_DESCRIPTION_EVENT: u8 = 15;
const TABLE_MAP_EVENT: u8 = 19;
const HEARTBEAT_EVENT: u8 = 27;
const MYSQL_GTID_EVENT: u8 = 33;
const MYSQL_ANONYMOUS_GTID_EVENT: u8 = 34;
const MARIADB_GTID_EVENT: u8 = 162;
const INCIDENT_EVENT: u8 = 26;
const TRANSACTION_PAYLOAD_EVENT: u8 = 40;
const MARIADB_QUERY_COMPRESSED_EVENT: u8 = 165;
const MARIADB_ROWS_COMPRESSED_FIRST: u8 = 166;
const MARIADB_ROWS_COMPRESSED_LAST: u8 = 171;

/// Where a transaction's changes are placed in the binlog order (see the module note).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxPlace {
    /// The transaction's start: the end of its GTID/BEGIN event, or the last boundary.
    pub pos: u64,
    /// Rows of the transaction placed so far (the next row's index).
    pub next_row: u32,
}

impl TxPlace {
    /// The place of a transaction opened by an event whose header says `log_pos` (0: none),
    /// after the boundary `boundary`.
    pub fn open(log_pos: u32, boundary: u64) -> TxPlace {
        TxPlace {
            pos: if log_pos == 0 {
                boundary
            } else {
                u64::from(log_pos)
            },
            next_row: 0,
        }
    }

    /// The `(pos, row)` of the next row.
    pub fn place_row(&mut self) -> (u64, u32) {
        let row = self.next_row;
        self.next_row = self.next_row.saturating_add(1);
        (self.pos, row)
    }
}

/// The exact start of an event whose header says it ends at `log_pos` (0: unknown).
pub fn event_start(log_pos: u32, event_size: u32) -> Option<u64> {
    (log_pos != 0).then(|| u64::from(log_pos).saturating_sub(u64::from(event_size)))
}

/// Decodes a MariaDB GTID event body: `seq u64 LE | domain u32 LE | flags2 u8`.
/// Returns `(domain-server-seq, standalone)`.
pub fn parse_mariadb_gtid(body: &[u8], server_id: u32) -> Option<(String, bool)> {
    let seq = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let domain = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
    let flags2 = *body.get(12)?;
    Some((format!("{domain}-{server_id}-{seq}"), flags2 & 1 != 0))
}

/// Reads the binlog from `start` and sends messages to `tx` until an error or shutdown.
pub async fn run_reader(
    cfg: MysqlConfig,
    tables: HashSet<String>,
    start: BinlogPosition,
    epoch: u64,
    mut window: Option<Window>,
    tx: Outbox,
    mut shutdown: ShutdownRx,
) -> Result<(), SourceError> {
    let mut conn = connect(&cfg).await?;
    let checksum: Option<String> = conn.query_first("SELECT @@global.binlog_checksum").await?;
    let crc = checksum
        .as_deref()
        .is_some_and(|c| c.eq_ignore_ascii_case("CRC32"));
    let heartbeat_ns = cfg.heartbeat_ms.saturating_mul(1_000_000);
    conn.query_drop("SET @mariadb_slave_capability = 4").await?;
    conn.query_drop(format!("SET @master_heartbeat_period = {heartbeat_ns}"))
        .await?;
    let request = BinlogStreamRequest::new(cfg.server_id)
        .with_filename(start.file.as_bytes())
        .with_pos(start.pos);
    let mut stream = conn.get_binlog_stream(request).await?;
    tracing::info!(position = %start, "binlog stream started");

    let watchdog = Duration::from_millis(cfg.heartbeat_ms.saturating_mul(2).max(1_000));
    let mut file = start.file.clone();
    let mut fde_seen = false;
    let mut gtid: Option<String> = None;
    // Inside a transaction (after BEGIN or a MariaDB non-standalone GTID, until XID/COMMIT).
    let mut in_tx = false;
    let mut tx_ts_ms: i64 = 0;
    // The last resume point (a transaction boundary), and where the open transaction's changes
    // are placed.
    let mut boundary = start.pos;
    let mut place = TxPlace::open(0, boundary);
    // A transaction that ended on an event without a position: its GTID and commit time, sent
    // as a boundary once the next positioned event says where it ended.
    let mut deferred: Option<(Option<String>, i64)> = None;
    // Rows events handed over (test pause points count them).
    let mut rows_events: u64 = 0;
    // The last shape of each captured table (a TRUNCATE names a table, not a table id).
    let mut schemas_by_name: HashMap<String, Arc<crate::events::TableSchema>> = HashMap::new();
    // table_id → (raw TABLE_MAP body, decoded shape); None = not captured.
    let mut tables_by_id: HashMap<u64, (Vec<u8>, Option<Arc<BinlogTable>>)> = HashMap::new();

    loop {
        let next = tokio::select! {
            biased;
            // PRIORITY 1: shutdown stops intake at once; the open transaction is re-read later.
            () = shutdown.wait() => return Ok(()),
            // PRIORITY 2: the next event, or a stall.
            n = tokio::time::timeout(watchdog, stream.next()) => n,
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
        let header = event.header();
        let etype = header.event_type_raw();
        let log_pos = header.log_pos();
        if crc
            && fde_seen
            && let Some(sum) = event.checksum()
        {
            let expected = event.calc_checksum(BinlogChecksumAlg::BINLOG_CHECKSUM_ALG_CRC32);
            if u32::from_le_bytes(sum) != expected {
                return Err(SourceError::Checksum {
                    file: file.clone(),
                    pos: u64::from(log_pos),
                });
            }
        }
        // A deferred boundary is known exactly once a positioned event follows: a GTID event
        // starts where the transaction before it ended; a heartbeat says where the dump is.
        if deferred.is_some() {
            let known = match etype {
                MARIADB_GTID_EVENT | MYSQL_GTID_EVENT | MYSQL_ANONYMOUS_GTID_EVENT => {
                    event_start(log_pos, header.event_size())
                }
                HEARTBEAT_EVENT => (log_pos != 0).then_some(u64::from(log_pos)),
                _ => None,
            };
            if let Some(end) = known.filter(|&e| e >= boundary)
                && let Some((g, ts)) = deferred.take()
            {
                boundary = end;
                let position = BinlogPosition {
                    file: file.clone(),
                    pos: end,
                };
                tx.send(commit(position, g, ts)).await?;
            }
        }
        match etype {
            ROTATE_EVENT => {
                if let Ok(Some(EventData::RotateEvent(r))) = event.read_data() {
                    let mut name = r.name_raw().to_vec();
                    if !fde_seen && crc && name.len() > 4 {
                        name.truncate(name.len() - 4);
                    }
                    file = String::from_utf8_lossy(&name).into_owned();
                    if (log_pos != 0 || deferred.is_some()) && !in_tx {
                        // A real rotate between transactions: the next file's start is a safe
                        // resume point (and replaces a deferred one).
                        boundary = r.position();
                        let position = BinlogPosition {
                            file: file.clone(),
                            pos: boundary,
                        };
                        let (g, ts) = deferred.take().unwrap_or((None, 0));
                        tx.send(commit(position, g, ts)).await?;
                    }
                }
            }
            FORMAT_DESCRIPTION_EVENT => fde_seen = true,
            HEARTBEAT_EVENT => {}
            MARIADB_GTID_EVENT => {
                let parsed = parse_mariadb_gtid(event.data(), header.server_id());
                // A standalone GTID (DDL) has no XID: its one query event ends it.
                in_tx = parsed.as_ref().is_some_and(|(_, standalone)| !*standalone);
                gtid = parsed.map(|(g, _)| g);
                tx_ts_ms = i64::from(header.timestamp()) * 1000;
                place = TxPlace::open(log_pos, boundary);
            }
            MYSQL_GTID_EVENT => {
                if let Ok(Some(EventData::GtidEvent(g))) = event.read_data() {
                    let sid = g.sid();
                    let hex: String = sid.iter().map(|b| format!("{b:02x}")).collect();
                    gtid = Some(format!(
                        "{}-{}-{}-{}-{}:{}",
                        &hex[0..8],
                        &hex[8..12],
                        &hex[12..16],
                        &hex[16..20],
                        &hex[20..32],
                        g.gno()
                    ));
                }
                tx_ts_ms = i64::from(header.timestamp()) * 1000;
                place = TxPlace::open(log_pos, boundary);
            }
            MYSQL_ANONYMOUS_GTID_EVENT => {
                tx_ts_ms = i64::from(header.timestamp()) * 1000;
                place = TxPlace::open(log_pos, boundary);
            }
            QUERY_EVENT => {
                let (query, default_db) = match event.read_data() {
                    Ok(Some(EventData::QueryEvent(q))) => (
                        q.query().trim().to_ascii_uppercase(),
                        q.schema().into_owned(),
                    ),
                    _ => (String::new(), String::new()),
                };
                if let Some(table) = statement_dml_on(&query, &default_db, &tables) {
                    return Err(SourceError::StatementDml {
                        table,
                        position: BinlogPosition {
                            file: file.clone(),
                            pos: place.pos,
                        },
                    });
                }
                if query == "BEGIN" {
                    // MariaDB announced the transaction with its GTID event already.
                    if !in_tx {
                        place = TxPlace::open(log_pos, boundary);
                    }
                    in_tx = true;
                    tx_ts_ms = i64::from(header.timestamp()) * 1000;
                } else if query == "COMMIT" || !in_tx {
                    in_tx = false;
                    if query != "COMMIT" {
                        // DDL may have changed table shapes; new TABLE_MAPs will follow.
                        tables_by_id.clear();
                        if let Some((what, table)) = table_lifecycle(&query, &default_db, &tables) {
                            metrics::counter!(m::SOURCE_TABLE_LIFECYCLE_TOTAL, m::TABLE_LABEL => table.clone(), m::OP_LABEL => what.label()).increment(1);
                            tracing::warn!(
                                table,
                                statement = what.label(),
                                effect = what.effect(),
                                "a captured table was {}",
                                what.past()
                            );
                            if what == Lifecycle::Truncate {
                                let schema = match schemas_by_name.get(&table) {
                                    Some(s) => s.clone(),
                                    None => {
                                        let (db, t) = table.split_once('.').unwrap_or(("", &table));
                                        let mut side = connect(&cfg).await?;
                                        let s = from_information_schema(&mut side, db, t).await?;
                                        side.disconnect().await?;
                                        Arc::new(s)
                                    }
                                };
                                let (pos, row) = place.place_row();
                                let ev = ChangeEvent {
                                    schema,
                                    op: Op::Truncate,
                                    before: None,
                                    after: None,
                                    source: SourceInfo {
                                        ts_ms: tx_ts_ms,
                                        snapshot: "false",
                                        server_id: header.server_id(),
                                        gtid: gtid.as_deref().map(Arc::from),
                                        file: Arc::from(file.as_str()),
                                        pos,
                                        row,
                                        epoch,
                                        read_ts_ms: crate::events::now_ms(),
                                    },
                                };
                                tx.send(SourceMsg::Changes(vec![ev])).await?;
                            }
                        }
                    }
                    if let Some(m) = end_transaction(
                        log_pos,
                        &file,
                        gtid.take(),
                        tx_ts_ms,
                        &mut boundary,
                        &mut deferred,
                    ) {
                        tx.send(m).await?;
                    }
                }
            }
            XID_EVENT => {
                in_tx = false;
                if let Some(m) = end_transaction(
                    log_pos,
                    &file,
                    gtid.take(),
                    tx_ts_ms,
                    &mut boundary,
                    &mut deferred,
                ) {
                    tx.send(m).await?;
                }
            }
            TABLE_MAP_EVENT => {
                let tme: TableMapEvent<'_> =
                    event.read_event().map_err(|e| SourceError::TableMap {
                        table: "?".into(),
                        detail: e.to_string(),
                    })?;
                let id = tme.table_id();
                let body = event.data();
                let unchanged = tables_by_id
                    .get(&id)
                    .is_some_and(|(raw, _)| raw.as_slice() == body);
                if !unchanged {
                    let qn = format!("{}.{}", tme.database_name(), tme.table_name());
                    let shape = if tables.contains(&qn) {
                        let mut t = from_table_map(&tme)?;
                        drop(tme);
                        // Defaults of NOT NULL columns, which TABLE_MAP does not carry (on a
                        // side connection: this one is streaming). Rare: a new shape only.
                        if t.schema.columns.iter().any(|c| !c.nullable) {
                            let mut side = connect(&cfg).await?;
                            with_defaults(&mut side, Arc::make_mut(&mut t.schema)).await?;
                            side.disconnect().await?;
                        }
                        schemas_by_name.insert(qn.clone(), t.schema.clone());
                        Some(Arc::new(t))
                    } else {
                        None
                    };
                    tables_by_id.insert(id, (body.to_vec(), shape));
                }
            }
            23..=25 | 30..=32 => {
                let Ok(Some(EventData::RowsEvent(rows))) = event.read_data() else {
                    return Err(SourceError::RowDecode {
                        table: "?".into(),
                        detail: format!("unreadable rows event type {etype}"),
                    });
                };
                let Some((_, Some(table))) = tables_by_id.get(&rows.table_id()) else {
                    continue;
                };
                let table = table.clone();
                let (op, before, after): (Op, Option<Vec<bool>>, Option<Vec<bool>>) = match &rows {
                    RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => {
                        (Op::Create, None, rows.columns_after_image().map(bits))
                    }
                    RowsEventData::UpdateRowsEventV1(_) | RowsEventData::UpdateRowsEvent(_) => (
                        Op::Update,
                        rows.columns_before_image().map(bits),
                        rows.columns_after_image().map(bits),
                    ),
                    RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => {
                        (Op::Delete, rows.columns_before_image().map(bits), None)
                    }
                    RowsEventData::PartialUpdateRowsEvent(_) => {
                        return Err(SourceError::RowDecode {
                            table: table.schema.qualified_name(),
                            detail: "partial JSON row images are not supported; set binlog_row_value_options=''".into(),
                        });
                    }
                };
                // A partial image (a session with binlog_row_image = MINIMAL or NOBLOB, which
                // preflight cannot see) would be published as a row with NULLs: refuse it.
                for (image, present) in [("before", &before), ("after", &after)] {
                    if let Some(missing) =
                        present.as_deref().and_then(|p| missing_columns(&table, p))
                    {
                        return Err(SourceError::PartialRowImage {
                            table: table.schema.qualified_name(),
                            image,
                            missing,
                            position: BinlogPosition {
                                file: file.clone(),
                                pos: place.pos,
                            },
                        });
                    }
                }
                let read_ts_ms = crate::events::now_ms();
                let ev_file: Arc<str> = Arc::from(file.as_str());
                let ev_gtid: Option<Arc<str>> = gtid.as_deref().map(Arc::from);
                let decoded = decode_rows(
                    &table,
                    rows.rows_data(),
                    before.as_deref(),
                    after.as_deref(),
                )?;
                // Only a resumed snapshot's stretch needs a position per change.
                let at = window.as_ref().map(|_| BinlogPosition {
                    file: file.clone(),
                    pos: place.pos,
                });
                if let (Some(w), Some(at)) = (&window, &at)
                    && w.passed(at)
                {
                    tracing::info!(position = %at, "stream passed the resumed snapshot's stretch");
                    window = None;
                }
                let mut batch = Vec::with_capacity(decoded.len());
                for (b, a) in decoded {
                    let (pos, row) = place.place_row();
                    let ev = ChangeEvent {
                        schema: table.schema.clone(),
                        op,
                        before: b,
                        after: a,
                        source: SourceInfo {
                            ts_ms: tx_ts_ms,
                            snapshot: "false",
                            server_id: header.server_id(),
                            gtid: ev_gtid.clone(),
                            file: ev_file.clone(),
                            pos,
                            row,
                            epoch,
                            read_ts_ms,
                        },
                    };
                    let ev = match (&window, &at) {
                        (Some(w), Some(at)) => w.filter(ev, at),
                        _ => Some(ev),
                    };
                    batch.extend(ev);
                }
                if batch.is_empty() {
                    continue;
                }
                // One message per rows event: the channel costs per message, not per row.
                tx.send(SourceMsg::Changes(batch)).await?;
                rows_events += 1;
                crate::failpoint::pause_if_armed("stream.rows_events", rows_events).await;
            }
            // Written by the server but not decoded here: refused, never skipped.
            TRANSACTION_PAYLOAD_EVENT => {
                return Err(SourceError::Unsupported {
                    what: "a compressed transaction (TRANSACTION_PAYLOAD)".into(),
                    fix: "SET GLOBAL binlog_transaction_compression = OFF (and in the sessions that set it), then re-snapshot (snapshot_mode = \"always\" once)".into(),
                    position: BinlogPosition { file: file.clone(), pos: u64::from(log_pos) },
                });
            }
            INCIDENT_EVENT => {
                return Err(SourceError::Unsupported {
                    what: "an INCIDENT event: the server says changes may be missing from its binlog".into(),
                    fix: "re-snapshot (snapshot_mode = \"always\" once) so the copies match the tables again".into(),
                    position: BinlogPosition { file: file.clone(), pos: u64::from(log_pos) },
                });
            }
            MARIADB_QUERY_COMPRESSED_EVENT => {
                // BEGIN and COMMIT are never long enough to be compressed: outside a transaction
                // this is DDL, a boundary like an uncompressed one; inside, statement DML.
                if in_tx {
                    return Err(SourceError::Unsupported {
                        what: "a compressed statement inside a transaction (log_bin_compress = ON with statement-format DML)".into(),
                        fix: "SET GLOBAL log_bin_compress = OFF and binlog_format = ROW".into(),
                        position: BinlogPosition { file: file.clone(), pos: u64::from(log_pos) },
                    });
                }
                tables_by_id.clear();
                if let Some(m) = end_transaction(
                    log_pos,
                    &file,
                    gtid.take(),
                    tx_ts_ms,
                    &mut boundary,
                    &mut deferred,
                ) {
                    tx.send(m).await?;
                }
            }
            MARIADB_ROWS_COMPRESSED_FIRST..=MARIADB_ROWS_COMPRESSED_LAST => {
                // The table id leads the post-header, uncompressed: only captured tables stop.
                let id = event.data().get(..6).map(|b| {
                    b.iter()
                        .rev()
                        .fold(0u64, |acc, x| (acc << 8) | u64::from(*x))
                });
                let captured = id
                    .and_then(|id| tables_by_id.get(&id))
                    .is_some_and(|(_, t)| t.is_some());
                if captured || id.is_none() {
                    return Err(SourceError::Unsupported {
                        what: "MariaDB compressed row events (log_bin_compress = ON)".into(),
                        fix: "SET GLOBAL log_bin_compress = OFF, then re-snapshot (snapshot_mode = \"always\" once)".into(),
                        position: BinlogPosition { file: file.clone(), pos: u64::from(log_pos) },
                    });
                }
            }
            _ => {}
        }
    }
}

/// The columns of `table` absent from a row image (`None`: the image is full).
fn missing_columns(table: &BinlogTable, present: &[bool]) -> Option<Vec<String>> {
    let missing: Vec<String> = table
        .schema
        .columns
        .iter()
        .enumerate()
        .filter(|(i, _)| !present.get(*i).copied().unwrap_or(false))
        .map(|(_, c)| c.name.clone())
        .collect();
    (!missing.is_empty()).then_some(missing)
}

/// What a DDL statement did to a captured table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// `TRUNCATE`.
    Truncate,
    /// `DROP TABLE` / `DROP DATABASE`.
    Drop,
    /// `RENAME TABLE` / `ALTER TABLE … RENAME`.
    Rename,
}

impl Lifecycle {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Lifecycle::Truncate => "truncate",
            Lifecycle::Drop => "drop",
            Lifecycle::Rename => "rename",
        }
    }
    fn past(self) -> &'static str {
        match self {
            Lifecycle::Truncate => "truncated",
            Lifecycle::Drop => "dropped",
            Lifecycle::Rename => "renamed",
        }
    }
    /// What it means for the topic and the copies (README, "Table lifecycle").
    fn effect(self) -> &'static str {
        match self {
            Lifecycle::Truncate => {
                "a truncate event (op t) is published; each mapping applies its on_truncate policy (default keep)"
            }
            Lifecycle::Drop => {
                "its topic stays and gets no more events; the copies keep the last rows; a table re-created with the same name is captured again (a new schema version if its shape differs)"
            }
            Lifecycle::Rename => {
                "changes under the new name are captured only if it is listed in source.tables; the old topic gets no more events"
            }
        }
    }
}

/// Whether a DDL statement truncates, drops or renames a captured table (or drops its database).
pub fn table_lifecycle(
    query_upper: &str,
    default_db: &str,
    tables: &HashSet<String>,
) -> Option<(Lifecycle, String)> {
    let what = if query_upper.starts_with("TRUNCATE") {
        Lifecycle::Truncate
    } else if query_upper.starts_with("DROP TABLE") {
        Lifecycle::Drop
    } else if query_upper.starts_with("RENAME TABLE")
        || (query_upper.starts_with("ALTER TABLE") && query_upper.contains(" RENAME "))
    {
        Lifecycle::Rename
    } else if query_upper.starts_with("DROP DATABASE") || query_upper.starts_with("DROP SCHEMA") {
        let text = query_upper.replace('`', "").to_ascii_lowercase();
        let dropped = text
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_string();
        return tables
            .iter()
            .find(|t| t.to_ascii_lowercase().split('.').next() == Some(dropped.as_str()))
            .map(|t| (Lifecycle::Drop, t.clone()));
    } else {
        return None;
    };
    names_captured_table(query_upper, default_db, tables).map(|t| (what, t))
}

/// The captured table a statement-format DML query names, if any (`tables`: `db.table`;
/// `default_db`: the query's current database, for unqualified names). Such a query carries no
/// rows: the change it made would be lost without a word.
pub fn statement_dml_on(
    query_upper: &str,
    default_db: &str,
    tables: &HashSet<String>,
) -> Option<String> {
    let dml = ["INSERT", "UPDATE", "DELETE", "REPLACE", "LOAD DATA"]
        .iter()
        .any(|k| query_upper.starts_with(k));
    if !dml {
        return None;
    }
    names_captured_table(query_upper, default_db, tables)
}

/// The first captured table (`db.table`) a statement names: qualified, or unqualified in its
/// default database.
fn names_captured_table(
    query_upper: &str,
    default_db: &str,
    tables: &HashSet<String>,
) -> Option<String> {
    // Names as words: `a`.`b`, a.b and b alike (dots kept inside a word).
    let text = query_upper.replace('`', "").to_ascii_lowercase();
    let words: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$' || c == '.'))
        .filter(|w| !w.is_empty())
        .collect();
    let default_db = default_db.to_ascii_lowercase();
    tables
        .iter()
        .find(|t| {
            let qualified = t.to_ascii_lowercase();
            let (db, name) = qualified.split_once('.').unwrap_or(("", &qualified));
            words
                .iter()
                .any(|w| *w == qualified || (*w == name && db == default_db))
        })
        .cloned()
}

fn bits(b: &bitvec::slice::BitSlice<u8>) -> Vec<bool> {
    b.iter().by_vals().collect()
}

/// A transaction ended on an event whose header says it ends at `log_pos`: the boundary to send
/// now, or `None` when the header has no position and the boundary waits for the next
/// positioned event (`deferred`, see the module note).
fn end_transaction(
    log_pos: u32,
    file: &str,
    gtid: Option<String>,
    ts_ms: i64,
    boundary: &mut u64,
    deferred: &mut Option<(Option<String>, i64)>,
) -> Option<SourceMsg> {
    if log_pos == 0 {
        *deferred = Some((gtid, ts_ms));
        return None;
    }
    *boundary = u64::from(log_pos);
    let position = BinlogPosition {
        file: file.to_string(),
        pos: *boundary,
    };
    Some(commit(position, gtid, ts_ms))
}

/// A transaction-boundary message.
fn commit(position: BinlogPosition, gtid: Option<String>, ts_ms: i64) -> SourceMsg {
    SourceMsg::Commit {
        position,
        gtid,
        ts_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_dml_naming_a_captured_table_is_recognised_and_ddl_or_other_tables_are_not() {
        let tables: HashSet<String> = ["shop.users".to_string()].into_iter().collect();
        let on = |q: &str, db: &str| statement_dml_on(q, db, &tables);
        assert_eq!(
            on("UPDATE `SHOP`.`USERS` SET EMAIL = 'A' WHERE ID = 1", ""),
            Some("shop.users".into())
        );
        assert_eq!(
            on("INSERT INTO USERS VALUES (1)", "shop"),
            Some("shop.users".into())
        );
        assert_eq!(
            on("INSERT INTO USERS VALUES (1)", "other"),
            None,
            "another database's `users`"
        );
        assert_eq!(on("UPDATE OTHER.USERS SET N = 1", "shop"), None);
        assert_eq!(on("UPDATE ORDERS SET N = 1", "shop"), None);
        assert_eq!(on("ALTER TABLE USERS ADD C INT", "shop"), None);
        assert_eq!(on("BEGIN", "shop"), None);
    }

    #[test]
    fn truncate_drop_and_rename_of_a_captured_table_are_recognised() {
        let tables: HashSet<String> = ["shop.users".to_string()].into_iter().collect();
        let of = |q: &str| table_lifecycle(q, "shop", &tables).map(|(w, _)| w);
        assert_eq!(of("TRUNCATE TABLE USERS"), Some(Lifecycle::Truncate));
        assert_eq!(of("TRUNCATE `SHOP`.`USERS`"), Some(Lifecycle::Truncate));
        assert_eq!(
            of("DROP TABLE IF EXISTS ORDERS, USERS"),
            Some(Lifecycle::Drop)
        );
        assert_eq!(
            of("RENAME TABLE USERS TO OLD_USERS"),
            Some(Lifecycle::Rename)
        );
        assert_eq!(
            of("ALTER TABLE USERS RENAME TO PEOPLE"),
            Some(Lifecycle::Rename)
        );
        assert_eq!(of("DROP DATABASE `SHOP`"), Some(Lifecycle::Drop));
        assert_eq!(of("DROP DATABASE OTHER"), None);
        assert_eq!(of("TRUNCATE TABLE ORDERS"), None);
        assert_eq!(of("ALTER TABLE USERS ADD COLUMN C INT"), None);
    }

    #[test]
    fn mariadb_gtid_body_is_decoded_with_the_standalone_flag() {
        let mut body = 10u64.to_le_bytes().to_vec();
        body.extend_from_slice(&0u32.to_le_bytes());
        body.push(0x0d);
        assert_eq!(parse_mariadb_gtid(&body, 1), Some(("0-1-10".into(), true)));
        assert_eq!(parse_mariadb_gtid(&body[..5], 1), None);
    }
}
