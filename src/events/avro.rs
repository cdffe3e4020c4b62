//! Avro schemas derived from a [`TableSchema`], and a direct binary encoder.
//!
//! Design: the schema JSON is generated once per table shape, parsed once by `apache-avro` (which
//! validates it and is used by readers), and registered once per subject. Encoding does not build
//! an `apache_avro::types::Value` tree per row: the shapes are fixed (Debezium-style envelope over
//! the table's columns), so [`encode_key`] and [`encode_envelope`] write the Avro binary encoding
//! straight from our [`Value`]s. Round-trip tests decode the output with `apache-avro` against the
//! generated schema, so the two can never disagree silently.
//!
//! Errors are returned, never panicked: a value that does not fit its column kind (which would
//! mean a decoder bug) is an [`AvroError::ValueMismatch`] naming the column.

use num_bigint::BigInt;
use serde_json::{Value as Json, json};

use super::{ChangeEvent, Column, ColumnKind, SourceInfo, TableSchema, Value};
use crate::error::{Classify, ErrorClass};

/// Name written in `source.connector`.
pub const CONNECTOR_NAME: &str = "ecst";
/// Version written in `source.version`.
pub const CONNECTOR_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Errors of schema derivation and encoding.
#[derive(Debug, thiserror::Error)]
pub enum AvroError {
    /// A value does not fit the column's kind (a decoder bug, never expected in practice).
    #[error("column `{column}`: value {value:?} does not fit Avro type {kind:?}")]
    ValueMismatch {
        /// Column name.
        column: String,
        /// The value's debug text.
        value: String,
        /// The column kind.
        kind: ColumnKind,
    },
    /// A decimal text that is not a number.
    #[error("column `{column}`: `{text}` is not a decimal number")]
    BadDecimal {
        /// Column name.
        column: String,
        /// The text.
        text: String,
    },
    /// Two columns whose names become the same Avro field name (Avro names allow only ASCII
    /// letters, digits and `_`).
    #[error(
        "table `{table}`: columns `{first}` and `{second}` both become the Avro field `{field}`; rename one of them (Avro names allow only ASCII letters, digits and `_`)"
    )]
    NameCollision {
        /// Table.
        table: String,
        /// The first column.
        first: String,
        /// The second column.
        second: String,
        /// The shared field name.
        field: String,
    },
    /// The generated schema does not parse (a bug in this module).
    #[error("generated Avro schema is invalid: {0}")]
    Schema(#[from] apache_avro::Error),
}

impl Classify for AvroError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Definite
    }
}

/// Replaces characters Avro does not allow in names with `_` (and a leading digit).
pub fn sanitize_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// The Avro namespace of a table's records: `<prefix>.<db>.<table>`, each part sanitized.
pub fn namespace(prefix: &str, schema: &TableSchema) -> String {
    [prefix, &schema.db, &schema.table]
        .iter()
        .flat_map(|p| p.split('.'))
        .map(sanitize_name)
        .collect::<Vec<_>>()
        .join(".")
}

fn column_type(kind: &ColumnKind) -> Json {
    match kind {
        ColumnKind::Boolean => json!("boolean"),
        ColumnKind::Int | ColumnKind::Year => json!("int"),
        ColumnKind::Long => json!("long"),
        ColumnKind::UnsignedLong => {
            json!({"type": "bytes", "logicalType": "decimal", "precision": 20, "scale": 0})
        }
        ColumnKind::Float => json!("float"),
        ColumnKind::Double => json!("double"),
        ColumnKind::Decimal { precision, scale } => {
            json!({"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale})
        }
        ColumnKind::Date => json!({"type": "int", "logicalType": "date"}),
        ColumnKind::DateTime => json!({"type": "long", "logicalType": "local-timestamp-micros"}),
        ColumnKind::Timestamp => json!({"type": "long", "logicalType": "timestamp-micros"}),
        ColumnKind::Time => json!({"type": "long", "connect.name": "io.debezium.time.MicroTime"}),
        ColumnKind::String(_) | ColumnKind::Enum(_) | ColumnKind::Set(_) => json!("string"),
        ColumnKind::Json => json!({"type": "string", "connect.name": "io.debezium.data.Json"}),
        ColumnKind::Bytes | ColumnKind::Bits(_) => json!("bytes"),
    }
}

fn field(col: &Column, force_required: bool) -> Json {
    let t = column_type(&col.kind);
    if col.nullable && !force_required {
        return json!({"name": sanitize_name(&col.name), "type": ["null", t], "default": null});
    }
    let default = col
        .default
        .as_deref()
        .filter(|_| !force_required)
        .and_then(|d| serde_json::from_str::<Json>(d).ok());
    match default {
        Some(d) => json!({"name": sanitize_name(&col.name), "type": t, "default": d}),
        None => json!({"name": sanitize_name(&col.name), "type": t}),
    }
}

/// The key schema: a record of the primary-key columns (never null).
pub fn key_schema(prefix: &str, schema: &TableSchema) -> Json {
    let fields: Vec<Json> = schema
        .key
        .iter()
        .filter_map(|&i| schema.columns.get(i))
        .map(|c| field(c, true))
        .collect();
    json!({"type": "record", "name": "Key", "namespace": namespace(prefix, schema), "fields": fields})
}

/// The value schema: a Debezium-compatible envelope around a `Value` record of all columns.
pub fn value_schema(prefix: &str, schema: &TableSchema) -> Json {
    let ns = namespace(prefix, schema);
    let fields: Vec<Json> = schema.columns.iter().map(|c| field(c, false)).collect();
    let row = json!({"type": "record", "name": "Value", "namespace": ns, "fields": fields});
    let source = json!({
        "type": "record", "name": "Source", "namespace": "io.ecst.connector.mysql",
        "fields": [
            {"name": "version", "type": "string"},
            {"name": "connector", "type": "string"},
            {"name": "name", "type": "string"},
            {"name": "ts_ms", "type": "long"},
            {"name": "snapshot", "type": ["string", "null"], "default": "false"},
            {"name": "db", "type": "string"},
            {"name": "table", "type": ["null", "string"], "default": null},
            {"name": "server_id", "type": "long"},
            {"name": "gtid", "type": ["null", "string"], "default": null},
            {"name": "file", "type": "string"},
            {"name": "pos", "type": "long"},
            {"name": "row", "type": "int"}
        ]
    });
    json!({
        "type": "record", "name": "Envelope", "namespace": ns,
        "fields": [
            {"name": "before", "type": ["null", row], "default": null},
            {"name": "after", "type": ["null", format!("{ns}.Value")], "default": null},
            {"name": "source", "type": source},
            {"name": "op", "type": "string"},
            {"name": "ts_ms", "type": ["null", "long"], "default": null}
        ]
    })
}

/// The pair of schemas of one table shape, parsed once.
#[derive(Debug, Clone)]
pub struct TableAvro {
    /// Key schema JSON (registered under `<topic>-key`).
    pub key_json: String,
    /// Value schema JSON (registered under `<topic>-value`).
    pub value_json: String,
    /// Parsed key schema (validates the JSON; used by readers and tests).
    pub key: apache_avro::Schema,
    /// Parsed value schema.
    pub value: apache_avro::Schema,
}

impl TableAvro {
    /// Derives and parses both schemas of a table shape.
    pub fn derive(prefix: &str, schema: &TableSchema) -> Result<Self, AvroError> {
        let mut seen: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
        for c in &schema.columns {
            if let Some(first) = seen.insert(sanitize_name(&c.name), &c.name) {
                return Err(AvroError::NameCollision {
                    table: schema.qualified_name(),
                    first: first.to_string(),
                    second: c.name.clone(),
                    field: sanitize_name(&c.name),
                });
            }
        }
        let key_json = key_schema(prefix, schema).to_string();
        let value_json = value_schema(prefix, schema).to_string();
        Ok(TableAvro {
            key: apache_avro::Schema::parse_str(&key_json)?,
            value: apache_avro::Schema::parse_str(&value_json)?,
            key_json,
            value_json,
        })
    }
}

// ---- binary encoding ----------------------------------------------------------------------

fn put_long(buf: &mut Vec<u8>, v: i64) {
    let mut n = ((v << 1) ^ (v >> 63)) as u64;
    while n >= 0x80 {
        buf.push((n as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

fn put_bytes(buf: &mut Vec<u8>, b: &[u8]) {
    put_long(buf, b.len() as i64);
    buf.extend_from_slice(b);
}

/// The unscaled two's-complement big-endian bytes of a decimal text at `scale`.
pub fn decimal_bytes(text: &str, scale: u32) -> Option<Vec<u8>> {
    let t = text.trim();
    let (neg, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (int_part, frac_part) = t.split_once('.').unwrap_or((t, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    if !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let scale = scale as usize;
    let mut digits = String::with_capacity(int_part.len() + scale);
    digits.push_str(int_part);
    if frac_part.len() >= scale {
        // MySQL always renders exactly `scale` digits; extra digits would be a rounding bug.
        if frac_part[scale..].bytes().any(|b| b != b'0') {
            return None;
        }
        digits.push_str(&frac_part[..scale]);
    } else {
        digits.push_str(frac_part);
        digits.extend(std::iter::repeat_n('0', scale - frac_part.len()));
    }
    if digits.is_empty() {
        digits.push('0');
    }
    let mut n = BigInt::parse_bytes(digits.as_bytes(), 10)?;
    if neg {
        n = -n;
    }
    Some(n.to_signed_bytes_be())
}

/// Encodes one non-null column value per its kind.
fn put_value(buf: &mut Vec<u8>, col: &Column, v: &Value) -> Result<(), AvroError> {
    let mismatch = || AvroError::ValueMismatch {
        column: col.name.clone(),
        value: format!("{v:?}"),
        kind: col.kind.clone(),
    };
    match (&col.kind, v) {
        (ColumnKind::Boolean, Value::Boolean(b)) => buf.push(u8::from(*b)),
        (ColumnKind::Int | ColumnKind::Year, Value::Int(x)) => put_long(buf, i64::from(*x)),
        (ColumnKind::Long, Value::Long(x)) => put_long(buf, *x),
        (ColumnKind::UnsignedLong, Value::Decimal(t)) => {
            let b = decimal_bytes(t, 0).ok_or_else(|| AvroError::BadDecimal {
                column: col.name.clone(),
                text: t.clone(),
            })?;
            put_bytes(buf, &b);
        }
        (ColumnKind::Decimal { scale, .. }, Value::Decimal(t)) => {
            let b = decimal_bytes(t, *scale).ok_or_else(|| AvroError::BadDecimal {
                column: col.name.clone(),
                text: t.clone(),
            })?;
            put_bytes(buf, &b);
        }
        (ColumnKind::Float, Value::Float(x)) => buf.extend_from_slice(&x.to_le_bytes()),
        (ColumnKind::Double, Value::Double(x)) => buf.extend_from_slice(&x.to_le_bytes()),
        (ColumnKind::Date, Value::Date(d)) => put_long(buf, i64::from(*d)),
        (ColumnKind::DateTime | ColumnKind::Timestamp, Value::Micros(m)) => put_long(buf, *m),
        (ColumnKind::Time, Value::TimeMicros(m)) => put_long(buf, *m),
        (
            ColumnKind::String(_) | ColumnKind::Enum(_) | ColumnKind::Set(_) | ColumnKind::Json,
            Value::String(s),
        ) => put_bytes(buf, s.as_bytes()),
        (ColumnKind::Bytes | ColumnKind::Bits(_), Value::Bytes(b)) => put_bytes(buf, b),
        _ => return Err(mismatch()),
    }
    Ok(())
}

fn put_field(buf: &mut Vec<u8>, col: &Column, v: &Value, required: bool) -> Result<(), AvroError> {
    if col.nullable && !required {
        if matches!(v, Value::Null) {
            buf.push(0); // union branch 0: null
            return Ok(());
        }
        buf.push(2); // union branch 1, zigzag-encoded
    } else if matches!(v, Value::Null) {
        return Err(AvroError::ValueMismatch {
            column: col.name.clone(),
            value: "NULL".into(),
            kind: col.kind.clone(),
        });
    }
    put_value(buf, col, v)
}

fn put_row(buf: &mut Vec<u8>, schema: &TableSchema, row: &[Value]) -> Result<(), AvroError> {
    for (i, col) in schema.columns.iter().enumerate() {
        put_field(buf, col, row.get(i).unwrap_or(&Value::Null), false)?;
    }
    Ok(())
}

/// Avro binary of the key record of `key` (values in key order).
pub fn encode_key(buf: &mut Vec<u8>, schema: &TableSchema, key: &[Value]) -> Result<(), AvroError> {
    for (&i, v) in schema.key.iter().zip(key) {
        if let Some(col) = schema.columns.get(i) {
            put_field(buf, col, v, true)?;
        }
    }
    Ok(())
}

fn put_source(buf: &mut Vec<u8>, name: &str, db: &str, table: &str, s: &SourceInfo) {
    put_bytes(buf, CONNECTOR_VERSION.as_bytes());
    put_bytes(buf, CONNECTOR_NAME.as_bytes());
    put_bytes(buf, name.as_bytes());
    put_long(buf, s.ts_ms);
    buf.push(0); // snapshot: union branch 0 = string
    put_bytes(buf, s.snapshot.as_bytes());
    put_bytes(buf, db.as_bytes());
    buf.push(2);
    put_bytes(buf, table.as_bytes());
    put_long(buf, i64::from(s.server_id));
    match &s.gtid {
        Some(g) => {
            buf.push(2);
            put_bytes(buf, g.as_bytes());
        }
        None => buf.push(0),
    }
    put_bytes(buf, s.file.as_bytes());
    put_long(buf, s.pos as i64);
    put_long(buf, i64::from(s.row));
}

/// Avro binary of the envelope of one change. `name` is the logical server name (topic prefix).
pub fn encode_envelope(
    buf: &mut Vec<u8>,
    name: &str,
    ev: &ChangeEvent,
    ts_ms: i64,
) -> Result<(), AvroError> {
    for image in [&ev.before, &ev.after] {
        match image {
            Some(row) => {
                buf.push(2);
                put_row(buf, &ev.schema, row)?;
            }
            None => buf.push(0),
        }
    }
    put_source(buf, name, &ev.schema.db, &ev.schema.table, &ev.source);
    put_bytes(buf, ev.op.code().as_bytes());
    buf.push(2);
    put_long(buf, ts_ms);
    Ok(())
}

#[cfg(test)]
#[allow(deprecated)] // from_avro_datum: the non-deprecated builder reads the same bytes
pub(crate) mod tests {
    use super::*;

    #[test]
    fn two_columns_that_sanitise_to_one_avro_name_are_refused_naming_both() {
        let c = |name: &str| Column {
            name: name.into(),
            kind: ColumnKind::Int,
            nullable: true,
            default: None,
        };
        let t = TableSchema {
            db: "shop".into(),
            table: "t".into(),
            columns: vec![c("id"), c("名前"), c("住所")],
            key: vec![0],
        };
        match TableAvro::derive("p", &t) {
            Err(AvroError::NameCollision { first, second, .. }) => {
                assert_eq!((first.as_str(), second.as_str()), ("名前", "住所"));
            }
            other => panic!("expected a collision, got {other:?}"),
        }
    }
    use crate::events::{Charset, Op};
    use apache_avro::types::Value as AV;
    use std::sync::Arc;

    pub(crate) fn all_types() -> TableSchema {
        let c = |name: &str, kind: ColumnKind, nullable: bool| Column {
            default: None,
            name: name.into(),
            kind,
            nullable,
        };
        TableSchema {
            db: "test".into(),
            table: "types".into(),
            columns: vec![
                c("id", ColumnKind::Int, false),
                c("flag", ColumnKind::Boolean, true),
                c("big", ColumnKind::Long, true),
                c("ubig", ColumnKind::UnsignedLong, true),
                c("f", ColumnKind::Float, true),
                c("d", ColumnKind::Double, true),
                c(
                    "dec",
                    ColumnKind::Decimal {
                        precision: 12,
                        scale: 4,
                    },
                    true,
                ),
                c("day", ColumnKind::Date, true),
                c("dt", ColumnKind::DateTime, true),
                c("ts", ColumnKind::Timestamp, true),
                c("t", ColumnKind::Time, true),
                c("y", ColumnKind::Year, true),
                c("s", ColumnKind::String(Charset::Utf8), true),
                c("b", ColumnKind::Bytes, true),
                c("e", ColumnKind::Enum(vec!["a".into(), "b".into()]), true),
                c("j", ColumnKind::Json, true),
            ],
            key: vec![0],
        }
    }

    #[test]
    fn decimal_text_becomes_unscaled_twos_complement() {
        assert_eq!(
            decimal_bytes("-1234.5678", 4),
            Some(BigInt::from(-12345678).to_signed_bytes_be())
        );
        assert_eq!(
            decimal_bytes("1.5", 3),
            Some(BigInt::from(1500).to_signed_bytes_be())
        );
        assert_eq!(
            decimal_bytes("18446744073709551615", 0),
            Some(BigInt::from(u64::MAX).to_signed_bytes_be())
        );
        assert_eq!(decimal_bytes("abc", 0), None);
        assert_eq!(decimal_bytes("1.25", 1), None, "would lose a digit");
    }

    /// A change of a row of every column type, its schemas, and its encoded envelope.
    pub(crate) fn sample_envelope() -> (TableAvro, Arc<TableSchema>, Vec<u8>) {
        let schema = Arc::new(all_types());
        let avro = TableAvro::derive("ecst", &schema).expect("schema parses");
        let row = vec![
            Value::Int(7),
            Value::Boolean(true),
            Value::Long(i64::MIN),
            Value::Decimal("18446744073709551615".into()),
            Value::Float(1.5),
            Value::Double(-2.25),
            Value::Decimal("-1234.5678".into()),
            Value::Date(19_782),
            Value::Micros(1_709_210_096_123_456),
            Value::Micros(1_704_067_200_123_000),
            Value::TimeMicros(-45_296_789_000),
            Value::Int(2024),
            Value::String("Emoji 😀".into()),
            Value::Bytes(vec![0, 255]),
            Value::String("b".into()),
            Value::Null,
        ];
        let ev = ChangeEvent {
            schema: schema.clone(),
            op: Op::Update,
            before: None,
            after: Some(row),
            source: SourceInfo {
                ts_ms: 5,
                snapshot: "false",
                server_id: 1,
                gtid: Some("0-1-9".into()),
                file: "mariadb-bin.000001".into(),
                pos: 1234,
                row: 2,
                epoch: 0,
                read_ts_ms: 0,
            },
        };
        let mut buf = Vec::new();
        encode_envelope(&mut buf, "ecst", &ev, 99).expect("encodes");
        (avro, schema, buf)
    }

    #[test]
    fn encoded_envelope_decodes_with_apache_avro_against_the_generated_schema() {
        let (avro, schema, buf) = sample_envelope();
        let decoded =
            apache_avro::from_avro_datum(&avro.value, &mut &buf[..], None).expect("decodes");
        let AV::Record(fields) = decoded else {
            panic!("not a record")
        };
        let get = |n: &str| fields.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        assert_eq!(get("op"), Some(AV::String("u".into())));
        assert_eq!(get("before"), Some(AV::Union(0, Box::new(AV::Null))));
        let Some(AV::Union(1, after)) = get("after") else {
            panic!("no after")
        };
        let AV::Record(cols) = *after else {
            panic!("after not a record")
        };
        assert_eq!(cols[0], ("id".into(), AV::Int(7)));
        assert_eq!(cols[2].1, AV::Union(1, Box::new(AV::Long(i64::MIN))));
        assert_eq!(
            cols[8].1,
            AV::Union(1, Box::new(AV::LocalTimestampMicros(1_709_210_096_123_456)))
        );
        assert_eq!(
            cols[12].1,
            AV::Union(1, Box::new(AV::String("Emoji 😀".into())))
        );
        assert_eq!(cols[15].1, AV::Union(0, Box::new(AV::Null)));
        let mut kbuf = Vec::new();
        encode_key(&mut kbuf, &schema, &[Value::Int(7)]).expect("key encodes");
        let key =
            apache_avro::from_avro_datum(&avro.key, &mut &kbuf[..], None).expect("key decodes");
        assert_eq!(key, AV::Record(vec![("id".into(), AV::Int(7))]));
    }

    #[test]
    fn null_in_a_required_column_is_an_error_naming_the_column() {
        let schema = all_types();
        let mut buf = Vec::new();
        let err = encode_key(&mut buf, &schema, &[Value::Null]).expect_err("must fail");
        assert!(err.to_string().contains("`id`"), "{err}");
    }
}
