//! Change events: the pure data that flows from the source to Kafka and from Kafka to the sink.
//!
//! A [`TableSchema`] describes a table the way both capture paths see it: the snapshot derives it
//! from `information_schema`, the binlog path from the TABLE_MAP event (with
//! `binlog_row_metadata=FULL`). Both must yield the *same* schema for the same table, so that the
//! Avro schema registered for a topic does not flip between them (a test proves it per type).
//! Deriving the binlog schema from the TABLE_MAP event means there is no DDL parser and no schema
//! history topic: each rows event carries the shape it was written with.

pub mod avro;
pub mod registry;

use std::fmt;
use std::sync::Arc;

/// Character set of a textual column, as far as decoding needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Charset {
    /// utf8mb3 / utf8mb4 (and anything we do not special-case, decoded as UTF-8 lossily).
    Utf8,
    /// MySQL `latin1`, which is really Windows-1252.
    Latin1,
    /// `ascii` (decoded as latin1, a superset).
    Ascii,
    /// `utf16` (big-endian) and `ucs2` (its BMP subset).
    Utf16Be,
    /// `utf16le`.
    Utf16Le,
    /// `utf32` (big-endian).
    Utf32,
    /// A legacy charset (`latin2`, `cp1251`, `gbk`, `sjis`, `big5`, …), by the WHATWG label of
    /// its decoder (`source::charset`).
    Legacy(&'static str),
}

/// The logical type of a column: what it becomes in Avro and in BSON.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ColumnKind {
    /// BIT(1) → Avro boolean.
    Boolean,
    /// TINYINT/SMALLINT/MEDIUMINT (signed or not), INT signed, YEAR → Avro int.
    Int,
    /// INT UNSIGNED, BIGINT signed → Avro long.
    Long,
    /// BIGINT UNSIGNED → Avro decimal(20,0), so values above i64::MAX never wrap.
    UnsignedLong,
    /// FLOAT → Avro float.
    Float,
    /// DOUBLE → Avro double.
    Double,
    /// DECIMAL(p,s) → Avro bytes, logical type decimal(p,s).
    Decimal {
        /// Total digits.
        precision: u32,
        /// Digits after the point.
        scale: u32,
    },
    /// DATE → Avro int, logical type date (days since epoch).
    Date,
    /// DATETIME(n) → Avro long, logical type local-timestamp-micros (no time zone in MySQL).
    DateTime,
    /// TIMESTAMP(n) → Avro long, logical type timestamp-micros (UTC).
    Timestamp,
    /// TIME(n) → Avro long of signed microseconds (TIME may be negative or exceed 24 h, so
    /// the Avro `time-micros` logical type would be wrong); named like Debezium's MicroTime.
    Time,
    /// YEAR → Avro int.
    Year,
    /// CHAR/VARCHAR/TEXT → Avro string, decoded from the column charset.
    String(Charset),
    /// BINARY/VARBINARY/BLOB/GEOMETRY → Avro bytes.
    Bytes,
    /// ENUM → Avro string holding the label.
    Enum(Vec<String>),
    /// SET → Avro string holding the comma-joined labels (as Debezium does).
    Set(Vec<String>),
    /// BIT(n>1) → Avro bytes, big-endian as MySQL stores it.
    Bits(u32),
    /// JSON (MySQL) → Avro string holding the JSON text. MariaDB's JSON is LONGTEXT: a String.
    Json,
}

/// One column of a captured table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Column {
    /// Column name as in the database.
    pub name: String,
    /// Logical type.
    pub kind: ColumnKind,
    /// Whether the column accepts NULL.
    pub nullable: bool,
    /// The Avro default of a NOT NULL column, as JSON text, when its MySQL default is a constant
    /// Avro can hold (`information_schema.COLUMNS.COLUMN_DEFAULT`): it lets a registry under
    /// BACKWARD compatibility accept `ADD COLUMN … NOT NULL DEFAULT …`.
    pub default: Option<String>,
}

/// A captured table: its identity, columns in table order and primary key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableSchema {
    /// Database (schema) name.
    pub db: String,
    /// Table name.
    pub table: String,
    /// Columns in ordinal order.
    pub columns: Vec<Column>,
    /// Indexes into `columns` of the primary-key columns, in key order. Empty: no key.
    pub key: Vec<usize>,
}

impl TableSchema {
    /// `db.table`, the name used in configuration and logs.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.db, self.table)
    }

    /// The key values of a row image, in key order.
    pub fn key_of(&self, row: &[Value]) -> Vec<Value> {
        self.key
            .iter()
            .map(|&i| row.get(i).cloned().unwrap_or(Value::Null))
            .collect()
    }
}

/// A decoded column value. Integers are already widened to their Avro type. Serializable
/// because snapshot progress stores the last key read in the offsets topic.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// BIT(1).
    Boolean(bool),
    /// Avro int.
    Int(i32),
    /// Avro long.
    Long(i64),
    /// Exact decimal as its canonical text (`-1234.5678`), scale as the column's.
    Decimal(String),
    /// FLOAT.
    Float(f32),
    /// DOUBLE.
    Double(f64),
    /// Days since 1970-01-01.
    Date(i32),
    /// Microseconds since 1970-01-01T00:00:00 (UTC for TIMESTAMP, wall clock for DATETIME).
    Micros(i64),
    /// Signed microseconds of a TIME value.
    TimeMicros(i64),
    /// Text (CHAR/VARCHAR/TEXT/ENUM/SET/JSON).
    String(String),
    /// Raw bytes (BINARY/BLOB/BIT).
    Bytes(Vec<u8>),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Boolean(b) => write!(f, "{b}"),
            Value::Int(v) => write!(f, "{v}"),
            Value::Long(v) | Value::Micros(v) | Value::TimeMicros(v) => write!(f, "{v}"),
            Value::Decimal(s) | Value::String(s) => f.write_str(s),
            Value::Float(v) => write!(f, "{v}"),
            Value::Double(v) => write!(f, "{v}"),
            Value::Date(v) => write!(f, "{v}"),
            Value::Bytes(b) => {
                for x in b {
                    write!(f, "{x:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Debezium's operation codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Snapshot read.
    Read,
    /// Insert.
    Create,
    /// Update.
    Update,
    /// Delete.
    Delete,
    /// TRUNCATE of the table (no row: null key, no before, no after), as Debezium's `t`.
    Truncate,
}

impl Op {
    /// The one-letter code of the envelope's `op` field.
    pub fn code(self) -> &'static str {
        match self {
            Op::Read => "r",
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
        }
    }

    /// Parses the envelope's `op` field.
    pub fn from_code(s: &str) -> Option<Op> {
        match s {
            "r" => Some(Op::Read),
            "c" => Some(Op::Create),
            "u" => Some(Op::Update),
            "d" => Some(Op::Delete),
            "t" => Some(Op::Truncate),
            _ => None,
        }
    }
}

/// Where an event came from: the envelope's `source` block.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SourceInfo {
    /// Commit time of the transaction in the source (ms since epoch); snapshot: read time.
    pub ts_ms: i64,
    /// `"true"`, `"last"` or `"false"` as Debezium writes it.
    pub snapshot: &'static str,
    /// Server id of the writing server (0 during the snapshot).
    pub server_id: u32,
    /// GTID of the transaction, if known (`0-1-42` on MariaDB).
    pub gtid: Option<Arc<str>>,
    /// Binlog file name.
    pub file: Arc<str>,
    /// Binlog position: the start of the change's transaction (the end of its GTID or BEGIN
    /// event); snapshot: the consistent position.
    pub pos: u64,
    /// Row index inside the transaction.
    pub row: u32,
    /// Continuity epoch of the source position (`offsets`); carried in the `ecst.epoch` header.
    pub epoch: u64,
    /// When ecst read the change (ms since epoch): carried in a header, not in the envelope.
    pub read_ts_ms: i64,
}

/// One row change, ready to be encoded.
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    /// The shape the row was written with.
    pub schema: Arc<TableSchema>,
    /// What happened.
    pub op: Op,
    /// The row before the change (updates and deletes).
    pub before: Option<Vec<Value>>,
    /// The row after the change (reads, creates and updates).
    pub after: Option<Vec<Value>>,
    /// Position and timing in the source.
    pub source: SourceInfo,
}

impl ChangeEvent {
    /// The primary-key values of this change (from `after`, else `before`).
    pub fn key(&self) -> Vec<Value> {
        match (&self.after, &self.before) {
            (Some(row), _) | (None, Some(row)) => self.schema.key_of(row),
            (None, None) => Vec::new(),
        }
    }
}

/// Kafka header carrying the source commit time (ms) so the sink can measure end-to-end latency.
pub const HEADER_SOURCE_TS: &str = "ecst.source.ts_ms";
/// Header carrying the time ecst read the change (ms), for pipeline latency at ms precision
/// (MariaDB logs commit times in whole seconds only).
pub const HEADER_READ_TS: &str = "ecst.read.ts_ms";
/// Header on the delete half of a primary-key change: the new key as JSON (as Debezium does).
pub const HEADER_NEW_KEY: &str = "__debezium.newkey";
/// Header: the continuity epoch of the change's version (absent: 0; see `offsets`).
pub const HEADER_EPOCH: &str = "ecst.epoch";
/// Header on the create half of a primary-key change: the old key as JSON.
pub const HEADER_OLD_KEY: &str = "__debezium.oldkey";

/// Renders key values as a JSON object `{"col": value}` for the key-change headers.
pub fn key_json(schema: &TableSchema, key: &[Value]) -> String {
    let mut map = serde_json::Map::new();
    for (&i, v) in schema.key.iter().zip(key) {
        let name = schema
            .columns
            .get(i)
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let jv = match v {
            Value::Null => serde_json::Value::Null,
            Value::Boolean(b) => serde_json::Value::Bool(*b),
            Value::Int(x) => serde_json::Value::from(*x),
            Value::Long(x) | Value::Micros(x) | Value::TimeMicros(x) => serde_json::Value::from(*x),
            Value::Date(x) => serde_json::Value::from(*x),
            Value::Float(x) => serde_json::Value::from(f64::from(*x)),
            Value::Double(x) => serde_json::Value::from(*x),
            other => serde_json::Value::String(other.to_string()),
        };
        map.insert(name, jv);
    }
    serde_json::Value::Object(map).to_string()
}
