//! MySQL's binary JSON on the binlog path: rendered as the server renders it in JSON text, and
//! partial updates (`binlog_row_value_options = PARTIAL_JSON`) applied to the before image.
//!
//! Parity with the snapshot: the snapshot reads JSON *text* from the server, and both paths end
//! in the same normalisation (`decode::convert` parses the text with serde_json and prints it
//! again). So the binlog path must produce what the server would print, not a rendering of its
//! own. Scalars stored as "opaque" values in binary JSON (a DECIMAL, DATE, TIME, DATETIME or
//! TIMESTAMP put into a document, e.g. `JSON_OBJECT('price', 9.99)`) are where that matters: the
//! server prints a DECIMAL as a number (`9.99`) and dates and times as strings with six
//! fractional digits (`"2024-05-01 10:00:00.000000"`). Any other opaque type (the server prints
//! it as `"base64:type<N>:<data>"`) is rendered the same way.
//!
//! A partial update carries, for a JSON column, a list of (operation, path, value) instead of the
//! whole value. MySQL applies them to the before image; so do we: [`apply_diffs`] takes the before
//! value and gives the full after value, so a partial update is published as a full row. A diff
//! that does not apply (a path that does not exist for REPLACE or REMOVE) is an error: guessing
//! would publish a wrong copy.

use mysql_common::binlog::jsonb::{JsonContainer, JsonDom, JsonNumber, JsonScalar};
use mysql_common::binlog::jsondiff::{JsonDiff, JsonDiffOperation};
use serde_json::Value as Json;

/// A binary JSON value as the server renders it in JSON text.
pub fn from_jsonb(v: mysql_common::binlog::jsonb::Value<'_>) -> Result<Json, String> {
    v.parse().map(dom_to_json).map_err(|e| e.to_string())
}

fn dom_to_json(dom: JsonDom) -> Json {
    match dom {
        JsonDom::Container(JsonContainer::Array(items)) => {
            Json::Array(items.into_iter().map(dom_to_json).collect())
        }
        JsonDom::Container(JsonContainer::Object(map)) => {
            Json::Object(map.into_iter().map(|(k, v)| (k, dom_to_json(v))).collect())
        }
        JsonDom::Scalar(JsonScalar::Number(JsonNumber::Decimal(d))) => {
            // The server prints a DECIMAL in a document as a number; read that text back as the
            // snapshot path reads the server's text.
            let text = d.to_string();
            serde_json::from_str(&text).unwrap_or(Json::String(text))
        }
        JsonDom::Scalar(JsonScalar::DateTime(t)) => Json::String(format!("{t:.6}")),
        JsonDom::Scalar(other) => Json::from(other),
    }
}

/// One leg of a JSON path: a member name or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Leg {
    Member(String),
    Index(usize),
}

/// Parses the simple paths the server writes in partial updates: `$`, `.name`, `."quoted name"`
/// and `[N]` legs (no wildcards: the server resolves those before logging).
fn parse_path(path: &str) -> Result<Vec<Leg>, String> {
    let bad = || format!("unsupported JSON path `{path}`");
    let rest = path.strip_prefix('$').ok_or_else(bad)?;
    let mut legs = Vec::new();
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '.' => {
                let mut name = String::new();
                if chars.peek() == Some(&'"') {
                    chars.next();
                    loop {
                        match chars.next() {
                            Some('\\') => name.push(chars.next().ok_or_else(bad)?),
                            Some('"') => break,
                            Some(ch) => name.push(ch),
                            None => return Err(bad()),
                        }
                    }
                } else {
                    while let Some(&ch) = chars.peek() {
                        if ch == '.' || ch == '[' {
                            break;
                        }
                        name.push(ch);
                        chars.next();
                    }
                }
                if name.is_empty() {
                    return Err(bad());
                }
                legs.push(Leg::Member(name));
            }
            '[' => {
                let mut digits = String::new();
                for ch in chars.by_ref() {
                    if ch == ']' {
                        break;
                    }
                    digits.push(ch);
                }
                legs.push(Leg::Index(digits.trim().parse().map_err(|_| bad())?));
            }
            c if c.is_whitespace() => {}
            _ => return Err(bad()),
        }
    }
    Ok(legs)
}

fn child_mut<'a>(v: &'a mut Json, leg: &Leg) -> Option<&'a mut Json> {
    match (v, leg) {
        (Json::Object(m), Leg::Member(k)) => m.get_mut(k),
        (Json::Array(a), Leg::Index(i)) => a.get_mut(*i),
        // The server auto-wraps a scalar as a one-element array for `[0]`.
        (other, Leg::Index(0)) => Some(other),
        _ => None,
    }
}

/// Applies one diff to `doc` in place.
fn apply_one(
    doc: &mut Json,
    op: JsonDiffOperation,
    path: &str,
    value: Option<Json>,
) -> Result<(), String> {
    let legs = parse_path(path)?;
    let missing =
        || format!("partial JSON update: path `{path}` does not exist in the before image");
    let Some((last, parents)) = legs.split_last() else {
        // The whole document.
        return match (op, value) {
            (JsonDiffOperation::REPLACE, Some(v)) => {
                *doc = v;
                Ok(())
            }
            _ => Err(format!("partial JSON update: {op:?} of the whole document")),
        };
    };
    let mut parent = &mut *doc;
    for leg in parents {
        parent = child_mut(parent, leg).ok_or_else(missing)?;
    }
    match (op, last, parent) {
        (JsonDiffOperation::REPLACE, leg, p) => {
            let slot = child_mut(p, leg).ok_or_else(missing)?;
            *slot = value.ok_or_else(|| {
                format!("partial JSON update: REPLACE at `{path}` without a value")
            })?;
        }
        (JsonDiffOperation::INSERT, Leg::Member(k), Json::Object(m)) => {
            let v = value.ok_or_else(|| {
                format!("partial JSON update: INSERT at `{path}` without a value")
            })?;
            m.entry(k.clone()).or_insert(v);
        }
        (JsonDiffOperation::INSERT, Leg::Index(i), Json::Array(a)) => {
            let v = value.ok_or_else(|| {
                format!("partial JSON update: INSERT at `{path}` without a value")
            })?;
            let at = (*i).min(a.len());
            a.insert(at, v);
        }
        (JsonDiffOperation::REMOVE, Leg::Member(k), Json::Object(m)) => {
            m.remove(k).ok_or_else(missing)?;
        }
        (JsonDiffOperation::REMOVE, Leg::Index(i), Json::Array(a)) => {
            if *i >= a.len() {
                return Err(missing());
            }
            a.remove(*i);
        }
        _ => {
            return Err(format!(
                "partial JSON update: {op:?} at `{path}` does not fit the before image"
            ));
        }
    }
    Ok(())
}

/// The after value of a JSON column from its before value (JSON text) and a partial update.
pub fn apply_diffs(before: Option<&str>, diffs: &[JsonDiff<'_>]) -> Result<String, String> {
    let before = before.ok_or("partial JSON update of a column whose before image is NULL")?;
    let mut doc: Json =
        serde_json::from_str(before).map_err(|e| format!("before image is not JSON: {e}"))?;
    for d in diffs {
        let value = match d.value() {
            Some(v) => Some(from_jsonb(v.clone())?),
            None => None,
        };
        apply_one(&mut doc, d.operation(), &d.path_str(), value)?;
    }
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A binlog JSON column value: `{"<key>": <opaque value>}` in MySQL's binary format.
    fn object_with_opaque(key: &str, field_type: u8, data: &[u8]) -> Json {
        use mysql_common::binlog::value::BinlogValue;
        use mysql_common::constants::ColumnType;
        use mysql_common::io::ParseBuf;
        let key_at = 4 + 4 + 3;
        let value_at = key_at + key.len();
        let mut obj = Vec::new();
        obj.extend_from_slice(&1u16.to_le_bytes()); // one member
        let size = value_at + 2 + data.len();
        obj.extend_from_slice(&(size as u16).to_le_bytes());
        obj.extend_from_slice(&(key_at as u16).to_le_bytes());
        obj.extend_from_slice(&(key.len() as u16).to_le_bytes());
        obj.push(0x0f); // opaque
        obj.extend_from_slice(&(value_at as u16).to_le_bytes());
        obj.extend_from_slice(key.as_bytes());
        obj.push(field_type);
        obj.push(data.len() as u8);
        obj.extend_from_slice(data);
        let mut column = ((obj.len() + 1) as u32).to_le_bytes().to_vec();
        column.push(0x00); // small object
        column.extend_from_slice(&obj);
        let meta = [4u8];
        let v: BinlogValue<'_> = ParseBuf(&column)
            .parse((ColumnType::MYSQL_TYPE_JSON, &meta[..], false, false))
            .unwrap();
        match v {
            BinlogValue::Jsonb(j) => from_jsonb(j).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn opaque_decimals_and_datetimes_in_binary_json_render_as_the_server_prints_them() {
        // JSON_OBJECT('price', 9.99): DECIMAL(3,2), packed: precision, scale, 0x89 0x63.
        assert_eq!(
            object_with_opaque("price", 246, &[3, 2, 0x89, 0x63]),
            json!({"price": 9.99})
        );
        // JSON_OBJECT('at', CAST('2024-05-01 10:00:00' AS DATETIME)): packed datetime.
        let ymd: i64 = ((2024 * 13 + 5) << 5) | 1;
        let hms: i64 = 10 << 12;
        let packed = ((ymd << 17) | hms) << 24;
        assert_eq!(
            object_with_opaque("at", 12, &packed.to_le_bytes()),
            json!({"at": "2024-05-01 10:00:00.000000"})
        );
    }

    #[test]
    fn paths_with_members_quoted_members_and_indexes_are_parsed() {
        assert_eq!(
            parse_path("$.a[2].\"b c\"").unwrap(),
            vec![
                Leg::Member("a".into()),
                Leg::Index(2),
                Leg::Member("b c".into())
            ]
        );
        assert_eq!(parse_path("$").unwrap(), vec![]);
        assert!(parse_path("a.b").is_err());
    }

    #[test]
    fn replace_insert_and_remove_give_the_servers_after_image() {
        let mut doc = json!({"name": "Neha", "tags": ["a", "c"], "age": 30});
        apply_one(
            &mut doc,
            JsonDiffOperation::REPLACE,
            "$.name",
            Some(json!("N")),
        )
        .unwrap();
        apply_one(
            &mut doc,
            JsonDiffOperation::INSERT,
            "$.tags[1]",
            Some(json!("b")),
        )
        .unwrap();
        apply_one(
            &mut doc,
            JsonDiffOperation::INSERT,
            "$.city",
            Some(json!("Pune")),
        )
        .unwrap();
        apply_one(&mut doc, JsonDiffOperation::REMOVE, "$.age", None).unwrap();
        assert_eq!(
            doc,
            json!({"name": "N", "tags": ["a", "b", "c"], "city": "Pune"})
        );
    }

    #[test]
    fn a_diff_on_a_path_the_before_image_lacks_is_an_error_not_a_guess() {
        let mut doc = json!({"a": 1});
        assert!(apply_one(&mut doc, JsonDiffOperation::REPLACE, "$.b", Some(json!(2))).is_err());
        assert!(apply_one(&mut doc, JsonDiffOperation::REMOVE, "$.b", None).is_err());
        assert!(apply_one(&mut doc, JsonDiffOperation::REMOVE, "$.a[3]", None).is_err());
        assert_eq!(doc, json!({"a": 1}));
    }
}
