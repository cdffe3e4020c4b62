//! Table shapes, derived two ways that must agree.
//!
//! * [`from_table_map`]: from a binlog TABLE_MAP event. Needs `binlog_row_metadata=FULL` for
//!   column names, signedness, charsets, ENUM/SET labels and the primary key; preflight refuses
//!   to stream without it. Because every rows event is preceded by its TABLE_MAP, an
//!   `ALTER TABLE` is seen as a new shape at exactly the right event: no DDL parsing and no schema
//!   history are needed, and catching up on old binlog uses the old shape.
//! * [`from_information_schema`]: for the snapshot, from `information_schema.COLUMNS`.
//!
//! A test on the real server proves both give the same [`TableSchema`] for every column type.

use std::sync::Arc;

use mysql_async::prelude::Queryable;
use mysql_common::binlog::events::{OptionalMetaExtractor, OptionalMetadataField, TableMapEvent};
use mysql_common::constants::ColumnType;

use super::SourceError;
use super::charset::Collations;
use crate::events::{Column, ColumnKind, TableSchema};

/// Per-column decoding facts cached once per TABLE_MAP (the "fast path": rows are decoded with
/// these instead of re-parsing the optional metadata for every row).
#[derive(Debug, Clone)]
pub struct BinlogColumn {
    /// Wire type.
    pub ty: ColumnType,
    /// Type metadata bytes from the TABLE_MAP.
    pub meta: Vec<u8>,
    /// UNSIGNED flag.
    pub unsigned: bool,
}

/// A table shape as seen in the binlog.
#[derive(Debug, Clone)]
pub struct BinlogTable {
    /// The logical schema (compared with the previous one to detect schema changes).
    pub schema: Arc<TableSchema>,
    /// Decoding facts, same order as `schema.columns`.
    pub columns: Vec<BinlogColumn>,
}

fn io_err(table: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError::TableMap {
        table: table.to_string(),
        detail: e.to_string(),
    }
}

/// Derives the shape of a table from its TABLE_MAP event.
///
/// `positional`: a TABLE_MAP without column names (`binlog_row_metadata = MINIMAL`) gives
/// columns named `@1`…`@N` with no key and ENUM/SET values as numbers, instead of the refusal
/// the source needs (offline inspection only: a topic's schema needs the names).
/// `collations`: the server's collation ids, for each text column's charset.
pub fn from_table_map(
    tme: &TableMapEvent<'_>,
    positional: bool,
    collations: &Collations,
) -> Result<BinlogTable, SourceError> {
    let db = tme.database_name().into_owned();
    let table = tme.table_name().into_owned();
    let qn = format!("{db}.{table}");
    let n = tme.columns_count() as usize;
    let extractor =
        OptionalMetaExtractor::new(tme.iter_optional_meta()).map_err(|e| io_err(&qn, e))?;
    let names: Vec<String> = extractor
        .iter_column_name()
        .map(|r| r.map(|c| c.name().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| io_err(&qn, e))?;
    let names = if names.len() == n {
        names
    } else if positional && names.is_empty() {
        (1..=n).map(|i| format!("@{i}")).collect()
    } else {
        return Err(SourceError::MissingRowMetadata { table: qn });
    };
    let mut enum_values: Vec<Vec<String>> = Vec::new();
    let mut set_values: Vec<Vec<String>> = Vec::new();
    for field in tme.iter_optional_meta() {
        match field.map_err(|e| io_err(&qn, e))? {
            OptionalMetadataField::EnumStrValue(v) => {
                for vals in v.iter_values() {
                    let vals = vals.map_err(|e| io_err(&qn, e))?;
                    enum_values.push(
                        vals.values()
                            .iter()
                            .map(|x| x.value().into_owned())
                            .collect(),
                    );
                }
            }
            OptionalMetadataField::SetStrValue(v) => {
                for vals in v.iter_values() {
                    let vals = vals.map_err(|e| io_err(&qn, e))?;
                    set_values.push(
                        vals.values()
                            .iter()
                            .map(|x| x.value().into_owned())
                            .collect(),
                    );
                }
            }
            _ => {}
        }
    }
    let mut enums = enum_values.into_iter();
    let mut sets = set_values.into_iter();
    let mut signedness = extractor.iter_signedness();
    let mut charsets = extractor.iter_charset();
    let key: Vec<usize> = extractor
        .iter_primary_key()
        .map(|r| r.map(|i| i as usize))
        .collect::<Result<_, _>>()
        .map_err(|e| io_err(&qn, e))?;
    let nulls = tme.null_bitmask();

    let mut columns = Vec::with_capacity(n);
    let mut bin = Vec::with_capacity(n);
    for (i, name) in names.into_iter().enumerate() {
        let ty = tme
            .get_column_type(i)
            .map_err(|e| io_err(&qn, e))?
            .ok_or_else(|| io_err(&qn, format!("no type for column {i}")))?;
        let meta = tme.get_column_metadata(i).unwrap_or(&[]).to_vec();
        let unsigned = if ty.is_numeric_type() {
            signedness.next().unwrap_or(false)
        } else {
            false
        };
        let charset = if ty.is_character_type() {
            let id = charsets
                .next()
                .transpose()
                .map_err(|e| io_err(&qn, e))?
                .unwrap_or(63);
            collations
                .charset(id)
                .map_err(|detail| SourceError::UnsupportedType {
                    table: qn.clone(),
                    column: name.clone(),
                    detail,
                })?
        } else {
            None
        };
        use ColumnType as T;
        let kind = match ty {
            T::MYSQL_TYPE_TINY | T::MYSQL_TYPE_SHORT | T::MYSQL_TYPE_INT24 => ColumnKind::Int,
            T::MYSQL_TYPE_LONG => {
                if unsigned {
                    ColumnKind::Long
                } else {
                    ColumnKind::Int
                }
            }
            T::MYSQL_TYPE_LONGLONG => {
                if unsigned {
                    ColumnKind::UnsignedLong
                } else {
                    ColumnKind::Long
                }
            }
            T::MYSQL_TYPE_FLOAT => ColumnKind::Float,
            T::MYSQL_TYPE_DOUBLE => ColumnKind::Double,
            T::MYSQL_TYPE_NEWDECIMAL | T::MYSQL_TYPE_DECIMAL => ColumnKind::Decimal {
                precision: u32::from(meta.first().copied().unwrap_or(10)),
                scale: u32::from(meta.get(1).copied().unwrap_or(0)),
            },
            T::MYSQL_TYPE_DATE | T::MYSQL_TYPE_NEWDATE => ColumnKind::Date,
            T::MYSQL_TYPE_DATETIME | T::MYSQL_TYPE_DATETIME2 => ColumnKind::DateTime,
            T::MYSQL_TYPE_TIMESTAMP | T::MYSQL_TYPE_TIMESTAMP2 => ColumnKind::Timestamp,
            T::MYSQL_TYPE_TIME | T::MYSQL_TYPE_TIME2 => ColumnKind::Time,
            T::MYSQL_TYPE_YEAR => ColumnKind::Year,
            T::MYSQL_TYPE_BIT => {
                let bits = u32::from(meta.first().copied().unwrap_or(0))
                    + 8 * u32::from(meta.get(1).copied().unwrap_or(0));
                if bits == 1 {
                    ColumnKind::Boolean
                } else {
                    ColumnKind::Bits(bits)
                }
            }
            T::MYSQL_TYPE_ENUM => ColumnKind::Enum(enums.next().unwrap_or_default()),
            T::MYSQL_TYPE_SET => ColumnKind::Set(sets.next().unwrap_or_default()),
            T::MYSQL_TYPE_JSON => ColumnKind::Json,
            T::MYSQL_TYPE_VARCHAR
            | T::MYSQL_TYPE_VAR_STRING
            | T::MYSQL_TYPE_STRING
            | T::MYSQL_TYPE_BLOB
            | T::MYSQL_TYPE_TINY_BLOB
            | T::MYSQL_TYPE_MEDIUM_BLOB
            | T::MYSQL_TYPE_LONG_BLOB => match charset {
                Some(cs) => ColumnKind::String(cs),
                None => ColumnKind::Bytes,
            },
            // VECTOR (MySQL 9): its bytes (little-endian float32s), as Debezium passes it.
            T::MYSQL_TYPE_GEOMETRY | T::MYSQL_TYPE_VECTOR => ColumnKind::Bytes,
            other => {
                return Err(SourceError::UnsupportedType {
                    table: qn,
                    column: name,
                    detail: format!("{other:?}"),
                });
            }
        };
        let nullable = nulls.get(i).as_deref().copied().unwrap_or(true);
        columns.push(Column {
            name,
            kind,
            nullable,
            // TABLE_MAP carries no defaults: `with_defaults` adds them from information_schema.
            default: None,
        });
        bin.push(BinlogColumn { ty, meta, unsigned });
    }
    Ok(BinlogTable {
        schema: Arc::new(TableSchema {
            db,
            table,
            columns,
            key,
        }),
        columns: bin,
    })
}

/// Parses the labels out of `enum('a','b''c')` / `set(...)`.
pub fn parse_labels(column_type: &str) -> Vec<String> {
    let Some(start) = column_type.find('(') else {
        return Vec::new();
    };
    let inner = column_type[start + 1..].trim_end_matches(')');
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quote = false;
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, in_quote) {
            ('\'', false) => in_quote = true,
            ('\'', true) if chars.peek() == Some(&'\'') => {
                chars.next();
                cur.push('\'');
            }
            ('\'', true) => {
                in_quote = false;
                out.push(std::mem::take(&mut cur));
            }
            (_, true) => cur.push(c),
            _ => {}
        }
    }
    out
}

async fn is_mariadb(conn: &mut mysql_async::Conn) -> Result<bool, SourceError> {
    let version: Option<String> = conn.query_first("SELECT VERSION()").await?;
    Ok(version.is_some_and(|v| v.contains("MariaDB")))
}

/// The Avro default (JSON text) for a NOT NULL column of `kind` whose MySQL default is
/// `column_default` as `information_schema` shows it: MariaDB quotes string literals
/// (`'abc'`) and writes `NULL` for none; MySQL shows the bare value. Only constants Avro holds
/// as plain JSON are given (numbers, booleans, strings and labels); an expression
/// (`current_timestamp()`), a temporal, decimal or binary default is left out, and a registry
/// under BACKWARD compatibility then refuses the new column as before, loudly.
pub fn avro_default(
    kind: &ColumnKind,
    column_default: Option<&str>,
    mariadb: bool,
) -> Option<String> {
    let raw = column_default?;
    if mariadb && raw.eq_ignore_ascii_case("NULL") {
        return None;
    }
    let text = if mariadb {
        raw.strip_prefix('\'')
            .and_then(|r| r.strip_suffix('\''))
            .map(|inner| inner.replace("''", "'").replace("\\\\", "\\"))
    } else {
        Some(raw.to_string())
    };
    let json = match kind {
        ColumnKind::Int | ColumnKind::Year => {
            serde_json::Value::from(text.as_deref().unwrap_or(raw).parse::<i32>().ok()?)
        }
        ColumnKind::Long => {
            serde_json::Value::from(text.as_deref().unwrap_or(raw).parse::<i64>().ok()?)
        }
        ColumnKind::Float | ColumnKind::Double => {
            let f = text.as_deref().unwrap_or(raw).parse::<f64>().ok()?;
            serde_json::Number::from_f64(f).map(serde_json::Value::Number)?
        }
        ColumnKind::Boolean => match text.as_deref().unwrap_or(raw) {
            "0" | "b'0'" => serde_json::Value::Bool(false),
            "1" | "b'1'" => serde_json::Value::Bool(true),
            _ => return None,
        },
        ColumnKind::String(_) | ColumnKind::Enum(_) | ColumnKind::Set(_) => {
            // MariaDB: a string default is always quoted; unquoted is an expression.
            serde_json::Value::String(if mariadb { text? } else { raw.to_string() })
        }
        _ => return None,
    };
    Some(json.to_string())
}

/// Adds the Avro defaults of NOT NULL columns to a shape read from the binlog (TABLE_MAP
/// carries none), from `information_schema` now, for the columns of the same name and type:
/// the snapshot's shape of the same table then has the same schema.
pub async fn with_defaults(
    conn: &mut mysql_async::Conn,
    table: &mut TableSchema,
) -> Result<(), SourceError> {
    if table.columns.iter().all(|c| c.nullable) {
        return Ok(());
    }
    let current = match from_information_schema(conn, &table.db, &table.table).await {
        Ok(t) => t,
        // Dropped (or renamed) since this event: no defaults to add.
        Err(SourceError::TableNotFound { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    for col in table.columns.iter_mut().filter(|c| !c.nullable) {
        if let Some(now) = current
            .columns
            .iter()
            .find(|c| c.name == col.name && c.kind == col.kind)
        {
            col.default = now.default.clone();
        }
    }
    Ok(())
}

/// The server's collation ids and their charsets (what its TABLE_MAPs refer to). MariaDB 10.10+
/// lists the ids of its full collation names (`uca1400` ones) only in
/// `COLLATION_CHARACTER_SET_APPLICABILITY`; elsewhere `COLLATIONS` has them all. Every column is
/// read as nullable (a typed tuple would panic inside the driver on a NULL).
pub async fn server_collations(conn: &mut mysql_async::Conn) -> Result<Collations, SourceError> {
    let full: Result<Vec<(Option<u64>, Option<String>)>, _> = conn
        .query(
            "SELECT ID, CHARACTER_SET_NAME FROM information_schema.COLLATION_CHARACTER_SET_APPLICABILITY",
        )
        .await;
    let mut rows: Vec<(Option<u64>, Option<String>)> = conn
        .query("SELECT ID, CHARACTER_SET_NAME FROM information_schema.COLLATIONS")
        .await?;
    if let Ok(more) = full {
        rows.extend(more);
    }
    Ok(Collations::new(
        rows.into_iter()
            .filter_map(|(id, cs)| Some((u16::try_from(id?).ok()?, cs?)))
            .collect(),
    ))
}

/// Derives the shape of a table from `information_schema` (used by the snapshot).
pub async fn from_information_schema(
    conn: &mut mysql_async::Conn,
    db: &str,
    table: &str,
) -> Result<TableSchema, SourceError> {
    type Row = (
        String,
        String,
        String,
        String,
        Option<u64>,
        Option<u64>,
        Option<String>,
        Option<String>,
    );
    let rows: Vec<Row> = conn
        .exec(
            "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, IS_NULLABLE, NUMERIC_PRECISION, \
             NUMERIC_SCALE, CHARACTER_SET_NAME, COLUMN_DEFAULT FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (db, table),
        )
        .await?;
    let mariadb = is_mariadb(conn).await?;
    if rows.is_empty() {
        return Err(SourceError::TableNotFound {
            table: format!("{db}.{table}"),
        });
    }
    let key_names: Vec<String> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = ? \
             AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' ORDER BY ORDINAL_POSITION",
            (db, table),
        )
        .await?;
    let mut columns = Vec::with_capacity(rows.len());
    for (name, data_type, column_type, nullable, precision, scale, charset, column_default) in rows
    {
        let unsigned = column_type.contains("unsigned");
        let kind = match data_type.as_str() {
            "tinyint" | "smallint" | "mediumint" => ColumnKind::Int,
            "int" | "integer" => {
                if unsigned {
                    ColumnKind::Long
                } else {
                    ColumnKind::Int
                }
            }
            "bigint" => {
                if unsigned {
                    ColumnKind::UnsignedLong
                } else {
                    ColumnKind::Long
                }
            }
            "float" => ColumnKind::Float,
            "double" | "real" => ColumnKind::Double,
            "decimal" | "numeric" => ColumnKind::Decimal {
                precision: precision.unwrap_or(10) as u32,
                scale: scale.unwrap_or(0) as u32,
            },
            "date" => ColumnKind::Date,
            "datetime" => ColumnKind::DateTime,
            "timestamp" => ColumnKind::Timestamp,
            "time" => ColumnKind::Time,
            "year" => ColumnKind::Year,
            "bit" => {
                let bits = precision.unwrap_or(1) as u32;
                if bits == 1 {
                    ColumnKind::Boolean
                } else {
                    ColumnKind::Bits(bits)
                }
            }
            "enum" => ColumnKind::Enum(parse_labels(&column_type)),
            "set" => ColumnKind::Set(parse_labels(&column_type)),
            "json" => ColumnKind::Json,
            "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" => {
                let cs = match charset.as_deref() {
                    None => None,
                    Some(n) => super::charset::of_name(n).map_err(|detail| {
                        SourceError::UnsupportedType {
                            table: format!("{db}.{table}"),
                            column: name.clone(),
                            detail,
                        }
                    })?,
                };
                match cs {
                    Some(cs) => ColumnKind::String(cs),
                    None => ColumnKind::Bytes,
                }
            }
            "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob"
            | "geometry" | "point" | "linestring" | "polygon" | "multipoint"
            | "multilinestring" | "multipolygon" | "geometrycollection" | "vector" => {
                ColumnKind::Bytes
            }
            other => {
                return Err(SourceError::UnsupportedType {
                    table: format!("{db}.{table}"),
                    column: name,
                    detail: other.to_string(),
                });
            }
        };
        let nullable = nullable == "YES";
        let default = if nullable {
            None
        } else {
            avro_default(&kind, column_default.as_deref(), mariadb)
        };
        columns.push(Column {
            name,
            kind,
            nullable,
            default,
        });
    }
    let key = key_names
        .iter()
        .filter_map(|k| columns.iter().position(|c| &c.name == k))
        .collect();
    Ok(TableSchema {
        db: db.into(),
        table: table.into(),
        columns,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_labels_are_parsed_with_escaped_quotes() {
        assert_eq!(
            parse_labels("enum('a','b''c','d,e')"),
            vec!["a", "b'c", "d,e"]
        );
        assert_eq!(parse_labels("set('x')"), vec!["x"]);
    }

    #[test]
    fn constant_defaults_become_avro_defaults_and_expressions_do_not() {
        use crate::events::Charset;
        let int = ColumnKind::Int;
        let text = ColumnKind::String(Charset::Utf8);
        assert_eq!(avro_default(&int, Some("1"), true).as_deref(), Some("1"));
        assert_eq!(avro_default(&int, Some("-7"), false).as_deref(), Some("-7"));
        assert_eq!(avro_default(&int, Some("NULL"), true), None);
        assert_eq!(avro_default(&int, None, true), None);
        assert_eq!(
            avro_default(&text, Some("'it''s'"), true).as_deref(),
            Some("\"it's\"")
        );
        assert_eq!(
            avro_default(&text, Some("it's"), false).as_deref(),
            Some("\"it's\"")
        );
        assert_eq!(
            avro_default(&text, Some("uuid()"), true),
            None,
            "an expression"
        );
        assert_eq!(
            avro_default(&ColumnKind::DateTime, Some("current_timestamp()"), true),
            None
        );
        assert_eq!(
            avro_default(&ColumnKind::Boolean, Some("1"), true).as_deref(),
            Some("true")
        );
    }
}
