//! MySQL values → [`Value`]: the type matrix, shared by the binlog and the snapshot paths.
//!
//! Both paths end in [`convert`], so the same row yields the same values whichever way it was
//! read. The differences between the two wire forms are normalised here:
//!
//! | kind       | binlog gives                          | snapshot (binary protocol) gives     |
//! |------------|---------------------------------------|--------------------------------------|
//! | ENUM       | `Int(index)`                          | `Bytes(label)`                       |
//! | SET        | `Bytes(bitmask, little-endian)`       | `Bytes("a,b")`                       |
//! | YEAR       | `Bytes("2024")` (`"1900"` for 0000)   | `Int(2024)`                          |
//! | TIMESTAMP  | `Bytes("secs.micros")` (UTC)          | `Date(..)` in the session zone (UTC) |
//! | text       | bytes in the column charset           | UTF-8 (the connection charset)       |
//! | MEDIUMINT  | not sign-extended by mysql_common     | correct                              |
//!
//! Rows are decoded with per-table cached column facts ([`BinlogColumn`]) instead of the stock
//! `BinlogRow` API, which re-parses the TABLE_MAP metadata for every row.

use mysql_common::binlog::value::BinlogValue;
use mysql_common::constants::ColumnType;
use mysql_common::io::ParseBuf;
use mysql_common::value::Value as My;

use super::SourceError;
use super::table_map::BinlogTable;
use crate::events::{Charset, Column, ColumnKind, Value};

/// Which path a value came from (the wire forms differ, see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Binlog rows event.
    Binlog,
    /// Snapshot query (binary protocol, connection charset utf8mb4, time zone UTC).
    Snapshot,
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Decodes MySQL `latin1` (really Windows-1252) to a `String`.
pub fn decode_latin1(bytes: &[u8]) -> String {
    const CP1252: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž',
        '\u{8f}', '\u{90}', '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}',
        'ž', 'Ÿ',
    ];
    bytes
        .iter()
        .map(|&b| {
            if (0x80..0xa0).contains(&b) {
                CP1252[usize::from(b - 0x80)]
            } else {
                char::from(b)
            }
        })
        .collect()
}

fn text(bytes: Vec<u8>, cs: Charset, origin: Origin) -> String {
    // The snapshot's text is converted to UTF-8 by the server; the binlog's is in the column's
    // own charset.
    let cs = if origin == Origin::Binlog {
        cs
    } else {
        Charset::Utf8
    };
    if cs == Charset::Utf8 {
        return match String::from_utf8(bytes) {
            Ok(s) => s,
            // Never get stuck on one bad string (mysql_cdc's failure mode): keep the row,
            // replace the invalid sequences, and say so.
            Err(e) => {
                tracing::warn!(error = %e, "invalid utf-8 in a text column, replaced");
                String::from_utf8_lossy(e.as_bytes()).into_owned()
            }
        };
    }
    let (s, replaced) = super::charset::decode(&bytes, cs);
    if replaced {
        tracing::warn!(charset = ?cs, "invalid bytes for the column's charset in a text column, replaced");
    }
    s
}

fn mismatch(col: &Column, v: &My) -> SourceError {
    SourceError::ValueType {
        column: col.name.clone(),
        detail: format!("{:?} for {:?}", v, col.kind),
    }
}

fn zero_date(col: &Column) -> Value {
    // MySQL zero dates ('0000-00-00') have no calendar meaning: NULL where allowed (as Debezium).
    if col.nullable {
        Value::Null
    } else {
        Value::Micros(0)
    }
}

/// Converts one MySQL value of `col` to a [`Value`].
pub fn convert(
    col: &Column,
    v: My,
    origin: Origin,
    int24_signed: bool,
) -> Result<Value, SourceError> {
    use ColumnKind as K;
    Ok(match (&col.kind, v) {
        (_, My::NULL) => Value::Null,
        (K::Int, My::Int(i)) => {
            let i = if int24_signed && i > 0x7f_ffff {
                i - 0x100_0000
            } else {
                i
            };
            Value::Int(i32::try_from(i).map_err(|_| mismatch(col, &My::Int(i)))?)
        }
        (K::Int, My::UInt(u)) => {
            Value::Int(i32::try_from(u).map_err(|_| mismatch(col, &My::UInt(u)))?)
        }
        (K::Long, My::Int(i)) => Value::Long(i),
        (K::Long, My::UInt(u)) => {
            Value::Long(i64::try_from(u).map_err(|_| mismatch(col, &My::UInt(u)))?)
        }
        (K::UnsignedLong, My::UInt(u)) => Value::Decimal(u.to_string()),
        (K::UnsignedLong, My::Int(i)) => Value::Decimal((i as u64).to_string()),
        (K::Year, My::Int(i)) => Value::Int(i as i32),
        (K::Year, My::UInt(u)) => Value::Int(u as i32),
        (K::Year, My::Bytes(b)) => {
            let y: i32 = std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            Value::Int(if y == 1900 { 0 } else { y })
        }
        (K::Float, My::Float(f)) => Value::Float(f),
        (K::Float, My::Double(d)) => Value::Float(d as f32),
        (K::Double, My::Double(d)) => Value::Double(d),
        (K::Double, My::Float(f)) => Value::Double(f64::from(f)),
        (K::Decimal { .. }, My::Bytes(b)) => {
            Value::Decimal(String::from_utf8_lossy(&b).into_owned())
        }
        (K::Date, My::Date(y, m, d, ..)) => {
            if m == 0 || d == 0 {
                return Ok(if col.nullable {
                    Value::Null
                } else {
                    Value::Date(0)
                });
            }
            Value::Date(days_from_civil(i64::from(y), u32::from(m), u32::from(d)) as i32)
        }
        (K::DateTime | K::Timestamp, My::Date(y, m, d, h, mi, s, us)) => {
            if m == 0 || d == 0 {
                return Ok(zero_date(col));
            }
            let days = days_from_civil(i64::from(y), u32::from(m), u32::from(d));
            let secs = days * 86_400 + i64::from(h) * 3_600 + i64::from(mi) * 60 + i64::from(s);
            Value::Micros(secs * 1_000_000 + i64::from(us))
        }
        (K::Timestamp, My::Bytes(b)) => {
            let s = String::from_utf8_lossy(&b);
            let (sec, frac) = s.split_once('.').unwrap_or((&s, "0"));
            let sec: i64 = sec
                .parse()
                .map_err(|_| mismatch(col, &My::Bytes(b.clone())))?;
            let mut frac = frac.to_string();
            frac.truncate(6);
            while frac.len() < 6 {
                frac.push('0');
            }
            let us: i64 = frac
                .parse()
                .map_err(|_| mismatch(col, &My::Bytes(b.clone())))?;
            if sec == 0 && us == 0 {
                return Ok(zero_date(col));
            }
            Value::Micros(sec * 1_000_000 + us)
        }
        (K::Timestamp, My::Int(sec)) => Value::Micros(sec * 1_000_000),
        (K::Time, My::Time(neg, days, h, m, s, us)) => {
            let total =
                ((i64::from(days) * 24 + i64::from(h)) * 3_600 + i64::from(m) * 60 + i64::from(s))
                    * 1_000_000
                    + i64::from(us);
            Value::TimeMicros(if neg { -total } else { total })
        }
        (K::String(cs), My::Bytes(b)) => Value::String(text(b, *cs, origin)),
        (K::Json, My::Bytes(b)) => {
            // Normalise JSON text so both paths render it identically.
            let s = text(b, Charset::Utf8, origin);
            match serde_json::from_str::<serde_json::Value>(&s) {
                Ok(j) => Value::String(j.to_string()),
                Err(_) => Value::String(s),
            }
        }
        (K::Bytes | K::Bits(_), My::Bytes(b)) => Value::Bytes(b),
        (K::Bits(_), My::UInt(u)) => Value::Bytes(u.to_be_bytes().to_vec()),
        (K::Boolean, My::Bytes(b)) => Value::Boolean(b.iter().any(|x| *x != 0)),
        (K::Boolean, My::Int(i)) => Value::Boolean(i != 0),
        (K::Boolean, My::UInt(u)) => Value::Boolean(u != 0),
        // No labels (a positional shape from MINIMAL metadata, offline only): the index.
        (K::Enum(labels), My::Int(i)) if labels.is_empty() => Value::String(i.to_string()),
        (K::Set(labels), My::Bytes(b)) if labels.is_empty() && origin == Origin::Binlog => {
            let mut mask: u64 = 0;
            for (i, byte) in b.iter().enumerate().take(8) {
                mask |= u64::from(*byte) << (8 * i);
            }
            Value::String(mask.to_string())
        }
        (K::Enum(labels), My::Int(i)) => {
            // Index 0 is MySQL's "invalid value" empty string.
            let idx = usize::try_from(i).unwrap_or(0);
            Value::String(if idx == 0 {
                String::new()
            } else {
                labels.get(idx - 1).cloned().unwrap_or_default()
            })
        }
        (K::Enum(_), My::Bytes(b)) => Value::String(text(b, Charset::Utf8, origin)),
        (K::Set(labels), My::Bytes(b)) if origin == Origin::Binlog => {
            let mut mask: u64 = 0;
            for (i, byte) in b.iter().enumerate().take(8) {
                mask |= u64::from(*byte) << (8 * i);
            }
            let chosen: Vec<&str> = labels
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1u64 << i) != 0)
                .map(|(_, l)| l.as_str())
                .collect();
            Value::String(chosen.join(","))
        }
        (K::Set(_), My::Bytes(b)) => Value::String(text(b, Charset::Utf8, origin)),
        (_, other) => return Err(mismatch(col, &other)),
    })
}

/// The before and after images of one row (either may be absent).
pub type RowImages = (Option<Vec<Value>>, Option<Vec<Value>>);

/// Decodes the rows of one rows event with the cached table facts.
///
/// Returns `(before, after)` images per row. `rows_data` is the event's row payload;
/// `before_present`/`after_present` the column-presence bitmaps (FULL row image: all set).
/// `partial`: a PARTIAL_UPDATE_ROWS event, whose after image may carry JSON columns as diffs
/// against the before image (they are applied: the after image is always whole).
pub fn decode_rows<'a>(
    table: &'a BinlogTable,
    rows_data: &'a [u8],
    before_present: Option<&[bool]>,
    after_present: Option<&[bool]>,
    partial: bool,
) -> Result<Vec<RowImages>, SourceError> {
    let mut buf = ParseBuf(rows_data);
    let mut out = Vec::new();
    while !buf.is_empty() {
        let before = match before_present {
            Some(p) => Some(decode_image(table, &mut buf, p, None, None)?),
            None => None,
        };
        let diffs = if partial {
            Some(partial_json_columns(table, &mut buf)?)
        } else {
            None
        };
        let after = match after_present {
            Some(p) => Some(decode_image(
                table,
                &mut buf,
                p,
                diffs.as_deref(),
                before.as_deref(),
            )?),
            None => None,
        };
        out.push((before, after));
    }
    Ok(out)
}

/// The "shared image" of a partial update's after row: which JSON columns are diffs.
fn partial_json_columns(
    table: &BinlogTable,
    buf: &mut ParseBuf<'_>,
) -> Result<Vec<bool>, SourceError> {
    let truncated = || SourceError::RowDecode {
        table: table.schema.qualified_name(),
        detail: "truncated partial-update options".into(),
    };
    // value_options: a length-encoded integer (bit 0: PARTIAL_JSON_UPDATES).
    let first = *buf
        .checked_eat(1)
        .and_then(|b| b.first())
        .ok_or_else(truncated)?;
    let width = match first {
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        _ => 0,
    };
    let options: u64 = if width == 0 {
        u64::from(first)
    } else {
        let bytes = buf.checked_eat(width).ok_or_else(truncated)?;
        bytes
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    };
    let json_columns = table
        .columns
        .iter()
        .filter(|c| c.ty == ColumnType::MYSQL_TYPE_JSON)
        .count();
    if options & 1 == 0 {
        return Ok(vec![false; json_columns]);
    }
    let bits: &[u8] = buf
        .checked_eat(json_columns.div_ceil(8))
        .ok_or_else(truncated)?;
    Ok((0..json_columns)
        .map(|i| bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
        .collect())
}

/// The declared length in bytes of a MYSQL_TYPE_STRING column (CHAR/BINARY) from its TABLE_MAP
/// metadata: `real_type, length`, with lengths over 255 folding two bits into the first byte.
fn fixed_length(meta: &[u8]) -> usize {
    let (b0, b1) = (
        meta.first().copied().unwrap_or(0),
        meta.get(1).copied().unwrap_or(0),
    );
    if b0 & 0x30 != 0x30 {
        ((usize::from(b0 & 0x30) ^ 0x30) << 4) | usize::from(b1)
    } else {
        usize::from(b1)
    }
}

fn decode_image<'a>(
    table: &'a BinlogTable,
    buf: &mut ParseBuf<'a>,
    present: &[bool],
    json_diffs: Option<&[bool]>,
    before: Option<&[Value]>,
) -> Result<Vec<Value>, SourceError> {
    let qn = || table.schema.qualified_name();
    let n_present = present.iter().filter(|p| **p).count();
    let bitmap_len = n_present.div_ceil(8);
    let bitmap: &[u8] = buf
        .checked_eat(bitmap_len)
        .ok_or_else(|| SourceError::RowDecode {
            table: qn(),
            detail: "truncated null bitmap".into(),
        })?;
    let mut row = Vec::with_capacity(table.columns.len());
    let mut image_idx = 0usize;
    let mut json_idx = 0usize;
    for (i, (bc, col)) in table.columns.iter().zip(&table.schema.columns).enumerate() {
        let mut is_diff = false;
        if bc.ty == ColumnType::MYSQL_TYPE_JSON {
            is_diff = json_diffs.is_some_and(|d| d.get(json_idx).copied().unwrap_or(false));
            json_idx += 1;
        }
        if !present.get(i).copied().unwrap_or(false) {
            // Not in the image (only with binlog_row_image != FULL, refused before decoding).
            row.push(Value::Null);
            continue;
        }
        let is_null = bitmap
            .get(image_idx / 8)
            .is_some_and(|b| b & (1 << (image_idx % 8)) != 0);
        image_idx += 1;
        if is_null {
            row.push(Value::Null);
            continue;
        }
        let col_err = |e: String| SourceError::RowDecode {
            table: qn(),
            detail: format!("column `{}`: {e}", col.name),
        };
        // mysql_common's value parser indexes the TABLE_MAP metadata and does unchecked
        // arithmetic on the value's bytes: a corrupt event (one that passed the CRC, or with
        // checksums off) can panic in it. That is a decode error of this column, not a crash
        // of the reader (found by the property tests below).
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            buf.parse::<BinlogValue<'_>>((bc.ty, bc.meta.as_slice(), bc.unsigned, is_diff))
        }));
        let raw: BinlogValue<'_> = match parsed {
            Ok(v) => v.map_err(|e| col_err(e.to_string()))?,
            Err(_) => {
                return Err(col_err(format!(
                    "the value does not fit its type {:?} with metadata {:?} (a corrupt event)",
                    bc.ty, bc.meta
                )));
            }
        };
        let my = match raw {
            BinlogValue::Value(v) => v,
            BinlogValue::Jsonb(j) => {
                let json = super::json::from_jsonb(j).map_err(col_err)?;
                My::Bytes(json.to_string().into_bytes())
            }
            BinlogValue::JsonDiff(diffs) => {
                let old = match before.and_then(|b| b.get(i)) {
                    Some(Value::String(s)) => Some(s.as_str()),
                    _ => None,
                };
                let new = super::json::apply_diffs(old, &diffs).map_err(col_err)?;
                My::Bytes(new.into_bytes())
            }
        };
        // BINARY(n): the binlog drops the trailing 0x00 pad bytes the column holds (and the
        // snapshot reads); put them back.
        let my = match my {
            My::Bytes(mut b)
                if bc.ty == ColumnType::MYSQL_TYPE_STRING && col.kind == ColumnKind::Bytes =>
            {
                let n = fixed_length(&bc.meta);
                if b.len() < n {
                    b.resize(n, 0);
                }
                My::Bytes(b)
            }
            other => other,
        };
        let int24_signed = bc.ty == ColumnType::MYSQL_TYPE_INT24 && !bc.unsigned;
        row.push(convert(col, my, Origin::Binlog, int24_signed)?);
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::TableSchema;
    use crate::source::table_map::BinlogColumn;
    use proptest::prelude::*;
    use std::sync::Arc;

    /// Wire type, TABLE_MAP metadata, UNSIGNED, and the column kind ecst derives for it.
    fn wire_columns() -> Vec<(ColumnType, Vec<u8>, bool, ColumnKind)> {
        use ColumnType as T;
        vec![
            (T::MYSQL_TYPE_LONG, vec![], false, ColumnKind::Int),
            (
                T::MYSQL_TYPE_LONGLONG,
                vec![],
                true,
                ColumnKind::UnsignedLong,
            ),
            (T::MYSQL_TYPE_INT24, vec![], false, ColumnKind::Int),
            (
                T::MYSQL_TYPE_VARCHAR,
                vec![0x2c, 0x01],
                false,
                ColumnKind::String(Charset::Utf8),
            ),
            (T::MYSQL_TYPE_BLOB, vec![2], false, ColumnKind::Bytes),
            (
                T::MYSQL_TYPE_STRING,
                vec![0xfe, 16],
                false,
                ColumnKind::Bytes,
            ),
            (
                T::MYSQL_TYPE_NEWDECIMAL,
                vec![12, 4],
                false,
                ColumnKind::Decimal {
                    precision: 12,
                    scale: 4,
                },
            ),
            (
                T::MYSQL_TYPE_DATETIME2,
                vec![6],
                false,
                ColumnKind::DateTime,
            ),
            (
                T::MYSQL_TYPE_TIMESTAMP2,
                vec![3],
                false,
                ColumnKind::Timestamp,
            ),
            (T::MYSQL_TYPE_TIME2, vec![0], false, ColumnKind::Time),
            (T::MYSQL_TYPE_DATE, vec![], false, ColumnKind::Date),
            (T::MYSQL_TYPE_YEAR, vec![], false, ColumnKind::Year),
            (T::MYSQL_TYPE_DOUBLE, vec![8], false, ColumnKind::Double),
            (T::MYSQL_TYPE_FLOAT, vec![4], false, ColumnKind::Float),
            (T::MYSQL_TYPE_JSON, vec![4], false, ColumnKind::Json),
            (
                T::MYSQL_TYPE_STRING,
                vec![0xf7, 1],
                false,
                ColumnKind::Enum(vec!["a".into(), "b".into()]),
            ),
            (
                T::MYSQL_TYPE_STRING,
                vec![0xf8, 1],
                false,
                ColumnKind::Set(vec!["a".into(), "b".into()]),
            ),
            (T::MYSQL_TYPE_BIT, vec![3, 1], false, ColumnKind::Bytes),
        ]
    }

    /// A table of the wire columns, with each column's metadata replaced where `metas` says.
    fn wire_table(metas: &[Option<Vec<u8>>]) -> BinlogTable {
        let wire = wire_columns();
        let columns = wire
            .iter()
            .enumerate()
            .map(|(i, (ty, meta, unsigned, _))| BinlogColumn {
                ty: *ty,
                meta: metas
                    .get(i)
                    .cloned()
                    .flatten()
                    .unwrap_or_else(|| meta.clone()),
                unsigned: *unsigned,
            })
            .collect();
        let schema = TableSchema {
            db: "fuzz".into(),
            table: "t".into(),
            columns: wire
                .into_iter()
                .enumerate()
                .map(|(i, (_, _, _, kind))| Column {
                    default: None,
                    name: format!("c{i}"),
                    kind,
                    nullable: true,
                })
                .collect(),
            key: vec![0],
        };
        BinlogTable {
            schema: Arc::new(schema),
            columns,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_row_bytes_are_decoded_or_refused_never_a_panic(
            rows in prop::collection::vec(any::<u8>(), 0..400),
            before in any::<bool>(),
            partial in any::<bool>(),
        ) {
            let table = wire_table(&[]);
            let all = vec![true; table.columns.len()];
            let _ = decode_rows(&table, &rows, before.then_some(all.as_slice()), Some(&all), partial);
        }

        #[test]
        fn arbitrary_table_map_metadata_never_makes_row_decoding_panic(
            metas in prop::collection::vec(prop::option::of(prop::collection::vec(any::<u8>(), 0..3)), 18),
            rows in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let table = wire_table(&metas);
            let all = vec![true; table.columns.len()];
            let _ = decode_rows(&table, &rows, None, Some(&all), false);
        }
    }

    fn col(kind: ColumnKind) -> Column {
        Column {
            default: None,
            name: "c".into(),
            kind,
            nullable: true,
        }
    }

    #[test]
    fn civil_dates_map_to_epoch_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
    }

    #[test]
    fn latin1_is_decoded_as_windows_1252() {
        assert_eq!(decode_latin1(b"caf\xe9 \x80"), "café €");
    }

    #[test]
    fn binlog_and_snapshot_forms_of_the_same_value_convert_identically() {
        let set = col(ColumnKind::Set(vec!["a".into(), "b".into(), "c".into()]));
        assert_eq!(
            convert(&set, My::Bytes(vec![5]), Origin::Binlog, false).ok(),
            convert(&set, My::Bytes(b"a,c".to_vec()), Origin::Snapshot, false).ok()
        );
        let en = col(ColumnKind::Enum(vec!["x".into(), "y".into()]));
        assert_eq!(
            convert(&en, My::Int(2), Origin::Binlog, false).ok(),
            convert(&en, My::Bytes(b"y".to_vec()), Origin::Snapshot, false).ok()
        );
        let ts = col(ColumnKind::Timestamp);
        assert_eq!(
            convert(
                &ts,
                My::Bytes(b"1704067200.123000".to_vec()),
                Origin::Binlog,
                false
            )
            .ok(),
            convert(
                &ts,
                My::Date(2024, 1, 1, 0, 0, 0, 123_000),
                Origin::Snapshot,
                false
            )
            .ok()
        );
        let y = col(ColumnKind::Year);
        assert_eq!(
            convert(&y, My::Bytes(b"2024".to_vec()), Origin::Binlog, false).ok(),
            Some(Value::Int(2024))
        );
        assert_eq!(
            convert(&y, My::Int(2024), Origin::Snapshot, false).ok(),
            Some(Value::Int(2024))
        );
    }

    #[test]
    fn signed_mediumint_is_sign_extended_and_unsigned_bigint_does_not_wrap() {
        let c = col(ColumnKind::Int);
        assert_eq!(
            convert(&c, My::Int(16_777_211), Origin::Binlog, true).ok(),
            Some(Value::Int(-5))
        );
        let u = col(ColumnKind::UnsignedLong);
        assert_eq!(
            convert(&u, My::UInt(u64::MAX), Origin::Binlog, false).ok(),
            Some(Value::Decimal("18446744073709551615".into()))
        );
    }

    #[test]
    fn negative_time_keeps_its_sign_and_microseconds() {
        let c = col(ColumnKind::Time);
        assert_eq!(
            convert(
                &c,
                My::Time(true, 0, 12, 34, 56, 789_000),
                Origin::Binlog,
                false
            )
            .ok(),
            Some(Value::TimeMicros(-45_296_789_000))
        );
    }
}
