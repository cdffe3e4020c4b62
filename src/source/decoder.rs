//! The binlog decoder: binlog events turned into [`SourceMsg`]s. One state machine serves the
//! replica connection ([`super::binlog`]) and binlog files (`ecst inspect-binlog`,
//! [`crate::inspect`]), so what the offline tool prints is what the source would publish.
//!
//! Ordering and boundaries: rows are emitted as they are decoded (a 100,000-row transaction is
//! never held in memory), and a [`SourceMsg::Commit`] follows each XID/COMMIT or standalone DDL.
//! Only those positions are ever stored, because the protocol cannot resume inside a transaction.
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
//! **Large transactions.** A transaction is not held in memory, but the producer keeps it in
//! one Kafka transaction, which the broker aborts past `transaction_timeout_ms`. So, inside a
//! transaction, after every [`SPLIT_POINT_BYTES`] of captured rows events, the decoder sends a
//! [`SourceMsg::Split`]: the rows of each table of this transaction published so far. The
//! producer commits there when its Kafka transaction has grown too large
//! (`source::pump`), storing the last boundary *and* that count ([`Within`]). A resume from
//! such a position starts at the boundary, which is the start of that same transaction, and
//! drops each table's first rows up to the stored count ([`Decoder::with_within`]). Rows of
//! one table come in the same order on every read of a binlog, and on a replica that logged
//! the same transaction (however it grouped them into events), so the rows dropped are exactly
//! the ones published; the transaction's GTID and the counts are checked, and a mismatch is a
//! definite error, never a guess. Row indices (versions) continue from the stored one.
//!
//! XA transactions are published at their `XA COMMIT` group, from their prepared group read
//! again there, and never when rolled back (`source::xa`).
//!
//! Rows of the online snapshot's watermark table (`source.watermark_table`) are read, never
//! published: between a chunk's two watermarks the decoder records which keys of the chunk's
//! table changed (`source::watermark`).
//!
//! MariaDB's compressed events (`log_bin_compress = ON`) are uncompressed into the plain event
//! they stand for (`source::compressed`) and handled as such, header position included.
//!
//! Compressed transactions (MySQL 8.0.20+ `binlog_transaction_compression`): one
//! TRANSACTION_PAYLOAD event holds a whole transaction's events, zstd-compressed, without
//! checksums and without positions of their own. The payload is decompressed as a stream (one
//! inner event in memory at a time) and its events handled like any others with no header
//! position: the changes are placed at the end of the GTID event before the payload, and the
//! transaction's boundary is the payload event's end, so a resume never lands inside a payload.
//!
//! Everything the server writes is decoded or refused with a definite error naming the setting
//! and the fix (see the README's "what the binlog reader refuses"); nothing is skipped silently.
//! Events that carry no data change (FORMAT_DESCRIPTION, PREVIOUS_GTIDS, ANNOTATE_ROWS, …) are
//! passed over by design.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::Read;
use std::sync::Arc;

use mysql_common::binlog::consts::BinlogChecksumAlg;
use mysql_common::binlog::events::{
    Event, EventData, FormatDescriptionEvent, RowsEventData, TableMapEvent, TransactionPayloadEvent,
};

use super::charset::Collations;
use super::decode::decode_rows;
use super::table_map::{BinlogTable, from_table_map};
use super::watermark::Watch;
use super::window::Window;
use super::xa::{self, XA_PREPARE_LOG_EVENT, XaStatement};
use super::{SourceError, SourceMsg};
use crate::events::{ChangeEvent, Op, SourceInfo, TableSchema};
use crate::gtid::GtidState;
use crate::metrics as m;
use crate::offsets::{BinlogPosition, Within};

pub(crate) const ROTATE_EVENT: u8 = 4;
const QUERY_EVENT: u8 = 2;
const STOP_EVENT: u8 = 3;
const XID_EVENT: u8 = 16;
const FORMAT_DESCRIPTION_EVENT: u8 = 15;
const TABLE_MAP_EVENT: u8 = 19;
const INCIDENT_EVENT: u8 = 26;
const HEARTBEAT_EVENT: u8 = 27;
const MYSQL_GTID_EVENT: u8 = 33;
const MYSQL_ANONYMOUS_GTID_EVENT: u8 = 34;
const PARTIAL_UPDATE_ROWS_EVENT: u8 = 39;
const TRANSACTION_PAYLOAD_EVENT: u8 = 40;
const MYSQL_GTID_TAGGED_EVENT: u8 = 42;
const MARIADB_GTID_EVENT: u8 = 162;
const MARIADB_QUERY_COMPRESSED_EVENT: u8 = 165;
const MARIADB_ROWS_COMPRESSED_FIRST: u8 = 166;
const MARIADB_ROWS_COMPRESSED_LAST: u8 = 171;

/// Bytes of captured rows events between two split points of one transaction (see the module
/// note): a transaction smaller than this never sends one.
pub const SPLIT_POINT_BYTES: u64 = 1 << 20;

/// A binlog event header's length.
const HEADER_LEN: usize = 19;
/// The largest event accepted (the server's own limit for a replicated event is 1 GiB).
const MAX_EVENT_BYTES: usize = 1 << 30;

/// What the decoder needs from the server besides the events: facts TABLE_MAP does not carry.
/// The source asks MySQL on a side connection; offline, nothing is known.
pub trait Catalog {
    /// Adds the defaults of NOT NULL columns to a shape read from a TABLE_MAP.
    fn add_defaults(
        &mut self,
        schema: &mut TableSchema,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
    /// The server's collation ids (asked once, at the first captured TABLE_MAP).
    fn collations(&mut self) -> impl Future<Output = Result<Collations, SourceError>> + Send;
    /// The current shape of `db.table` (a TRUNCATE of a table no TABLE_MAP has shown yet).
    fn shape(
        &mut self,
        db: &str,
        table: &str,
    ) -> impl Future<Output = Result<TableSchema, SourceError>> + Send;
    /// The TABLE_MAP and rows events of XA transaction `xid`'s prepared group, in binlog order,
    /// read again (`source::xa`): from `from` on when its place is known, else searched for
    /// before `before`, file by file backwards. `None`: no binlog at hand holds it.
    fn prepared_xa(
        &mut self,
        xid: &str,
        from: Option<&BinlogPosition>,
        before: &BinlogPosition,
    ) -> impl Future<Output = Result<Option<Vec<Event>>, SourceError>> + Send;
}

/// Where the decoder's messages go (the hand-over to the producer loop, or the offline printer).
pub trait Emit {
    /// Takes one message, waiting while the receiver is full.
    fn emit(&mut self, msg: SourceMsg) -> impl Future<Output = Result<(), SourceError>> + Send;
}

/// Which tables' changes are decoded.
#[derive(Debug, Clone)]
pub enum Capture {
    /// Only these `db.table` names (the source's `source.tables`).
    Only(HashSet<String>),
    /// Every table (offline inspection).
    All,
}

impl Capture {
    fn contains(&self, qualified: &str) -> bool {
        match self {
            Capture::Only(t) => t.contains(qualified),
            Capture::All => true,
        }
    }
}

/// The decoder's state between events (see the module note).
pub struct Decoder {
    capture: Capture,
    epoch: u64,
    window: Option<Window>,
    file: String,
    fde_seen: bool,
    /// The server logs CRC32 checksums.
    crc: bool,
    /// Tables without column names are decoded positionally (offline only, see
    /// [`from_table_map`]).
    positional: bool,
    gtid: Option<String>,
    /// Inside a transaction (after BEGIN or a MariaDB non-standalone GTID, until XID/COMMIT).
    in_tx: bool,
    /// The open transaction's place was set by its GTID event (a BEGIN without a position
    /// inside a compressed payload keeps it).
    gtid_placed: bool,
    /// The open transaction has emitted changes of captured tables.
    emitted: bool,
    tx_ts_ms: i64,
    /// The last resume point (a transaction boundary).
    boundary: u64,
    place: TxPlace,
    /// A transaction that ended on an event without a position: its GTID and commit time, sent
    /// as a boundary once the next positioned event says where it ended.
    deferred: Option<(Option<String>, i64)>,
    /// Rows events emitted (test pause points count them).
    rows_events: u64,
    /// The last shape of each captured table (a TRUNCATE names a table, not a table id).
    schemas_by_name: HashMap<String, Arc<TableSchema>>,
    /// The server's collation ids, once asked.
    collations: Option<Collations>,
    /// What the last boundary covers, when known (`crate::gtid`).
    gtid_state: Option<GtidState>,
    /// table_id → (raw TABLE_MAP body, decoded shape); None = not captured.
    tables_by_id: HashMap<u64, (Vec<u8>, Option<Arc<BinlogTable>>)>,
    /// The position of the heartbeat just heard between transactions: the server had nothing
    /// more to send, so everything up to there is read (cleared by the next other event).
    heard: Option<u64>,
    /// Rows placed per captured table in the open transaction (what a split point stores).
    tx_rows: Vec<TxTable>,
    /// Bytes of captured rows events of the open transaction since its last split point.
    since_split: u64,
    /// Resuming inside a split transaction: what of it is in Kafka already (dropped again).
    skip: Option<Within>,
    /// Where this decoder started: an XA transaction committed later but prepared before here
    /// is searched for before it (`source::xa`).
    start: BinlogPosition,
    /// The open transaction is an XA transaction's group (after `XA START`): its rows are held
    /// back until its commit.
    xa: Option<XaOpen>,
    /// XA transactions prepared since `start` and not ended yet: where to read each again
    /// (`None`: it changed no captured table).
    xa_prepared: HashMap<String, Option<BinlogPosition>>,
    /// The rows handled are an XA transaction's, read again at its commit: emitted, not held.
    replaying: bool,
    /// The online snapshot's watermarks, when it places chunks by them (`source::watermark`).
    watermarks: Option<Watch>,
}

/// The open XA group.
struct XaOpen {
    xid: String,
    /// At or before the group's first event: where it is read again.
    from: BinlogPosition,
    /// It has rows of captured tables.
    captured: bool,
}

/// One captured table's rows in the open transaction.
struct TxTable {
    table_id: u64,
    schema: Arc<TableSchema>,
    /// Rows of it placed so far in this transaction.
    placed: u64,
    /// Rows of it to drop at a resume inside this transaction (in Kafka already).
    skip: u64,
}

impl Decoder {
    /// A decoder for a stream that starts at `start` (a transaction boundary).
    pub fn new(
        capture: Capture,
        start: &BinlogPosition,
        epoch: u64,
        window: Option<Window>,
    ) -> Self {
        Decoder {
            capture,
            epoch,
            window,
            file: start.file.clone(),
            fde_seen: false,
            crc: false,
            positional: false,
            gtid: None,
            in_tx: false,
            gtid_placed: false,
            emitted: false,
            tx_ts_ms: 0,
            boundary: start.pos,
            place: TxPlace::open(0, start.pos),
            deferred: None,
            rows_events: 0,
            schemas_by_name: HashMap::new(),
            collations: None,
            gtid_state: None,
            tables_by_id: HashMap::new(),
            heard: None,
            tx_rows: Vec::new(),
            since_split: 0,
            skip: None,
            start: start.clone(),
            xa: None,
            xa_prepared: HashMap::new(),
            replaying: false,
            watermarks: None,
        }
    }

    /// Watches the stream for the online snapshot's watermarks (`source::watermark`).
    pub fn with_watermarks(mut self, watch: Option<Watch>) -> Self {
        self.watermarks = watch;
        self
    }

    /// The watermark watch, when there is one.
    pub fn watermarks_mut(&mut self) -> Option<&mut Watch> {
        self.watermarks.as_mut()
    }

    /// Resumes inside the transaction that starts at the start position, which a split left
    /// partly published (`within`, see the module note): its published rows are dropped.
    pub fn with_within(mut self, within: Option<Within>) -> Self {
        self.skip = within;
        self
    }

    /// Decodes tables whose TABLE_MAP has no column names with positional names instead of
    /// refusing them (offline inspection of `binlog_row_metadata = MINIMAL` binlogs).
    pub fn with_positional_names(mut self) -> Self {
        self.positional = true;
        self
    }

    /// Tracks the GTID state from `state` (what the start position covers) on: every boundary
    /// then carries the state it covers.
    pub fn with_gtid_state(mut self, state: Option<GtidState>) -> Self {
        self.gtid_state = state;
        self
    }

    /// The binlog file being read.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Where a restart could resume right now without publishing anything twice: the last
    /// boundary, while no change of an open transaction has been emitted and no boundary waits
    /// for its position. `None` otherwise (`source::online` hands a chunk over only at such a
    /// point).
    pub fn resume_point(&self) -> Option<BinlogPosition> {
        (!self.emitted && self.deferred.is_none() && self.skip.is_none() && !self.file.is_empty())
            .then(|| BinlogPosition {
                file: self.file.clone(),
                pos: self.boundary,
            })
    }

    /// Whether the stream still replays the stretch a resumed snapshot spanned (its rows are
    /// filtered by the positions they were read at: `source::window`).
    pub fn in_window(&self) -> bool {
        match (&self.window, self.resume_point()) {
            (None, _) => false,
            (Some(w), Some(at)) => !w.passed(&at),
            (Some(_), None) => true,
        }
    }

    /// How far the stream is read with nothing open: the position of a heartbeat heard between
    /// transactions (the server had nothing more to send, so no transaction ends between the
    /// resume point and there), else the resume point.
    pub fn settled_to(&self) -> Option<BinlogPosition> {
        let at = self.resume_point()?;
        match self.heard {
            Some(h) if !self.in_tx && h > at.pos => Some(BinlogPosition { pos: h, ..at }),
            _ => Some(at),
        }
    }

    /// Where the open transaction's changes are placed (for messages about it).
    fn here(&self) -> BinlogPosition {
        BinlogPosition {
            file: self.file.clone(),
            pos: self.place.pos,
        }
    }

    /// Handles one event read from the server or a file. `verify_crc`: check the event's CRC32
    /// (every event after the format description carries one when the server logs checksums).
    pub async fn on_event<C: Catalog + Send, E: Emit + Send>(
        &mut self,
        event: &Event,
        verify_crc: bool,
        catalog: &mut C,
        emit: &mut E,
    ) -> Result<(), SourceError> {
        let header = event.header();
        self.crc = verify_crc;
        if verify_crc
            && self.fde_seen
            && header.event_type_raw() != FORMAT_DESCRIPTION_EVENT
            && let Ok(Some(BinlogChecksumAlg::BINLOG_CHECKSUM_ALG_CRC32)) =
                event.footer().get_checksum_alg()
            && let Some(sum) = event.checksum()
            && u32::from_le_bytes(sum)
                != event.calc_checksum(BinlogChecksumAlg::BINLOG_CHECKSUM_ALG_CRC32)
        {
            return Err(SourceError::Checksum {
                file: self.file.clone(),
                pos: u64::from(header.log_pos()),
            });
        }
        if header.event_type_raw() == TRANSACTION_PAYLOAD_EVENT {
            return self.on_payload(event, catalog, emit).await;
        }
        if super::compressed::is_compressed(header.event_type_raw()) {
            // MariaDB `log_bin_compress = ON`: handled as the plain event it compresses.
            let plain =
                super::compressed::uncompress(event).map_err(|detail| SourceError::Compressed {
                    position: BinlogPosition {
                        file: self.file.clone(),
                        pos: u64::from(header.log_pos()),
                    },
                    detail,
                })?;
            return self.handle(&plain, header.log_pos(), catalog, emit).await;
        }
        self.handle(event, header.log_pos(), catalog, emit).await
    }

    /// A compressed transaction: its inner events, then its boundary at the payload's end.
    async fn on_payload<C: Catalog + Send, E: Emit + Send>(
        &mut self,
        event: &Event,
        catalog: &mut C,
        emit: &mut E,
    ) -> Result<(), SourceError> {
        let log_pos = event.header().log_pos();
        let at = BinlogPosition {
            file: self.file.clone(),
            pos: u64::from(log_pos),
        };
        let bad = |detail: String| SourceError::Payload {
            position: at.clone(),
            detail,
        };
        let payload: TransactionPayloadEvent<'_> =
            event.read_event().map_err(|e| bad(e.to_string()))?;
        let mut reader = payload.decompressed().map_err(|e| bad(e.to_string()))?;
        let fde = inner_format(event);
        while let Some(inner) = read_framed(&fde, &mut reader).map_err(|e| bad(e.to_string()))? {
            if inner.header().event_type_raw() == TRANSACTION_PAYLOAD_EVENT {
                return Err(bad("a compressed transaction inside another".into()));
            }
            self.handle(&inner, 0, catalog, emit).await?;
        }
        self.in_tx = false;
        if log_pos != 0
            && let Some((g, ts)) = self.deferred.take()
        {
            self.boundary = u64::from(log_pos);
            let m = self.commit(at, g, ts);
            emit.emit(m).await?;
        }
        Ok(())
    }

    /// One event; `log_pos` is its header's end position (0: none, as inside a payload).
    async fn handle<C: Catalog + Send, E: Emit + Send>(
        &mut self,
        event: &Event,
        log_pos: u32,
        catalog: &mut C,
        emit: &mut E,
    ) -> Result<(), SourceError> {
        let header = event.header();
        let etype = header.event_type_raw();
        self.heard = None;
        // A deferred boundary is known exactly once a positioned event follows: a GTID event
        // starts where the transaction before it ended; a heartbeat says where the dump is.
        if self.deferred.is_some() {
            let known = match etype {
                MARIADB_GTID_EVENT
                | MYSQL_GTID_EVENT
                | MYSQL_ANONYMOUS_GTID_EVENT
                | MYSQL_GTID_TAGGED_EVENT => event_start(log_pos, header.event_size()),
                HEARTBEAT_EVENT => (log_pos != 0).then_some(u64::from(log_pos)),
                _ => None,
            };
            if let Some(end) = known.filter(|&e| e >= self.boundary)
                && let Some((g, ts)) = self.deferred.take()
            {
                self.boundary = end;
                let position = BinlogPosition {
                    file: self.file.clone(),
                    pos: end,
                };
                let m = self.commit(position, g, ts);
                emit.emit(m).await?;
            }
        }
        match etype {
            ROTATE_EVENT => {
                if let Ok(Some(EventData::RotateEvent(r))) = event.read_data() {
                    let mut name = r.name_raw().to_vec();
                    // The first (fake) rotate of a dump arrives before the format description,
                    // so its name still carries the 4 CRC bytes.
                    if !self.fde_seen && self.crc && name.len() > 4 {
                        name.truncate(name.len() - 4);
                    }
                    self.file = String::from_utf8_lossy(&name).into_owned();
                    if (log_pos != 0 || self.deferred.is_some()) && !self.in_tx {
                        // A real rotate between transactions: the next file's start is a safe
                        // resume point (and replaces a deferred one).
                        self.boundary = r.position();
                        let position = BinlogPosition {
                            file: self.file.clone(),
                            pos: self.boundary,
                        };
                        let (g, ts) = self.deferred.take().unwrap_or((None, 0));
                        let m = self.commit(position, g, ts);
                        emit.emit(m).await?;
                    }
                }
            }
            FORMAT_DESCRIPTION_EVENT => self.fde_seen = true,
            HEARTBEAT_EVENT if !self.in_tx && self.deferred.is_none() && log_pos != 0 => {
                self.heard = Some(u64::from(log_pos));
            }
            HEARTBEAT_EVENT | STOP_EVENT => {}
            MARIADB_GTID_EVENT => {
                let parsed = parse_mariadb_gtid(event.data(), header.server_id());
                // A standalone GTID (DDL) has no XID: its one query event ends it.
                self.in_tx = parsed.as_ref().is_some_and(|(_, standalone)| !*standalone);
                self.gtid = parsed.map(|(g, _)| g);
                self.open_tx(log_pos, header.timestamp());
                // MariaDB carries an XA transaction's xid in the GTID event of its prepared
                // group (no `XA START` statement is logged).
                if let Some(xid) = xa::mariadb_prepared_xid(event.data()) {
                    self.xa = Some(XaOpen {
                        xid,
                        from: BinlogPosition {
                            file: self.file.clone(),
                            pos: self.boundary,
                        },
                        captured: false,
                    });
                }
            }
            MYSQL_GTID_EVENT | MYSQL_GTID_TAGGED_EVENT => {
                let g = match event.read_data() {
                    Ok(Some(EventData::GtidEvent(g))) => g,
                    other => {
                        return Err(SourceError::RowDecode {
                            table: "?".into(),
                            detail: format!(
                                "unreadable GTID event at {}: {:?}",
                                self.here(),
                                other.err()
                            ),
                        });
                    }
                };
                self.gtid = Some(mysql_gtid(
                    &g.sid(),
                    g.tag().map(|t| t.to_string()),
                    g.gno(),
                ));
                self.open_tx(log_pos, header.timestamp());
            }
            MYSQL_ANONYMOUS_GTID_EVENT => {
                self.gtid = None;
                self.open_tx(log_pos, header.timestamp());
            }
            QUERY_EVENT => self.on_query(event, log_pos, catalog, emit).await?,
            XID_EVENT => {
                self.in_tx = false;
                self.end_transaction(log_pos, emit).await?;
            }
            XA_PREPARE_LOG_EVENT => {
                // The end of an XA group: a prepare (its XA COMMIT or XA ROLLBACK comes later as
                // a group of its own), or MySQL's one-phase commit. Either way a boundary.
                if self.xa.is_none() && self.emitted {
                    // A group not recognised as XA at its start had its rows published already.
                    return Err(SourceError::Unsupported {
                        what: "an XA PREPARE whose group did not start as an XA transaction (no XA START, no XA flag in its GTID event): its rows were about to be published before it commits".into(),
                        fix: "report the server version; to step past this one, re-snapshot (snapshot_mode = \"always\" once)".into(),
                        position: self.here(),
                    });
                }
                if let Some(open) = self.xa.take() {
                    let from = open.captured.then_some(open.from);
                    if xa::one_phase(event) {
                        if let Some(from) = from {
                            self.replay_xa(&open.xid, Some(from), catalog, emit).await?;
                        }
                    } else {
                        self.xa_prepared.insert(open.xid, from);
                    }
                }
                self.in_tx = false;
                self.end_transaction(log_pos, emit).await?;
            }
            TABLE_MAP_EVENT => self.on_table_map(event, catalog).await?,
            23..=25 | 30..=32 | PARTIAL_UPDATE_ROWS_EVENT => self.on_rows(event, emit).await?,
            INCIDENT_EVENT => {
                return Err(SourceError::Unsupported {
                    what: "an INCIDENT event: the server says changes may be missing from its binlog".into(),
                    fix: "re-snapshot (snapshot_mode = \"always\" once) so the copies match the tables again".into(),
                    position: BinlogPosition { file: self.file.clone(), pos: u64::from(log_pos) },
                });
            }
            MARIADB_QUERY_COMPRESSED_EVENT
            | MARIADB_ROWS_COMPRESSED_FIRST..=MARIADB_ROWS_COMPRESSED_LAST => {
                // `on_event` turns them into plain events; here only from inside a MySQL
                // compressed transaction, which MariaDB never writes.
                return Err(SourceError::Compressed {
                    position: BinlogPosition {
                        file: self.file.clone(),
                        pos: u64::from(log_pos),
                    },
                    detail: "a MariaDB compressed event inside a MySQL compressed transaction"
                        .into(),
                });
            }
            _ => {}
        }
        Ok(())
    }

    /// A transaction opened by a GTID event.
    fn open_tx(&mut self, log_pos: u32, timestamp: u32) {
        self.tx_ts_ms = i64::from(timestamp) * 1000;
        self.emitted = false;
        self.xa = None;
        self.place = TxPlace::open(log_pos, self.boundary);
        self.gtid_placed = true;
        self.tx_rows.clear();
        self.since_split = 0;
    }

    async fn on_query<C: Catalog + Send, E: Emit + Send>(
        &mut self,
        event: &Event,
        log_pos: u32,
        catalog: &mut C,
        emit: &mut E,
    ) -> Result<(), SourceError> {
        let header = event.header();
        let (query, default_db) = match event.read_data() {
            Ok(Some(EventData::QueryEvent(q))) => (
                q.query().trim().to_ascii_uppercase(),
                q.schema().into_owned(),
            ),
            _ => (String::new(), String::new()),
        };
        if let Some(table) = statement_dml_on(&query, &default_db, &self.capture) {
            return Err(SourceError::StatementDml {
                table,
                position: self.here(),
            });
        }
        let xa_statement = xa::statement(&query);
        if query == "BEGIN" || matches!(xa_statement, Some(XaStatement::Start(_))) {
            // A GTID event announced the transaction already (and placed it).
            if !self.in_tx && !self.gtid_placed {
                self.place = TxPlace::open(log_pos, self.boundary);
                self.emitted = false;
                self.tx_rows.clear();
                self.since_split = 0;
            }
            self.in_tx = true;
            self.tx_ts_ms = i64::from(header.timestamp()) * 1000;
            // The group starts at the last boundary at the latest (its GTID event's start).
            self.xa = match xa_statement {
                Some(XaStatement::Start(xid)) => Some(XaOpen {
                    xid: xid.to_string(),
                    from: BinlogPosition {
                        file: self.file.clone(),
                        pos: self.boundary,
                    },
                    captured: false,
                }),
                _ => None,
            };
            return Ok(());
        }
        match xa_statement {
            // The commit of a prepared XA transaction: its rows take effect, and are placed,
            // here. (Inside an XA group, a one-phase commit of that group.)
            Some(XaStatement::Commit(xid)) => {
                match self.xa.take() {
                    Some(open) => {
                        if open.captured {
                            self.replay_xa(&open.xid, Some(open.from), catalog, emit)
                                .await?;
                        }
                    }
                    None => {
                        let known = self.xa_prepared.remove(xid);
                        if !matches!(known, Some(None)) {
                            self.replay_xa(xid, known.flatten(), catalog, emit).await?;
                        }
                    }
                }
                self.in_tx = false;
                return self.end_transaction(log_pos, emit).await;
            }
            Some(XaStatement::Rollback(xid)) => {
                self.xa_prepared.remove(xid);
                self.xa = None;
                self.in_tx = false;
                return self.end_transaction(log_pos, emit).await;
            }
            _ => {}
        }
        // ROLLBACK, or ROLLBACK TO SAVEPOINT, after rows of a captured table.
        if query.starts_with("ROLLBACK") && self.in_tx && self.emitted {
            // Only a transaction that also changed a non-transactional table is logged with a
            // ROLLBACK; its transactional rows were emitted already and would be published.
            return Err(SourceError::Unsupported {
                what: "a rolled-back transaction (ROLLBACK after row events: it mixed transactional and non-transactional tables)".into(),
                fix: "do not mix non-transactional (e.g. MyISAM) tables with captured tables in one transaction; to step past this one, re-snapshot (snapshot_mode = \"always\" once)".into(),
                position: self.here(),
            });
        }
        // A ROLLBACK without captured rows ends its transaction too.
        let ends = query == "COMMIT" || query == "ROLLBACK";
        if ends || !self.in_tx {
            self.in_tx = false;
            if !ends {
                self.on_ddl(&query, &default_db, header.server_id(), catalog, emit)
                    .await?;
            }
            self.end_transaction(log_pos, emit).await?;
        }
        Ok(())
    }

    /// DDL: table shapes may have changed, and a captured table may have been truncated,
    /// dropped or renamed.
    async fn on_ddl<C: Catalog + Send, E: Emit + Send>(
        &mut self,
        query: &str,
        default_db: &str,
        server_id: u32,
        catalog: &mut C,
        emit: &mut E,
    ) -> Result<(), SourceError> {
        // New TABLE_MAPs will follow.
        self.tables_by_id.clear();
        let Some((what, table)) = table_lifecycle(query, default_db, &self.capture) else {
            return Ok(());
        };
        metrics::counter!(m::SOURCE_TABLE_LIFECYCLE_TOTAL, m::TABLE_LABEL => table.clone(), m::OP_LABEL => what.label()).increment(1);
        tracing::warn!(
            table,
            statement = what.label(),
            effect = what.effect(),
            "a captured table was {}",
            what.past()
        );
        if what != Lifecycle::Truncate {
            return Ok(());
        }
        let schema = match self.schemas_by_name.get(&table) {
            Some(s) => s.clone(),
            None => {
                let (db, t) = table.split_once('.').unwrap_or(("", &table));
                Arc::new(catalog.shape(db, t).await?)
            }
        };
        let (pos, row) = self.place.place_row();
        let ev = ChangeEvent {
            schema,
            op: Op::Truncate,
            before: None,
            after: None,
            source: SourceInfo {
                ts_ms: self.tx_ts_ms,
                snapshot: "false",
                server_id,
                gtid: self.gtid.as_deref().map(Arc::from),
                file: Arc::from(self.file.as_str()),
                pos,
                row,
                epoch: self.epoch,
                read_ts_ms: crate::events::now_ms(),
            },
        };
        emit.emit(SourceMsg::Changes(vec![ev])).await
    }

    async fn on_table_map<C: Catalog + Send>(
        &mut self,
        event: &Event,
        catalog: &mut C,
    ) -> Result<(), SourceError> {
        let tme: TableMapEvent<'_> = event.read_event().map_err(|e| SourceError::TableMap {
            table: "?".into(),
            detail: e.to_string(),
        })?;
        let id = tme.table_id();
        let body = event.data();
        let unchanged = self
            .tables_by_id
            .get(&id)
            .is_some_and(|(raw, _)| raw.as_slice() == body);
        if unchanged {
            return Ok(());
        }
        let qn = format!("{}.{}", tme.database_name(), tme.table_name());
        let watermark = self.watermarks.as_ref().is_some_and(|w| w.is_table(&qn));
        let shape = if self.capture.contains(&qn) || watermark {
            if self.collations.is_none() {
                self.collations = Some(catalog.collations().await?);
            }
            let collations = self.collations.as_ref().ok_or(SourceError::ChannelClosed)?;
            let mut t = from_table_map(&tme, self.positional, collations)?;
            drop(tme);
            // Defaults of NOT NULL columns, which TABLE_MAP does not carry. Rare: a new shape only.
            if t.schema.columns.iter().any(|c| !c.nullable) {
                catalog.add_defaults(Arc::make_mut(&mut t.schema)).await?;
            }
            if !watermark {
                self.schemas_by_name.insert(qn, t.schema.clone());
            }
            Some(Arc::new(t))
        } else {
            None
        };
        self.tables_by_id.insert(id, (body.to_vec(), shape));
        Ok(())
    }

    async fn on_rows<E: Emit + Send>(
        &mut self,
        event: &Event,
        emit: &mut E,
    ) -> Result<(), SourceError> {
        let header = event.header();
        let etype = header.event_type_raw();
        let Ok(Some(EventData::RowsEvent(rows))) = event.read_data() else {
            return Err(SourceError::RowDecode {
                table: "?".into(),
                detail: format!("unreadable rows event type {etype} at {}", self.here()),
            });
        };
        let Some((_, Some(table))) = self.tables_by_id.get(&rows.table_id()) else {
            return Ok(());
        };
        if let Some(watch) = self.watermarks.as_mut()
            && watch.is_table(&table.schema.qualified_name())
        {
            // Never published: only read for the online snapshot's watermarks.
            let table = table.clone();
            let before = rows.columns_before_image().map(bits);
            let after = rows.columns_after_image().map(bits);
            let decoded = decode_rows(
                &table,
                rows.rows_data(),
                before.as_deref(),
                after.as_deref(),
                false,
            )?;
            let images: Vec<Vec<_>> = decoded.into_iter().filter_map(|(_, a)| a).collect();
            watch.on_watermark_rows(&table.schema, &images);
            return Ok(());
        }
        if let Some(open) = self.xa.as_mut().filter(|_| !self.replaying) {
            // Published at the XA transaction's commit, if it commits (`source::xa`).
            open.captured = true;
            return Ok(());
        }
        let table = table.clone();
        let (op, before, after): (Op, Option<Vec<bool>>, Option<Vec<bool>>) = match &rows {
            RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => {
                (Op::Create, None, rows.columns_after_image().map(bits))
            }
            RowsEventData::UpdateRowsEventV1(_)
            | RowsEventData::UpdateRowsEvent(_)
            | RowsEventData::PartialUpdateRowsEvent(_) => (
                Op::Update,
                rows.columns_before_image().map(bits),
                rows.columns_after_image().map(bits),
            ),
            RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => {
                (Op::Delete, rows.columns_before_image().map(bits), None)
            }
        };
        // A partial image (a session with binlog_row_image = MINIMAL or NOBLOB, which
        // preflight cannot see) would be published as a row with NULLs: refuse it.
        for (image, present) in [("before", &before), ("after", &after)] {
            if let Some(missing) = present.as_deref().and_then(|p| missing_columns(&table, p)) {
                if etype == PARTIAL_UPDATE_ROWS_EVENT {
                    return Err(SourceError::PartialJson {
                        table: table.schema.qualified_name(),
                        position: self.here(),
                    });
                }
                return Err(SourceError::PartialRowImage {
                    table: table.schema.qualified_name(),
                    image,
                    missing,
                    position: self.here(),
                });
            }
        }
        let read_ts_ms = crate::events::now_ms();
        let ev_file: Arc<str> = Arc::from(self.file.as_str());
        let ev_gtid: Option<Arc<str>> = self.gtid.as_deref().map(Arc::from);
        let decoded = decode_rows(
            &table,
            rows.rows_data(),
            before.as_deref(),
            after.as_deref(),
            etype == PARTIAL_UPDATE_ROWS_EVENT,
        )?;
        if let Some(watch) = self.watermarks.as_mut() {
            watch.on_rows(&table.schema, &decoded);
        }
        // Only a resumed snapshot's stretch needs a position per change.
        let at = self.window.as_ref().map(|_| self.here());
        if let (Some(w), Some(at)) = (&self.window, &at)
            && w.passed(at)
        {
            tracing::info!(position = %at, "stream passed the resumed snapshot's stretch");
            self.window = None;
        }
        let n = decoded.len() as u64;
        let slot = self.tx_table(rows.table_id(), &table.schema)?;
        // A resume inside a split transaction: this table's first rows are in Kafka already.
        let drop_n = self.tx_rows[slot]
            .skip
            .saturating_sub(self.tx_rows[slot].placed)
            .min(n);
        self.tx_rows[slot].placed += n;
        let mut batch = Vec::with_capacity(decoded.len());
        for (i, (b, a)) in decoded.into_iter().enumerate() {
            if (i as u64) < drop_n {
                self.place.place_row();
                continue;
            }
            if let Some(w) = &self.skip {
                // Versions go on from the last one published.
                self.place.next_row = self.place.next_row.max(w.next_row);
            }
            let (pos, row) = self.place.place_row();
            let ev = ChangeEvent {
                schema: table.schema.clone(),
                op,
                before: b,
                after: a,
                source: SourceInfo {
                    ts_ms: self.tx_ts_ms,
                    snapshot: "false",
                    server_id: header.server_id(),
                    gtid: ev_gtid.clone(),
                    file: ev_file.clone(),
                    pos,
                    row,
                    epoch: self.epoch,
                    read_ts_ms,
                },
            };
            let ev = match (&self.window, &at) {
                (Some(w), Some(at)) => w.filter(ev, at),
                _ => Some(ev),
            };
            batch.extend(ev);
        }
        if batch.is_empty() {
            return Ok(());
        }
        // One message per rows event: the channel costs per message, not per row.
        emit.emit(SourceMsg::Changes(batch)).await?;
        self.emitted = true;
        self.rows_events += 1;
        self.since_split += u64::from(header.event_size());
        if self.in_tx && self.deferred.is_none() && self.since_split >= SPLIT_POINT_BYTES {
            self.since_split = 0;
            emit.emit(SourceMsg::Split(self.within())).await?;
        }
        crate::failpoint::pause_if_armed("stream.rows_events", self.rows_events).await;
        Ok(())
    }

    /// The open transaction's slot in `tx_rows` for table `table_id`; at a resume inside a
    /// split transaction, the first rows event of it checks that it is the stored one.
    fn tx_table(&mut self, table_id: u64, schema: &Arc<TableSchema>) -> Result<usize, SourceError> {
        if let Some(i) = self.tx_rows.iter().position(|t| t.table_id == table_id) {
            return Ok(i);
        }
        let mut skip = 0;
        if let Some(w) = &self.skip {
            if let (Some(want), Some(got)) = (&w.gtid, &self.gtid)
                && want != got
            {
                return Err(self.split_mismatch(w, format!("transaction {got}")));
            }
            skip = w.rows.get(&schema.qualified_name()).copied().unwrap_or(0);
        }
        self.tx_rows.push(TxTable {
            table_id,
            schema: schema.clone(),
            placed: 0,
            skip,
        });
        Ok(self.tx_rows.len() - 1)
    }

    /// What of the open transaction is published: each table's rows, and the next row index.
    fn within(&self) -> Within {
        let mut w = Within {
            gtid: self.gtid.clone(),
            rows: self
                .skip
                .as_ref()
                .map(|w| w.rows.clone())
                .unwrap_or_default(),
            next_row: self
                .place
                .next_row
                .max(self.skip.as_ref().map_or(0, |w| w.next_row)),
        };
        for t in &self.tx_rows {
            let n = w.rows.entry(t.schema.qualified_name()).or_default();
            *n = (*n).max(t.placed);
        }
        w
    }

    fn split_mismatch(&self, w: &Within, found: String) -> SourceError {
        SourceError::SplitMismatch {
            position: BinlogPosition {
                file: self.file.clone(),
                pos: self.boundary,
            },
            expected: format!(
                "{} ({} rows published)",
                w.gtid.as_deref().unwrap_or("(no GTID)"),
                w.total()
            ),
            found,
        }
    }

    /// At the end of the transaction a resume started inside: every table of it still captured
    /// had at least the rows published before (else the binlog holds another transaction).
    fn check_split_end(&mut self) -> Result<(), SourceError> {
        let Some(w) = self.skip.take() else {
            return Ok(());
        };
        if let (Some(want), Some(got)) = (&w.gtid, &self.gtid)
            && want != got
        {
            return Err(self.split_mismatch(&w, format!("transaction {got}")));
        }
        for (table, &want) in &w.rows {
            if !self.capture.contains(table) {
                continue;
            }
            let placed = self
                .tx_rows
                .iter()
                .find(|t| &t.schema.qualified_name() == table)
                .map_or(0, |t| t.placed);
            if placed < want {
                return Err(self.split_mismatch(
                    &w,
                    format!("a transaction with only {placed} rows of `{table}` (not {want})"),
                ));
            }
        }
        Ok(())
    }

    /// Publishes XA transaction `xid`'s rows in the open transaction (its commit group): its
    /// prepared group read again, from `from` when known (`source::xa`).
    async fn replay_xa<C: Catalog + Send, E: Emit + Send>(
        &mut self,
        xid: &str,
        from: Option<BinlogPosition>,
        catalog: &mut C,
        emit: &mut E,
    ) -> Result<(), SourceError> {
        let before = match &from {
            Some(_) => self.here(),
            None => self.start.clone(),
        };
        let Some(events) = catalog.prepared_xa(xid, from.as_ref(), &before).await? else {
            return Err(SourceError::XaPrepareMissing {
                xid: xid.to_string(),
                before,
                position: self.here(),
            });
        };
        tracing::debug!(xid, events = events.len(), position = %self.here(), "XA transaction committed: its prepared rows are published here");
        self.replaying = true;
        let mut result = Ok(());
        for event in &events {
            let etype = event.header().event_type_raw();
            let plain;
            let event = if super::compressed::is_compressed(etype) {
                plain = super::compressed::uncompress(event).map_err(|detail| {
                    SourceError::Compressed {
                        position: self.here(),
                        detail,
                    }
                });
                match &plain {
                    Ok(p) => p,
                    Err(_) => {
                        result = plain.map(|_| ());
                        break;
                    }
                }
            } else {
                event
            };
            result = if event.header().event_type_raw() == TABLE_MAP_EVENT {
                self.on_table_map(event, catalog).await
            } else {
                self.on_rows(event, emit).await
            };
            if result.is_err() {
                break;
            }
        }
        self.replaying = false;
        result
    }

    /// A transaction ended on an event whose header says it ends at `log_pos`: its boundary is
    /// emitted now, or deferred when the header has no position (see the module note).
    async fn end_transaction<E: Emit + Send>(
        &mut self,
        log_pos: u32,
        emit: &mut E,
    ) -> Result<(), SourceError> {
        self.check_split_end()?;
        self.xa = None;
        if let Some(watch) = self.watermarks.as_mut() {
            watch.on_transaction_end();
        }
        let gtid = self.gtid.take();
        self.gtid_placed = false;
        self.emitted = false;
        self.tx_rows.clear();
        self.since_split = 0;
        if log_pos == 0 {
            self.deferred = Some((gtid, self.tx_ts_ms));
            // The next transaction starts after this one, even before its boundary is known.
            self.place = TxPlace::open(0, self.boundary);
            return Ok(());
        }
        self.boundary = u64::from(log_pos);
        self.place = TxPlace::open(0, self.boundary);
        let position = BinlogPosition {
            file: self.file.clone(),
            pos: self.boundary,
        };
        let m = self.commit(position, gtid, self.tx_ts_ms);
        emit.emit(m).await
    }

    /// A transaction-boundary message; its GTID joins the state the boundary covers.
    fn commit(&mut self, position: BinlogPosition, gtid: Option<String>, ts_ms: i64) -> SourceMsg {
        if let (Some(state), Some(g)) = (self.gtid_state.as_mut(), gtid.as_deref())
            && let Err(e) = state.add(g)
        {
            // The state can no longer be trusted: none is stored rather than a wrong one.
            tracing::warn!(error = %e, "GTID state dropped: positions are stored without one");
            self.gtid_state = None;
        }
        SourceMsg::Commit {
            position,
            gtid,
            gtid_set: self.gtid_state.as_ref().map(|s| s.to_string()),
            ts_ms,
        }
    }
}

/// A MySQL GTID as the server prints it: `uuid:gno`, or `uuid:tag:gno` for a tagged GTID
/// (8.4+).
pub fn mysql_gtid(sid: &[u8; 16], tag: Option<String>, gno: u64) -> String {
    let hex: String = sid.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    match tag.filter(|t| !t.is_empty()) {
        Some(t) => format!("{uuid}:{t}:{gno}"),
        None => format!("{uuid}:{gno}"),
    }
}

/// Calls `each` with every event inside a compressed transaction (MySQL's TRANSACTION_PAYLOAD),
/// one in memory at a time; `at` is the payload's place (for messages).
pub(crate) fn each_in_payload(
    event: &Event,
    at: &BinlogPosition,
    mut each: impl FnMut(&Event) -> Result<(), SourceError>,
) -> Result<(), SourceError> {
    let bad = |detail: String| SourceError::Payload {
        position: at.clone(),
        detail,
    };
    let payload: TransactionPayloadEvent<'_> =
        event.read_event().map_err(|e| bad(e.to_string()))?;
    let mut reader = payload.decompressed().map_err(|e| bad(e.to_string()))?;
    let fde = inner_format(event);
    while let Some(inner) = read_framed(&fde, &mut reader).map_err(|e| bad(e.to_string()))? {
        each(&inner)?;
    }
    Ok(())
}

/// The format to frame a compressed transaction's inner events with: its own, without
/// checksums (inner events carry none, WL#3549).
fn inner_format(event: &Event) -> FormatDescriptionEvent<'static> {
    let mut footer = event.footer();
    footer.set_checksum_enabled(false);
    event.fde().clone().with_footer(footer)
}

/// Reads one whole event from `input` (`None` at a clean end). The event is framed first —
/// header, declared size, then exactly that many bytes — so a short or corrupt input is an
/// error, never a panic inside the parser.
pub fn read_framed(
    fde: &FormatDescriptionEvent<'static>,
    input: &mut impl Read,
) -> std::io::Result<Option<Event>> {
    use std::io::{Error, ErrorKind};
    let mut buf = vec![0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match input.read(&mut buf[got..])? {
            0 if got == 0 => return Ok(None),
            0 => {
                return Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    "truncated event header",
                ));
            }
            n => got += n,
        }
    }
    let size = buf
        .get(9..13)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0) as usize;
    let is_fde = buf.get(4) == Some(&FORMAT_DESCRIPTION_EVENT);
    let checksummed = fde.footer().get_checksum_enabled()
        && !matches!(
            fde.footer().get_checksum_alg(),
            Ok(None | Some(BinlogChecksumAlg::BINLOG_CHECKSUM_ALG_OFF))
        );
    // A checksummed event has room for its 4 checksum bytes, a format description for its
    // server version and checksum trailer.
    let min = HEADER_LEN
        + if is_fde {
            57
        } else if checksummed {
            4
        } else {
            0
        };
    if size < min || size > MAX_EVENT_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("an event header declares {size} bytes"),
        ));
    }
    buf.resize(size, 0);
    input.read_exact(&mut buf[HEADER_LEN..])?;
    Event::read(fde, &buf[..]).map(Some)
}

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
    capture: &Capture,
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
        return match capture {
            Capture::Only(tables) => tables
                .iter()
                .find(|t| t.to_ascii_lowercase().split('.').next() == Some(dropped.as_str()))
                .map(|t| (Lifecycle::Drop, t.clone())),
            Capture::All => Some((Lifecycle::Drop, format!("{dropped}.*"))),
        };
    } else {
        return None;
    };
    names_captured_table(query_upper, default_db, capture).map(|t| (what, t))
}

/// The captured table a statement-format DML query names, if any (`tables`: `db.table`;
/// `default_db`: the query's current database, for unqualified names). Such a query carries no
/// rows: the change it made would be lost without a word.
pub fn statement_dml_on(query_upper: &str, default_db: &str, capture: &Capture) -> Option<String> {
    let dml = ["INSERT", "UPDATE", "DELETE", "REPLACE", "LOAD DATA"]
        .iter()
        .any(|k| query_upper.starts_with(k));
    if !dml {
        return None;
    }
    names_captured_table(query_upper, default_db, capture)
}

/// The first captured table (`db.table`) a statement names: qualified, or unqualified in its
/// default database. With [`Capture::All`], the first name after the statement's keywords.
fn names_captured_table(query_upper: &str, default_db: &str, capture: &Capture) -> Option<String> {
    // Names as words: `a`.`b`, a.b and b alike (dots kept inside a word).
    let text = query_upper.replace('`', "").to_ascii_lowercase();
    let words: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$' || c == '.'))
        .filter(|w| !w.is_empty())
        .collect();
    let default_db = default_db.to_ascii_lowercase();
    match capture {
        Capture::Only(tables) => tables
            .iter()
            .find(|t| {
                let qualified = t.to_ascii_lowercase();
                let (db, name) = qualified.split_once('.').unwrap_or(("", &qualified));
                words
                    .iter()
                    .any(|w| *w == qualified || (*w == name && db == default_db))
            })
            .cloned(),
        Capture::All => {
            const KEYWORDS: &[&str] = &[
                "insert",
                "into",
                "ignore",
                "low_priority",
                "delayed",
                "high_priority",
                "update",
                "delete",
                "from",
                "quick",
                "replace",
                "load",
                "data",
                "local",
                "concurrent",
                "truncate",
                "table",
                "drop",
                "temporary",
                "if",
                "exists",
                "rename",
                "alter",
                "online",
                "offline",
            ];
            let name = words.iter().find(|w| !KEYWORDS.contains(w))?;
            Some(if name.contains('.') {
                (*name).to_string()
            } else {
                format!("{default_db}.{name}")
            })
        }
    }
}

fn bits(b: &bitvec::slice::BitSlice<u8>) -> Vec<bool> {
    b.iter().by_vals().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_dml_naming_a_captured_table_is_recognised_and_ddl_or_other_tables_are_not() {
        let tables = Capture::Only(["shop.users".to_string()].into_iter().collect());
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
        let tables = Capture::Only(["shop.users".to_string()].into_iter().collect());
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
