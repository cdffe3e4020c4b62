//! Typed source positions and the version strings derived from them.
//!
//! A [`BinlogPosition`] is `file:pos` where `pos` is the end of a committed transaction (XID or
//! COMMIT event) or of a standalone DDL: resuming there never splits a transaction, which the
//! replication protocol cannot resume from (no TABLE_MAP before the rows). Positions compare only
//! within one server's binlog sequence, so [`BinlogPosition`] is `PartialOrd`, not `Ord`: two
//! files with different base names do not compare.
//!
//! [`SourceOffset`] is what the source stores, as JSON, in its offsets topic *in the same Kafka
//! transaction* as the events it covers. It only ever moves forward.
//!
//! While a snapshot runs (and while the stream replays the binlog stretch it spans after a
//! resumed snapshot), the offset also carries [`SnapshotSegment`]s: which rows were read at
//! which consistent position (see `source::window`).
//!
//! [`version_of`] turns `(epoch, file, pos, row)` into a fixed-width string whose lexicographic
//! order is the source order: the sink stores it beside each copy and only overwrites older
//! versions.
//!
//! **Epochs.** Binlog positions order changes only within one server's binlog numbering. A
//! failover to a replica, a restore, `RESET MASTER` or a host rename restarts or replaces that
//! numbering, and new changes would get *lower* versions than the copies already hold: every
//! guarded write would match nothing, silently. So the stored position carries an **epoch**,
//! and the source increments it whenever continuity is broken and it snapshots anew (the stored
//! position is gone, lies beyond the end of its file, or was written by another server — see
//! [`SourceOffset::server_id`] — and at every `snapshot_mode = "always"` start). The epoch comes
//! first in the version, so everything read after the break sorts after everything before it,
//! and the new snapshot (the current state of every row) supersedes the old copies.
//!
//! A new epoch is the wall-clock second of the break, or the stored epoch + 1 if that is
//! larger ([`next_epoch`]): so a deployment started afresh (its offsets topic deleted or
//! renamed) also sorts after the copies an earlier one left. Epoch 0 — positions stored before
//! epochs existed — keeps the old format (`seq.pos.row`, digits only); epoch N ≥ 1 is
//! `eNNNNNNNNNN.seq.pos.row`, and `e` sorts after every digit, so no stored version needs
//! migrating: a deployment that never breaks continuity keeps writing the versions it wrote.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::events::Value;

/// A position in one server's binlog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinlogPosition {
    /// File name, e.g. `mariadb-bin.000004`.
    pub file: String,
    /// Byte offset inside the file.
    pub pos: u64,
}

/// Errors parsing positions.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OffsetError {
    /// Not `file:pos`.
    #[error("`{0}` is not a binlog position (expected `file:pos`)")]
    BadPosition(String),
    /// The stored offset JSON is not readable.
    #[error("stored source offset is unreadable: {0}")]
    BadOffset(String),
}

impl BinlogPosition {
    /// The numeric extension of the file (`mariadb-bin.000004` → 4).
    pub fn file_seq(&self) -> Option<u64> {
        self.file.rsplit_once('.').and_then(|(_, n)| n.parse().ok())
    }

    fn base(&self) -> &str {
        self.file
            .rsplit_once('.')
            .map_or(self.file.as_str(), |(b, _)| b)
    }
}

impl PartialOrd for BinlogPosition {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        if self.base() != other.base() {
            return None;
        }
        let a = (self.file_seq()?, self.pos);
        let b = (other.file_seq()?, other.pos);
        Some(a.cmp(&b))
    }
}

impl fmt::Display for BinlogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.pos)
    }
}

impl FromStr for BinlogPosition {
    type Err = OffsetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (file, pos) = s
            .rsplit_once(':')
            .ok_or_else(|| OffsetError::BadPosition(s.into()))?;
        let pos = pos
            .parse()
            .map_err(|_| OffsetError::BadPosition(s.into()))?;
        if file.is_empty() {
            return Err(OffsetError::BadPosition(s.into()));
        }
        Ok(BinlogPosition {
            file: file.into(),
            pos,
        })
    }
}

/// One stretch of a snapshot read at one consistent position: the rows after the previous
/// segment's boundary, up to and including this one's, were read at `at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotSegment {
    /// The consistent binlog position these rows were read at.
    pub at: BinlogPosition,
    /// Tables (in [`SourceOffset::tables`] order) read completely up to this boundary.
    pub tables_done: usize,
    /// Inside table number `tables_done`: the last primary key read (`None`: none of it).
    pub last_key: Option<Vec<Value>>,
}

/// What the source stores in its offsets topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceOffset {
    /// Resume position (a transaction boundary).
    pub position: BinlogPosition,
    /// GTID of the last transaction covered, if known (informational on MariaDB).
    pub gtid: Option<String>,
    /// The GTID state the position covers (`crate::gtid`: a MariaDB position or a MySQL set),
    /// when known: what finds this position again on another server after a failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtid_set: Option<String>,
    /// Whether the initial snapshot finished. A stored offset with `false` means a snapshot was
    /// interrupted: it is redone.
    pub snapshot_completed: bool,
    /// Tables covered by the snapshot, in the order they are read.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Continuity epoch (see the module note); 0 for positions stored before epochs existed.
    #[serde(default)]
    pub epoch: u64,
    /// `@@server_id` of the server that wrote `position`: a resume on a server with another id
    /// is not a resume (its byte offsets mean nothing here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<u32>,
    /// `@@server_uuid` of that server, where it has one (MySQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_uuid: Option<String>,
    /// Snapshot progress: while `snapshot_completed` is false, what has been read so far (a
    /// restart resumes after the last boundary); once completed, present only while the stream
    /// still replays the binlog stretch that a resumed snapshot spanned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshot_segments: Vec<SnapshotSegment>,
    /// Online snapshots of single tables still to finish, and the signals read
    /// (`source::online`): stored with the position, so a restart goes on where the stream and
    /// the snapshots stood together.
    #[serde(default, skip_serializing_if = "OnlineState::is_empty")]
    pub online: OnlineState,
    /// A resume point *inside* the source transaction that starts at `position`: that
    /// transaction was too large for one Kafka transaction and was split, and its first rows
    /// are in Kafka (`source::decoder` skips them at a resume). `None`: `position` is a plain
    /// boundary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<Within>,
}

/// How far into one source transaction a split stored it (see [`SourceOffset::within`]).
///
/// Rows are counted per table, in binlog order, and only those of captured tables: the count
/// does not depend on how the server grouped rows into events (a promoted replica may group
/// them otherwise), and a table added to the configuration since does not shift it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Within {
    /// The transaction's GTID, when known: a resume checks that the transaction it finds at
    /// `position` is this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtid: Option<String>,
    /// Rows of each captured table (`db.table`) of the transaction already in Kafka.
    pub rows: std::collections::BTreeMap<String, u64>,
    /// The row index the next change of the transaction is placed at (its version), so that a
    /// resumed transaction's versions go on increasing.
    pub next_row: u32,
}

impl Within {
    /// Rows of the transaction in Kafka, all tables together.
    pub fn total(&self) -> u64 {
        self.rows.values().sum()
    }
}

/// The online (streaming-while-reading) snapshots of a source: what is left of each, and where
/// its signals topic has been read to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OnlineState {
    /// Tables being snapshotted, in order; the first is the one being read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<OnlineTable>,
    /// The offset of the next signal to read (`ecst snapshot`), once any was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals_next: Option<i64>,
}

impl OnlineState {
    /// Nothing to store.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty() && self.signals_next.is_none()
    }
}

/// One table's online snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnlineTable {
    /// `db.table`.
    pub table: String,
    /// The last primary key whose chunk is in Kafka (`None`: none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_key: Option<Vec<Value>>,
    /// Rows published so far (progress reporting only).
    #[serde(default)]
    pub rows_done: u64,
}

impl SourceOffset {
    /// How far `self` is past `other` in the stream: by position, then (at one position) by
    /// how much of the split transaction after it is published. `None`: they do not compare.
    pub fn progress_cmp(&self, other: &SourceOffset) -> Option<Ordering> {
        let inside = |o: &SourceOffset| o.within.as_ref().map_or(0, Within::total);
        match self.position.partial_cmp(&other.position)? {
            Ordering::Equal => Some(inside(self).cmp(&inside(other))),
            o => Some(o),
        }
    }

    /// JSON bytes for the offsets topic.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses the offsets topic value.
    pub fn from_bytes(b: &[u8]) -> Result<Self, OffsetError> {
        serde_json::from_slice(b).map_err(|e| OffsetError::BadOffset(e.to_string()))
    }
}

/// The epoch of a new snapshot after `stored` (none: a fresh start): the current Unix second,
/// or one more than the stored epoch if the clock is behind it.
pub fn next_epoch(stored: Option<u64>, now_s: u64) -> u64 {
    stored
        .map_or(now_s, |e| now_s.max(e.saturating_add(1)))
        .max(1)
}

/// Fixed-width, lexicographically ordered version of a change: `file_seq.pos.row`, prefixed by
/// `eNNNNNNNNNN.` from epoch 1 on (see the module note).
pub fn version_of(epoch: u64, file: &str, pos: u64, row: u32) -> String {
    let seq = file
        .rsplit_once('.')
        .and_then(|(_, n)| n.parse::<u64>().ok())
        .unwrap_or(0);
    if epoch == 0 {
        format!("{seq:010}.{pos:015}.{row:09}")
    } else {
        format!("e{epoch:010}.{seq:010}.{pos:015}.{row:09}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_round_trips_through_text_and_orders_across_files() {
        let a: BinlogPosition = "mariadb-bin.000004:1234".parse().expect("parses");
        assert_eq!(a.to_string(), "mariadb-bin.000004:1234");
        let b: BinlogPosition = "mariadb-bin.000005:4".parse().expect("parses");
        assert!(a < b);
        let other: BinlogPosition = "mysql-bin.000009:4".parse().expect("parses");
        assert_eq!(
            a.partial_cmp(&other),
            None,
            "different servers do not compare"
        );
        assert!("nofile".parse::<BinlogPosition>().is_err());
    }

    #[test]
    fn versions_sort_like_binlog_order() {
        let v1 = version_of(0, "mariadb-bin.000009", 99_999, 3);
        let v2 = version_of(0, "mariadb-bin.000010", 4, 0);
        let v3 = version_of(0, "mariadb-bin.000010", 4, 1);
        assert!(v1 < v2 && v2 < v3, "{v1} {v2} {v3}");
        assert_eq!(
            v2, "0000000010.000000000000004.000000000",
            "epoch 0: the old format"
        );
    }

    #[test]
    fn after_a_continuity_break_every_version_sorts_after_every_version_before_it() {
        // Before: far into one server's numbering. After RESET MASTER (or on a promoted
        // replica) the numbering starts again, in epoch 1.
        let before = version_of(0, "mariadb-bin.000912", 987_654_321, 7);
        let after = version_of(1, "mariadb-bin.000001", 4, 0);
        assert!(after > before, "{after} > {before}");
        let later = version_of(2, "replica-bin.000001", 4, 0);
        assert!(later > version_of(1, "mariadb-bin.999999", u64::MAX / 2, 9));
        assert!(version_of(10, "f.000001", 4, 0) > version_of(9, "f.000001", 4, 0));
    }

    #[test]
    fn a_new_epoch_is_later_than_the_stored_one_even_when_the_clock_is_behind() {
        assert_eq!(next_epoch(None, 1_764_620_000), 1_764_620_000);
        assert_eq!(next_epoch(Some(0), 1_764_620_000), 1_764_620_000);
        assert_eq!(
            next_epoch(Some(1_764_620_000), 1_764_619_000),
            1_764_620_001
        );
        assert_eq!(
            next_epoch(None, 0),
            1,
            "never epoch 0, the pre-epoch format"
        );
    }

    #[test]
    fn offset_round_trips_through_json() {
        let o = SourceOffset {
            position: BinlogPosition {
                file: "f.000001".into(),
                pos: 42,
            },
            gtid: Some("0-1-5".into()),
            gtid_set: Some("0-1-5,3-2-9".into()),
            snapshot_completed: false,
            epoch: 2,
            server_id: Some(1),
            server_uuid: None,
            tables: vec!["test.users".into()],
            snapshot_segments: vec![SnapshotSegment {
                at: "f.000001:42".parse().expect("parses"),
                tables_done: 0,
                last_key: Some(vec![Value::Long(7), Value::Bytes(vec![1, 2])]),
            }],
            online: OnlineState {
                tables: vec![OnlineTable {
                    table: "test.product".into(),
                    last_key: Some(vec![Value::String("b".into())]),
                    rows_done: 3,
                }],
                signals_next: Some(2),
            },
            within: Some(Within {
                gtid: Some("0-1-6".into()),
                rows: [("test.users".to_string(), 20_000)].into_iter().collect(),
                next_row: 20_000,
            }),
        };
        assert_eq!(SourceOffset::from_bytes(&o.to_bytes()), Ok(o.clone()));
        // Offsets written before segments existed still read.
        let old =
            br#"{"position":{"file":"f.000001","pos":4},"gtid":null,"snapshot_completed":true}"#;
        let old = SourceOffset::from_bytes(old).expect("old offset parses");
        assert!(old.snapshot_segments.is_empty() && old.tables.is_empty());
        assert!(old.online.is_empty());
        assert!(
            !String::from_utf8_lossy(&old.to_bytes()).contains("online"),
            "an offset without online snapshots is written as before"
        );
        assert!(old.within.is_none());
        assert!(!String::from_utf8_lossy(&old.to_bytes()).contains("within"));
    }
}
