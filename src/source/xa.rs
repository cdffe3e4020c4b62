//! XA transactions: published at `XA COMMIT`, never at `XA PREPARE`, and never when rolled back.
//!
//! Both servers log an XA transaction in two binlog groups (MariaDB 10.5+, MySQL 5.7+):
//! * at `XA PREPARE`: a group of its own — MySQL: `XA START xid`, the rows, `XA END`, and an
//!   XA_PREPARE event; MariaDB: a GTID event flagged "prepared XA" that carries the xid, the
//!   rows, `XA END`, and an XA_PREPARE event — written before the transaction commits, and
//!   possibly never followed by a commit;
//! * at `XA COMMIT` or `XA ROLLBACK`, maybe much later and from another session: a second group
//!   holding only that statement, `XA COMMIT X'…',X'…',N`, with the same serialized xid.
//!
//! (MySQL's `XA COMMIT … ONE PHASE` is one group that ends in an XA_PREPARE event flagged
//! one-phase; MariaDB logs it as an ordinary transaction.)
//!
//! The decoder therefore holds a prepared group's rows back: it emits nothing for it and
//! remembers the xid and the group's place. The rows are published when the commit group
//! arrives, read again from the binlog at that place ([`super::decoder::Catalog::prepared_xa`])
//! and placed as rows of the *commit* group: they take effect there, so their versions come
//! after every change committed before it, as the module note of the decoder requires. A
//! rollback forgets the xid. Nothing is held in memory between the two groups but the xid
//! and a position, so a prepared transaction that stays open for days costs nothing.
//!
//! **Restarts.** What a decoder remembers is not stored: the commit group is the only one that
//! publishes, so a restart resumes at a boundary before it (if its rows were not committed to
//! Kafka yet) or after it (if they were), exactly as for any transaction. A decoder that meets
//! the commit of an xid it never saw prepared (the prepare lies before where this decoder
//! started) searches the binlog before its start for the prepared group, file by file
//! backwards ([`PreparedScan`]). If no binlog the server holds has it, whether it changed
//! captured tables cannot be known: that is a definite stop naming the fix (re-snapshot), never
//! a guess.
//!
//! The rows are re-read in the order the binlog holds them, so a commit group whose rows were
//! split across Kafka transactions (`source::decoder`, large transactions) resumes inside them
//! like any other transaction: the same rows come first on every read.

use mysql_common::binlog::events::{Event, EventData};

use super::SourceError;
use crate::offsets::BinlogPosition;

/// The largest prepared part that is read again at its commit (its rows events, in bytes).
pub const MAX_REPLAY_BYTES: u64 = 256 << 20;

const QUERY_EVENT: u8 = 2;
const XID_EVENT: u8 = 16;
const TABLE_MAP_EVENT: u8 = 19;
const MYSQL_GTID_EVENT: u8 = 33;
const MYSQL_ANONYMOUS_GTID_EVENT: u8 = 34;
pub(crate) const XA_PREPARE_LOG_EVENT: u8 = 38;
const PARTIAL_UPDATE_ROWS_EVENT: u8 = 39;
const TRANSACTION_PAYLOAD_EVENT: u8 = 40;
const MYSQL_GTID_TAGGED_EVENT: u8 = 42;
const MARIADB_GTID_EVENT: u8 = 162;

/// An XA statement as the server logs it (upper-cased), with its serialized xid.
#[derive(Debug, PartialEq, Eq)]
pub enum XaStatement<'a> {
    /// `XA START xid` (or `XA BEGIN`): a prepared group, or a one-phase one, begins.
    Start(&'a str),
    /// `XA COMMIT xid` of a prepared transaction (`ONE PHASE` inside a group).
    Commit(&'a str),
    /// `XA ROLLBACK xid`.
    Rollback(&'a str),
}

/// The XA statement `query` is (upper-cased, trimmed), if any.
pub fn statement(query: &str) -> Option<XaStatement<'_>> {
    let rest = query.strip_prefix("XA ")?.trim_start();
    let (verb, xid) = rest.split_once(char::is_whitespace)?;
    let xid = xid.trim();
    match verb {
        "START" | "BEGIN" => Some(XaStatement::Start(
            xid.strip_suffix(" JOIN")
                .or_else(|| xid.strip_suffix(" RESUME"))
                .unwrap_or(xid)
                .trim_end(),
        )),
        "COMMIT" => Some(XaStatement::Commit(
            xid.strip_suffix(" ONE PHASE").unwrap_or(xid).trim_end(),
        )),
        "ROLLBACK" => Some(XaStatement::Rollback(xid)),
        _ => None,
    }
}

/// MariaDB's GTID event flag of a prepared XA group (`FL_PREPARED_XA`), and of the flags before
/// the xid, the one that adds a commit id.
const FL_PREPARED_XA: u8 = 64;
const FL_GROUP_COMMIT_ID: u8 = 2;

/// The serialized xid of the prepared XA group a MariaDB GTID event opens, if it opens one:
/// `X'gtrid',X'bqual',formatID`, as the server writes it in `XA COMMIT` statements.
pub fn mariadb_prepared_xid(body: &[u8]) -> Option<String> {
    let flags2 = *body.get(12)?;
    if flags2 & FL_PREPARED_XA == 0 {
        return None;
    }
    let mut at = 13;
    if flags2 & FL_GROUP_COMMIT_ID != 0 {
        at += 8;
    }
    let format_id = i32::from_le_bytes(body.get(at..at + 4)?.try_into().ok()?);
    let gtrid_len = usize::from(*body.get(at + 4)?);
    let bqual_len = usize::from(*body.get(at + 5)?);
    let data = body.get(at + 6..at + 6 + gtrid_len + bqual_len)?;
    let (gtrid, bqual) = data.split_at(gtrid_len);
    Some(serialize_xid(format_id, gtrid, bqual))
}

/// An xid as both servers serialize it in the binlog's XA statements (upper-cased).
pub fn serialize_xid(format_id: i32, gtrid: &[u8], bqual: &[u8]) -> String {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02X}")).collect::<String>();
    format!("X'{}',X'{}',{format_id}", hex(gtrid), hex(bqual))
}

/// Whether an XA_PREPARE event ends a one-phase commit (MySQL's `XA COMMIT … ONE PHASE`) rather
/// than a prepare: the first byte of its body.
pub fn one_phase(event: &Event) -> bool {
    event.data().first() == Some(&1)
}

/// Finds the prepared group of one xid in a run of events read in binlog order: the last
/// complete one (an xid may be used again once its transaction ended).
pub struct PreparedScan {
    xid: String,
    open: Option<(Vec<Event>, u64)>,
    found: Option<Vec<Event>>,
}

impl PreparedScan {
    /// A scan for `xid` (serialized and upper-cased, as [`statement`] gives it).
    pub fn new(xid: &str) -> Self {
        PreparedScan {
            xid: xid.to_string(),
            open: None,
            found: None,
        }
    }

    /// Takes the next event; `at` is where it was read (for messages). True once a complete
    /// group is found (a later one may still replace it).
    pub fn feed(&mut self, event: &Event, at: &BinlogPosition) -> Result<bool, SourceError> {
        let etype = event.header().event_type_raw();
        match etype {
            QUERY_EVENT => {
                if let Ok(Some(EventData::QueryEvent(q))) = event.read_data() {
                    let query = q.query().trim().to_ascii_uppercase();
                    match statement(&query) {
                        Some(XaStatement::Start(xid)) => {
                            self.open = (xid == self.xid).then(|| (Vec::new(), 0));
                        }
                        // (A server that logs the whole XA transaction at its commit, in one
                        // group.)
                        Some(XaStatement::Commit(xid)) if xid == self.xid => {
                            if let Some((events, _)) = self.open.take() {
                                self.found = Some(events);
                                return Ok(true);
                            }
                        }
                        _ => {}
                    }
                }
            }
            TRANSACTION_PAYLOAD_EVENT => {
                let mut complete = false;
                super::decoder::each_in_payload(event, at, |inner| {
                    complete |= self.feed(inner, at)?;
                    Ok(())
                })?;
                return Ok(complete);
            }
            XA_PREPARE_LOG_EVENT => {
                if let Some((events, _)) = self.open.take() {
                    self.found = Some(events);
                    return Ok(true);
                }
            }
            MARIADB_GTID_EVENT => {
                self.open = mariadb_prepared_xid(event.data())
                    .filter(|xid| *xid == self.xid)
                    .map(|_| (Vec::new(), 0));
            }
            // Another transaction begins, or this one ended without a prepare.
            XID_EVENT | MYSQL_GTID_EVENT | MYSQL_ANONYMOUS_GTID_EVENT | MYSQL_GTID_TAGGED_EVENT => {
                self.open = None;
            }
            TABLE_MAP_EVENT | 23..=25 | 30..=32 | PARTIAL_UPDATE_ROWS_EVENT | 166..=171 => {
                if let Some((events, bytes)) = self.open.as_mut() {
                    *bytes += u64::from(event.header().event_size());
                    if *bytes > MAX_REPLAY_BYTES {
                        return Err(SourceError::Unsupported {
                            what: format!(
                                "XA transaction {} is larger than {} MiB, the most read again at its XA COMMIT",
                                self.xid,
                                MAX_REPLAY_BYTES >> 20
                            ),
                            fix: "commit large changes of captured tables in ordinary transactions; to step past this one, re-snapshot (snapshot_mode = \"always\" once)".into(),
                            position: at.clone(),
                        });
                    }
                    events.push(event.clone());
                }
            }
            _ => {}
        }
        Ok(false)
    }

    /// The last complete group found.
    pub fn finish(self) -> Option<Vec<Event>> {
        self.found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xa_statements_give_their_serialized_xid_and_other_statements_none() {
        assert_eq!(
            statement("XA START X'7831',X'',1"),
            Some(XaStatement::Start("X'7831',X'',1"))
        );
        assert_eq!(
            statement("XA COMMIT X'7831',X'',1"),
            Some(XaStatement::Commit("X'7831',X'',1"))
        );
        assert_eq!(
            statement("XA COMMIT X'7831',X'',1 ONE PHASE"),
            Some(XaStatement::Commit("X'7831',X'',1"))
        );
        assert_eq!(
            statement("XA ROLLBACK X'7832',X'01',3"),
            Some(XaStatement::Rollback("X'7832',X'01',3"))
        );
        assert_eq!(statement("XA END X'7831',X'',1"), None);
        assert_eq!(statement("COMMIT"), None);
        assert_eq!(statement("XACT"), None);
    }
}
