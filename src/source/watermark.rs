//! Watermarks: how an online snapshot places a chunk in the stream on a server that gives no
//! binlog position for a read view (MySQL), or wherever `source.watermark_table` is set.
//!
//! This is DBLog's method (Andreakis & Papapanagiotou, 2020), as in Debezium's incremental
//! snapshots. For each chunk, on a side connection in autocommit:
//!
//! 1. write the **low watermark** `L` (a row of `source.watermark_table`), and wait for its
//!    commit;
//! 2. read the chunk with one `SELECT` (its own read view, taken after `L` committed);
//! 3. write the **high watermark** `H`.
//!
//! The stream sees both writes. Between them it records the key of every row of the chunk's
//! table that any transaction changed ([`Watch`]); once the transaction of `H` has ended, the
//! chunk is handed over at that resume point *without* those keys.
//!
//! **Why that is exact**, given that the server commits transactions in their binlog order
//! (MySQL's `binlog_order_commits = ON`, its default, which preflight checks; MariaDB always
//! does, through `commit_ordered`):
//!
//! * a transaction before `L` in the binlog committed before `L` did, so before the chunk's read
//!   view was taken: the chunk's rows show it;
//! * a transaction the read view shows committed before the `SELECT` began, and it was written
//!   to the binlog before it committed, so it lies before `H`;
//! * so for a key no transaction between `L` and `H` changed, every change before `H` is in the
//!   chunk's row and every change after `H` is published after the chunk: the row sits exactly
//!   where the chunk is handed over, and its version (that resume point, row 0) sorts between
//!   them. A key that a transaction between `L` and `H` changed may or may not show that
//!   change in the chunk, so the chunk drops it: the stream published that change (a full row
//!   image) and publishes every later one.
//!
//! Keys are compared for equality only (never ordered in Rust), so any key pages, text in any
//! collation included: the chunk pages by the server's own `ORDER BY`.
//!
//! **A watermark the stream never shows** (binlog filters such as `binlog_ignore_db` on the
//! table's database) would hold the chunk for ever: once the stream has read, with nothing
//! open, past the binlog's end as it stood after `H` was written, and `H` was not among what it
//! read, the source stops with [`SourceError::WatermarkUnseen`] naming the causes.
//!
//! Writes: two one-row autocommit writes per chunk, to the one row of this source (its name is
//! the key). The table is created when missing, with the statement of [`create_statement`].

use std::collections::HashSet;

use mysql_async::prelude::Queryable;

use super::SourceError;
use super::decode::RowImages;
use crate::events::{TableSchema, Value};

/// The watermark table's shape.
pub fn create_statement(table: &str) -> String {
    let (db, name) = table.split_once('.').unwrap_or(("", table));
    format!(
        "CREATE TABLE IF NOT EXISTS {}.{} (source VARCHAR(255) NOT NULL PRIMARY KEY, seq BIGINT NOT NULL) ENGINE=InnoDB",
        quote(db),
        quote(name)
    )
}

fn quote(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// Writes watermark `seq` of `source` (autocommit: it has committed when this returns),
/// creating the table first if it is missing.
pub async fn write(
    conn: &mut mysql_async::Conn,
    table: &str,
    source: &str,
    seq: u64,
) -> Result<(), SourceError> {
    let (db, name) = table.split_once('.').unwrap_or(("", table));
    let stmt = format!(
        "INSERT INTO {}.{} (source, seq) VALUES (?, ?) ON DUPLICATE KEY UPDATE seq = VALUES(seq)",
        quote(db),
        quote(name)
    );
    let first = conn.exec_drop(stmt.as_str(), (source, seq)).await;
    let again = match first {
        Ok(()) => return Ok(()),
        // 1146: no such table. Created, then written once more.
        Err(mysql_async::Error::Server(e)) if e.code == 1146 => {
            conn.query_drop(create_statement(table))
                .await
                .map_err(|e| refused(table, e))?;
            tracing::info!(table, "watermark table created");
            conn.exec_drop(stmt.as_str(), (source, seq)).await
        }
        Err(e) => Err(e),
    };
    match again {
        Ok(()) => Ok(()),
        Err(mysql_async::Error::Server(e)) => Err(refused(table, mysql_async::Error::Server(e))),
        Err(e) => Err(e.into()),
    }
}

/// A write or the creation refused by the server (a missing privilege, a read-only server).
fn refused(table: &str, e: mysql_async::Error) -> SourceError {
    SourceError::WatermarkWrite {
        table: table.to_string(),
        detail: e.to_string(),
        create: create_statement(table),
    }
}

/// Whether the server commits transactions in their binlog order, which placing chunks by
/// watermarks relies on (module note): MySQL's `binlog_order_commits` must be `ON` (its
/// default); MariaDB has no such variable and always does.
pub async fn commits_in_binlog_order(conn: &mut mysql_async::Conn) -> Result<bool, SourceError> {
    match conn
        .query_first::<String, _>("SELECT CAST(@@GLOBAL.binlog_order_commits AS CHAR)")
        .await
    {
        Ok(v) => Ok(v.is_none_or(|v| v == "1" || v.eq_ignore_ascii_case("ON"))),
        // 1193: unknown system variable (MariaDB).
        Err(mysql_async::Error::Server(e)) if e.code == 1193 => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// What the stream watches for: the watermark rows of this source, and between the low and the
/// high one, the keys of the chunk's table that changed (see the module note).
#[derive(Debug)]
pub struct Watch {
    /// `db.table` of the watermark table.
    table: String,
    /// This source's row in it.
    source: String,
    window: Option<Window>,
}

/// The window of one chunk.
#[derive(Debug)]
struct Window {
    /// The chunk's table, `db.table`.
    table: String,
    low: u64,
    high: u64,
    state: State,
    /// Keys of `table` changed between the watermarks (their `Debug` text: compared for
    /// equality only).
    changed: HashSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The low watermark is not read yet.
    Before,
    /// Between the watermarks: keys are recorded.
    Open,
    /// The high watermark is read; its transaction has not ended.
    High,
    /// The transaction of the high watermark has ended.
    Passed,
}

impl Watch {
    /// Watches `table` (`db.table`) for the rows of `source`.
    pub fn new(table: String, source: String) -> Self {
        Watch {
            table,
            source,
            window: None,
        }
    }

    /// Whether `qualified` (`db.table`) is the watermark table.
    pub fn is_table(&self, qualified: &str) -> bool {
        self.table == qualified
    }

    /// Starts watching for the watermarks `low` and `high` of a chunk of `table`.
    pub fn open(&mut self, table: String, low: u64, high: u64) {
        self.window = Some(Window {
            table,
            low,
            high,
            state: State::Before,
            changed: HashSet::new(),
        });
    }

    /// Rows written to the watermark table (after images, in the table's column order).
    pub fn on_watermark_rows(&mut self, schema: &TableSchema, after: &[Vec<Value>]) {
        let Some(w) = self.window.as_mut() else {
            return;
        };
        let col = |name: &str| schema.columns.iter().position(|c| c.name == name);
        let (Some(source_at), Some(seq_at)) = (col("source"), col("seq")) else {
            return;
        };
        for row in after {
            let ours = matches!(row.get(source_at), Some(Value::String(s)) if *s == self.source);
            let seq = match row.get(seq_at) {
                Some(Value::Long(n)) => u64::try_from(*n).ok(),
                Some(Value::Int(n)) => u64::try_from(*n).ok(),
                _ => None,
            };
            match (ours, seq) {
                (true, Some(s)) if s == w.low && w.state == State::Before => w.state = State::Open,
                (true, Some(s)) if s == w.high && w.state == State::Open => w.state = State::High,
                _ => {}
            }
        }
    }

    /// Rows of a captured table: between the watermarks, the chunk's table's keys are recorded
    /// (both images: an update may change the key).
    pub fn on_rows(&mut self, schema: &TableSchema, rows: &[RowImages]) {
        let Some(w) = self.window.as_mut() else {
            return;
        };
        if w.state != State::Open || schema.qualified_name() != w.table {
            return;
        }
        for (before, after) in rows {
            for image in [before, after].into_iter().flatten() {
                w.changed.insert(key_text(&schema.key_of(image)));
            }
        }
    }

    /// A transaction ended: the high watermark's, if it was read in it.
    pub fn on_transaction_end(&mut self) {
        if let Some(w) = self.window.as_mut()
            && w.state == State::High
        {
            w.state = State::Passed;
        }
    }

    /// Whether the window's high watermark is read and its transaction ended.
    pub fn passed(&self) -> bool {
        self.window
            .as_ref()
            .is_some_and(|w| w.state == State::Passed)
    }

    /// Ends the window: the keys changed in it.
    pub fn close(&mut self) -> HashSet<String> {
        self.window.take().map(|w| w.changed).unwrap_or_default()
    }
}

/// A key's text for equality ([`Watch`] and the chunk compare keys through it).
pub fn key_text(key: &[Value]) -> String {
    format!("{key:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Charset, Column, ColumnKind};

    fn schema(db: &str, table: &str, cols: &[(&str, ColumnKind)], key: Vec<usize>) -> TableSchema {
        TableSchema {
            db: db.into(),
            table: table.into(),
            columns: cols
                .iter()
                .map(|(n, k)| Column {
                    name: (*n).into(),
                    kind: k.clone(),
                    nullable: false,
                    default: None,
                })
                .collect(),
            key,
        }
    }

    #[test]
    fn only_keys_changed_between_this_sources_low_and_high_watermarks_are_dropped_and_the_window_passes_at_the_high_ones_transaction_end()
     {
        let wm = schema(
            "ops",
            "ecst_watermarks",
            &[
                ("source", ColumnKind::String(Charset::Utf8)),
                ("seq", ColumnKind::Long),
            ],
            vec![0],
        );
        let users = schema(
            "shop",
            "users",
            &[
                ("id", ColumnKind::String(Charset::Utf8)),
                ("n", ColumnKind::Int),
            ],
            vec![0],
        );
        let other = schema(
            "shop",
            "orders",
            &[("id", ColumnKind::String(Charset::Utf8))],
            vec![0],
        );
        let row = |k: &str| vec![Value::String(k.into()), Value::Int(1)];
        let mark = |src: &str, seq: i64| vec![Value::String(src.into()), Value::Long(seq)];
        let mut w = Watch::new("ops.ecst_watermarks".into(), "me".into());
        assert!(w.is_table("ops.ecst_watermarks") && !w.is_table("shop.users"));
        w.open("shop.users".into(), 10, 11);
        // Before the low watermark: not recorded.
        w.on_rows(&users, &[(None, Some(row("before")))]);
        // Another source's watermark with the same numbers opens nothing.
        w.on_watermark_rows(&wm, &[mark("other", 10)]);
        w.on_rows(&users, &[(None, Some(row("still-before")))]);
        w.on_watermark_rows(&wm, &[mark("me", 10)]);
        w.on_rows(&users, &[(Some(row("old-key")), Some(row("new-key")))]);
        w.on_rows(
            &other,
            &[(None, Some(vec![Value::String("elsewhere".into())]))],
        );
        w.on_transaction_end();
        assert!(
            !w.passed(),
            "the low watermark's transaction passes nothing"
        );
        w.on_watermark_rows(&wm, &[mark("me", 11)]);
        w.on_rows(&users, &[(None, Some(row("after")))]);
        assert!(
            !w.passed(),
            "not before the high watermark's transaction ends"
        );
        w.on_transaction_end();
        assert!(w.passed());
        let changed = w.close();
        let expected: HashSet<String> = ["old-key", "new-key"]
            .iter()
            .map(|k| key_text(&[Value::String((*k).into())]))
            .collect();
        assert_eq!(changed, expected);
        assert!(!w.passed(), "closed");
    }
}
