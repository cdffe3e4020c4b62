//! Resumable snapshots: which binlog changes a resumed snapshot still needs.
//!
//! A snapshot reads each table in primary-key order inside one consistent read at binlog
//! position `P`, and the stream then starts at `P`. If the process dies mid-table, that read
//! view is gone: the restart opens a new one at `P2` and reads on from the last key committed
//! with the events. Rows read before the crash reflect `P`, rows read after reflect `P2`. The
//! stored [`SnapshotSegment`]s record exactly that: every row up to a segment's boundary (table
//! index, last key) was read at the segment's position.
//!
//! The stream then starts at the *earliest* segment position and applies one rule per row:
//! **a binlog change to row `r` at position `x` is emitted iff `x` is after the position `r` was
//! read at.** Rows read at `P` get every change after `P`; rows read at `P2` skip the changes
//! between `P` and `P2`, whose effect their snapshot row already shows. Nothing is lost, nothing
//! is doubled, and no key moves backwards. Once the stream passes the last segment position the
//! rule admits everything and the window is dropped. For a snapshot that was never interrupted
//! there is one segment and the rule is a no-op.
//!
//! The rule compares binlog keys with the stored boundary keys, so a table is resumed mid-table
//! only when its key orders the same in Rust as in MySQL: integers, exact decimals, temporal
//! types and binary strings. A key with a text column (collations) is only checkpointed at the
//! end of the table, so an interruption re-reads that table from its start (in one Kafka
//! transaction, hence still without duplicates). On MariaDB such tables are not in the initial
//! snapshot at all: the online snapshot reads them after it (`source::online`).

use std::cmp::Ordering;
use std::collections::HashMap;

use crate::events::{ChangeEvent, Op, Value};
use crate::offsets::{BinlogPosition, SnapshotSegment};

/// Whether a primary key orders the same way in Rust ([`key_cmp`]) as in MySQL.
pub fn orderable(key: &[Value]) -> bool {
    !key.is_empty()
        && key.iter().all(|v| match v {
            Value::Boolean(_)
            | Value::Int(_)
            | Value::Long(_)
            | Value::Date(_)
            | Value::Micros(_)
            | Value::TimeMicros(_)
            | Value::Bytes(_) => true,
            Value::Decimal(d) => parse_decimal(d).is_some(),
            Value::Null | Value::Float(_) | Value::Double(_) | Value::String(_) => false,
        })
}

/// Whether every key column of `schema` holds values that are [`orderable`]: what decides,
/// before any row is read, whether the initial snapshot can checkpoint the table mid-way
/// (a text, ENUM, SET, JSON or floating-point key column cannot).
pub fn key_orderable(schema: &crate::events::TableSchema) -> bool {
    use crate::events::ColumnKind as K;
    !schema.key.is_empty()
        && schema.key.iter().all(|&i| {
            schema.columns.get(i).is_some_and(|c| {
                !matches!(
                    c.kind,
                    K::Float | K::Double | K::String(_) | K::Enum(_) | K::Set(_) | K::Json
                )
            })
        })
}

/// Compares two keys column by column as MySQL's row comparison does; `None` when a column
/// pair is not [`orderable`].
pub fn key_cmp(a: &[Value], b: &[Value]) -> Option<Ordering> {
    if a.len() != b.len() {
        return None;
    }
    for (x, y) in a.iter().zip(b) {
        let o = match (x, y) {
            (Value::Boolean(x), Value::Boolean(y)) => x.cmp(y),
            (Value::Int(x), Value::Int(y)) => x.cmp(y),
            (Value::Long(x), Value::Long(y))
            | (Value::Micros(x), Value::Micros(y))
            | (Value::TimeMicros(x), Value::TimeMicros(y)) => x.cmp(y),
            (Value::Date(x), Value::Date(y)) => x.cmp(y),
            (Value::Bytes(x), Value::Bytes(y)) => x.cmp(y),
            (Value::Decimal(x), Value::Decimal(y)) => decimal_cmp(x, y)?,
            _ => return None,
        };
        if o != Ordering::Equal {
            return Some(o);
        }
    }
    Some(Ordering::Equal)
}

/// `(negative, integer digits without leading zeros, fraction digits without trailing zeros)`.
fn parse_decimal(s: &str) -> Option<(bool, &str, &str)> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    // -0 and 0 are the same number.
    let neg = neg && !(int.is_empty() && frac.is_empty());
    Some((neg, int, frac))
}

fn decimal_cmp(a: &str, b: &str) -> Option<Ordering> {
    let (an, ai, af) = parse_decimal(a)?;
    let (bn, bi, bf) = parse_decimal(b)?;
    let magnitude = ai
        .len()
        .cmp(&bi.len())
        .then_with(|| ai.cmp(bi))
        .then_with(|| af.cmp(bf));
    Some(match (an, bn) {
        (false, false) => magnitude,
        (true, true) => magnitude.reverse(),
        (false, true) => Ordering::Greater,
        (true, false) => Ordering::Less,
    })
}

/// The filter the stream applies while it replays the stretch a resumed snapshot spanned.
#[derive(Debug, Clone)]
pub struct Window {
    segments: Vec<SnapshotSegment>,
    table_index: HashMap<String, usize>,
    until: BinlogPosition,
}

impl Window {
    /// The window of `segments` over `tables`; `None` when there is nothing to filter (one
    /// segment: every row was read at the position the stream starts from).
    pub fn new(segments: &[SnapshotSegment], tables: &[String]) -> Option<Window> {
        if segments.len() < 2 {
            return None;
        }
        let until = segments
            .iter()
            .map(|s| &s.at)
            .fold(None::<&BinlogPosition>, |max, at| match max {
                Some(m) if m.partial_cmp(at) != Some(Ordering::Less) => Some(m),
                _ => Some(at),
            })?
            .clone();
        Some(Window {
            segments: segments.to_vec(),
            table_index: tables
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i))
                .collect(),
            until,
        })
    }

    /// The segments, to store with each offset while the window is open.
    pub fn segments(&self) -> &[SnapshotSegment] {
        &self.segments
    }

    /// Whether `x` is past every segment position (the window can be dropped).
    pub fn passed(&self, x: &BinlogPosition) -> bool {
        // Positions of another binlog sequence do not compare: nothing left to filter then.
        x.partial_cmp(&self.until) != Some(Ordering::Less)
    }

    /// The position row (`table`, `key`) was read at, if the snapshot read it.
    fn read_at(&self, table: usize, key: &[Value]) -> Option<&BinlogPosition> {
        self.segments
            .iter()
            .find(|s| match table.cmp(&s.tables_done) {
                Ordering::Less => true,
                Ordering::Greater => false,
                Ordering::Equal => s
                    .last_key
                    .as_deref()
                    .and_then(|b| key_cmp(key, b))
                    .is_some_and(|o| o != Ordering::Greater),
            })
            .map(|s| &s.at)
    }

    /// Whether a change at `x` to row (`table`, `key`) is news to the snapshot.
    fn admits(&self, table: &str, key: &[Value], x: &BinlogPosition) -> bool {
        let Some(&t) = self.table_index.get(table) else {
            return true;
        };
        match self.read_at(t, key) {
            // Strictly after the read; another binlog sequence does not compare: admit.
            Some(at) => !matches!(x.partial_cmp(at), Some(Ordering::Less | Ordering::Equal)),
            None => true,
        }
    }

    /// Applies the rule to one change at `x`. A primary-key change is a delete of the old key
    /// and a create of the new one, so either half may be kept alone.
    pub fn filter(&self, mut ev: ChangeEvent, x: &BinlogPosition) -> Option<ChangeEvent> {
        let table = ev.schema.qualified_name();
        let keep_before = ev
            .before
            .as_deref()
            .map(|b| self.admits(&table, &ev.schema.key_of(b), x));
        let keep_after = ev
            .after
            .as_deref()
            .map(|a| self.admits(&table, &ev.schema.key_of(a), x));
        match (keep_before, keep_after) {
            (Some(false), Some(false)) | (Some(false), None) | (None, Some(false)) => None,
            (Some(true), Some(false)) => {
                ev.op = Op::Delete;
                ev.after = None;
                Some(ev)
            }
            (Some(false), Some(true)) => {
                ev.op = Op::Create;
                ev.before = None;
                Some(ev)
            }
            _ => Some(ev),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(s: &str) -> BinlogPosition {
        s.parse().expect("position")
    }

    fn seg(at: &str, tables_done: usize, last: Option<i64>) -> SnapshotSegment {
        SnapshotSegment {
            at: pos(at),
            tables_done,
            last_key: last.map(|k| vec![Value::Long(k)]),
        }
    }

    #[test]
    fn decimals_and_composite_keys_compare_like_mysql_and_text_does_not_compare() {
        assert_eq!(
            decimal_cmp("18446744073709551615", "9"),
            Some(Ordering::Greater)
        );
        assert_eq!(decimal_cmp("-2.5", "-10"), Some(Ordering::Greater));
        assert_eq!(decimal_cmp("1.50", "1.5"), Some(Ordering::Equal));
        assert_eq!(decimal_cmp("-0.0", "0"), Some(Ordering::Equal));
        assert_eq!(decimal_cmp("1e5", "1"), None);
        let a = [Value::Int(1), Value::Bytes(vec![2])];
        let b = [Value::Int(1), Value::Bytes(vec![2, 0])];
        assert_eq!(key_cmp(&a, &b), Some(Ordering::Less));
        assert!(orderable(&a));
        assert!(!orderable(&[Value::String("a".into())]));
        assert_eq!(
            key_cmp(&[Value::String("a".into())], &[Value::String("b".into())]),
            None
        );
    }

    #[test]
    fn rows_read_before_the_crash_get_every_change_and_rows_read_after_skip_the_gap() {
        let tables = vec!["d.a".to_string(), "d.b".to_string()];
        // Table a up to key 500 read at :100; the rest (a > 500, all of b) at :900.
        let w = Window::new(
            &[
                seg("bin.000001:100", 0, Some(500)),
                seg("bin.000001:900", 2, None),
            ],
            &tables,
        )
        .expect("two segments make a window");
        let between = pos("bin.000001:400");
        assert!(w.admits("d.a", &[Value::Long(500)], &between));
        assert!(!w.admits("d.a", &[Value::Long(501)], &between));
        assert!(!w.admits("d.b", &[Value::Long(1)], &between));
        assert!(w.admits("d.other", &[Value::Long(1)], &between));
        let after = pos("bin.000001:950");
        assert!(w.admits("d.a", &[Value::Long(501)], &after));
        assert!(!w.admits("d.a", &[Value::Long(501)], &pos("bin.000001:900")));
        assert!(!w.passed(&between) && w.passed(&after));
        assert!(w.passed(&pos("bin.000002:4")));
        assert!(Window::new(&[seg("bin.000001:100", 2, None)], &tables).is_none());
    }
}
