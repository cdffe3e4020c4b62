//! `ecst inspect-binlog FILE…`: binlog files decoded offline through the source's own decoder
//! ([`crate::source::decoder`]) and encoder, one JSON line per change — what `mysqlbinlog -v` is
//! to MySQL, for users debugging a stream and for tests over binlogs recorded from servers we
//! cannot run here (MySQL 8.x, 9.x).
//!
//! Correctness: the file is read as the server would send it — the same events, the same
//! decoder state machine, the same refusals — so a file that `inspect-binlog` decodes is decoded
//! identically by the source, and one it refuses stops the source with the same error. Two
//! things differ and are said so: no server is asked for NOT NULL column defaults (they only
//! shape the Avro schema, never a value), and a TRUNCATE of a table no TABLE_MAP has shown is
//! printed without columns. Each change is also encoded with the source's Avro encoder (key and
//! envelope), so a value the topic could not carry fails here as it would in the source.
//!
//! Events are framed before they are parsed (header, declared size, exactly that many bytes):
//! a truncated or corrupt file is an error naming the file and offset, never a panic. Memory is
//! one event at a time (a compressed transaction is decompressed as a stream).

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mysql_common::binlog::consts::BinlogVersion;
use mysql_common::binlog::events::{Event, FormatDescriptionEvent};
use serde_json::{Map, Value as Json, json};

use crate::error::{Classify, ErrorClass};
use crate::events::avro::{TableAvro, encode_envelope, encode_key};
use crate::events::{ChangeEvent, ColumnKind, TableSchema, Value};
use crate::offsets::BinlogPosition;
use crate::source::SourceError;
use crate::source::SourceMsg;
use crate::source::charset::Collations;
use crate::source::decoder::{Capture, Catalog, Decoder, Emit, read_framed};
use crate::source::xa::PreparedScan;

/// The binlog file magic.
const MAGIC: [u8; 4] = [0xfe, b'b', b'i', b'n'];
const FORMAT_DESCRIPTION_EVENT: u8 = 15;

/// Errors of `inspect-binlog` (all definite: a file does not change by retrying).
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The file cannot be opened or read.
    #[error("{file}: {source}")]
    Io {
        /// File.
        file: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file does not start with the binlog magic.
    #[error("{file}: not a binlog file (no \\xfebin magic)")]
    NotABinlog {
        /// File.
        file: String,
    },
    /// An event cannot be framed or parsed.
    #[error("{file}: event at offset {offset}: {detail}")]
    Event {
        /// File.
        file: String,
        /// Offset of the event's start.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// The source's decoder refused an event: the source would stop here with this error.
    #[error("{file}: {source}")]
    Refused {
        /// File.
        file: String,
        /// The source's error.
        source: SourceError,
    },
    /// Printing failed (a closed pipe).
    #[error("output: {0}")]
    Output(std::io::Error),
}

impl Classify for InspectError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Definite
    }
}

/// What to print besides changes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Also print each transaction boundary (`{"commit": …}`): the positions the source stores.
    pub commits: bool,
    /// Decode tables whose binlog has no column names (`binlog_row_metadata = MINIMAL`) with
    /// names `@1`…`@N`, where the source refuses them.
    pub positional: bool,
}

/// Nothing is known offline: no defaults, the collation ids both servers share, and a truncated
/// table unseen so far has no columns. The binlog at hand is the files given, up to the one
/// being read (the last of `files`).
struct Offline<'p> {
    files: &'p [PathBuf],
}

impl Catalog for Offline<'_> {
    async fn add_defaults(&mut self, _schema: &mut TableSchema) -> Result<(), SourceError> {
        Ok(())
    }

    async fn collations(&mut self) -> Result<Collations, SourceError> {
        Ok(Collations::builtin())
    }

    async fn shape(&mut self, db: &str, table: &str) -> Result<TableSchema, SourceError> {
        Ok(TableSchema {
            db: db.to_string(),
            table: table.to_string(),
            columns: Vec::new(),
            key: Vec::new(),
        })
    }

    /// Searched in the files given, from the one being read (up to `before`) backwards; where
    /// the source reads from `from`, this reads the whole file, with the same result.
    async fn prepared_xa(
        &mut self,
        xid: &str,
        _from: Option<&BinlogPosition>,
        before: &BinlogPosition,
    ) -> Result<Option<Vec<Event>>, SourceError> {
        let unreadable = |e: Box<InspectError>| SourceError::Unsupported {
            what: format!("an earlier file, searched for XA transaction {xid}: {e}"),
            fix: "give only binlog files".into(),
            position: before.clone(),
        };
        for (i, path) in self.files.iter().enumerate().rev() {
            let current = i + 1 == self.files.len();
            let mut reader = FileReader::open(path).map_err(unreadable)?;
            let mut scan = PreparedScan::new(xid);
            while let Some((event, start)) = reader.next().map_err(unreadable)? {
                let end = start + u64::from(event.header().event_size());
                if current && end > before.pos {
                    break;
                }
                let at = BinlogPosition {
                    file: reader.name.clone(),
                    pos: end,
                };
                scan.feed(&event, &at)?;
            }
            if let Some(found) = scan.finish() {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }
}

/// A binlog file's events, framed one at a time (see the module note).
struct FileReader {
    file: String,
    /// The file's name, as the decoder names positions in it.
    name: String,
    input: BufReader<std::fs::File>,
    fde: FormatDescriptionEvent<'static>,
    offset: u64,
}

impl FileReader {
    fn open(path: &Path) -> Result<Self, Box<InspectError>> {
        let file = path.display().to_string();
        let mut input =
            BufReader::new(
                std::fs::File::open(path).map_err(|source| InspectError::Io {
                    file: file.clone(),
                    source,
                })?,
            );
        let mut magic = [0u8; 4];
        input
            .read_exact(&mut magic)
            .map_err(|_| InspectError::NotABinlog { file: file.clone() })?;
        if magic != MAGIC {
            return Err(Box::new(InspectError::NotABinlog { file }));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.clone());
        Ok(FileReader {
            file,
            name,
            input,
            fde: FormatDescriptionEvent::new(BinlogVersion::Version4),
            offset: 4,
        })
    }

    /// The next event and the offset it starts at; `None` at the file's end.
    fn next(&mut self) -> Result<Option<(Event, u64)>, Box<InspectError>> {
        let bad = |offset, detail: String| InspectError::Event {
            file: self.file.clone(),
            offset,
            detail,
        };
        let start = self.offset;
        let event = match read_framed(&self.fde, &mut self.input) {
            Ok(Some(e)) => e,
            Ok(None) => return Ok(None),
            Err(e) => return Err(Box::new(bad(start, e.to_string()))),
        };
        if event.header().event_type_raw() == FORMAT_DESCRIPTION_EVENT {
            self.fde = event
                .read_event::<FormatDescriptionEvent<'_>>()
                .map_err(|e| bad(start, e.to_string()))?
                .into_owned()
                .with_footer(event.footer());
        }
        self.offset += u64::from(event.header().event_size());
        Ok(Some((event, start)))
    }
}

/// Prints messages as JSON lines.
struct Printer<'w, W: Write> {
    out: &'w mut W,
    opts: Options,
    /// Avro schemas per table shape (encoding checks every change as the source would).
    avro: Vec<(Arc<TableSchema>, TableAvro)>,
    printed: u64,
}

impl<W: Write + Send> Emit for Printer<'_, W> {
    async fn emit(&mut self, msg: SourceMsg) -> Result<(), SourceError> {
        match msg {
            SourceMsg::Changes(evs) => {
                for ev in evs {
                    self.check_encoding(&ev)?;
                    let line = change_json(&ev).to_string();
                    writeln!(self.out, "{line}").map_err(|e| SourceError::Task(e.to_string()))?;
                    self.printed += 1;
                }
            }
            SourceMsg::Commit {
                position,
                gtid,
                ts_ms,
                ..
            } => {
                if self.opts.commits {
                    let line = json!({"commit": {"file": position.file, "pos": position.pos, "gtid": gtid, "ts_ms": ts_ms}});
                    writeln!(self.out, "{line}").map_err(|e| SourceError::Task(e.to_string()))?;
                }
            }
            SourceMsg::SnapshotProgress(_)
            | SourceMsg::SnapshotDone { .. }
            | SourceMsg::OnlineProgress { .. }
            | SourceMsg::Split(_) => {}
        }
        Ok(())
    }
}

impl<W: Write> Printer<'_, W> {
    fn check_encoding(&mut self, ev: &ChangeEvent) -> Result<(), SourceError> {
        if ev.schema.columns.is_empty() {
            return Ok(());
        }
        if !self.avro.iter().any(|(s, _)| Arc::ptr_eq(s, &ev.schema)) {
            let derived = TableAvro::derive("inspect", &ev.schema)?;
            self.avro.push((ev.schema.clone(), derived));
        }
        let mut buf = Vec::new();
        if !ev.schema.key.is_empty() {
            encode_key(&mut buf, &ev.schema, &ev.key())?;
        }
        buf.clear();
        encode_envelope(&mut buf, "inspect", ev, ev.source.ts_ms)?;
        Ok(())
    }
}

/// A value as JSON, readable: exact decimals and dates as text, bytes as hex.
fn value_json(kind: &ColumnKind, v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Int(x) => json!(x),
        Value::Long(x) => json!(x),
        Value::Float(x) => json!(x),
        Value::Double(x) => json!(x),
        Value::Decimal(s) | Value::String(s) => Json::String(s.clone()),
        Value::Date(days) => {
            Json::String(civil(i64::from(*days) * 86_400_000_000)[..10].to_string())
        }
        Value::Micros(us) => {
            let text = civil(*us);
            Json::String(if matches!(kind, ColumnKind::Timestamp) {
                format!("{text}Z")
            } else {
                text
            })
        }
        Value::TimeMicros(us) => {
            let sign = if *us < 0 { "-" } else { "" };
            let a = us.unsigned_abs();
            Json::String(format!("{sign}{}", clock(a / 1_000_000, a % 1_000_000)))
        }
        Value::Bytes(b) => {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            Json::String(format!("0x{hex}"))
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.ffffff]` of microseconds since the epoch.
fn civil(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let frac = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Inverse of days_from_civil (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{}",
        clock(sod.unsigned_abs(), frac.unsigned_abs())
    )
}

/// `HH:MM:SS[.ffffff]` (hours may exceed 24, as in a TIME).
fn clock(secs: u64, micros: u64) -> String {
    let mut t = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if micros != 0 {
        t.push_str(&format!(".{micros:06}"));
    }
    t
}

fn row_json(schema: &TableSchema, row: &[Value]) -> Json {
    let mut m = Map::new();
    for (c, v) in schema.columns.iter().zip(row) {
        m.insert(c.name.clone(), value_json(&c.kind, v));
    }
    Json::Object(m)
}

/// One change as a JSON object.
pub fn change_json(ev: &ChangeEvent) -> Json {
    let s = &ev.schema;
    let key = if s.key.is_empty() {
        Json::Null
    } else {
        let mut m = Map::new();
        for (&i, v) in s.key.iter().zip(ev.key()) {
            if let Some(c) = s.columns.get(i) {
                m.insert(c.name.clone(), value_json(&c.kind, &v));
            }
        }
        Json::Object(m)
    };
    json!({
        "op": ev.op.code(),
        "table": s.qualified_name(),
        "key": key,
        "before": ev.before.as_deref().map(|r| row_json(s, r)),
        "after": ev.after.as_deref().map(|r| row_json(s, r)),
        "position": {"file": &*ev.source.file, "pos": ev.source.pos, "row": ev.source.row},
        "gtid": ev.source.gtid.as_deref(),
        "server_id": ev.source.server_id,
        "ts_ms": ev.source.ts_ms,
    })
}

/// Reads `path`'s events through the decoder, printing changes to `out`. Returns the number of
/// changes printed.
pub async fn inspect_file<W: Write + Send>(
    path: &Path,
    opts: Options,
    out: &mut W,
) -> Result<u64, InspectError> {
    inspect_last(&[path.to_path_buf()], opts, out).await
}

/// [`inspect_file`] of the last of `files`; the others are the binlog before it (an XA
/// transaction committed in it may have been prepared there).
async fn inspect_last<W: Write + Send>(
    files: &[PathBuf],
    opts: Options,
    out: &mut W,
) -> Result<u64, InspectError> {
    let Some(path) = files.last() else {
        return Ok(0);
    };
    let mut reader = FileReader::open(path).map_err(|e| *e)?;
    let file = reader.file.clone();
    let start = BinlogPosition {
        file: reader.name.clone(),
        pos: 4,
    };
    let mut decoder = Decoder::new(Capture::All, &start, 0, None);
    if opts.positional {
        decoder = decoder.with_positional_names();
    }
    let mut printer = Printer {
        out,
        opts,
        avro: Vec::new(),
        printed: 0,
    };
    let mut catalog = Offline { files };
    while let Some((event, _)) = reader.next().map_err(|e| *e)? {
        decoder
            .on_event(&event, true, &mut catalog, &mut printer)
            .await
            .map_err(|source| match source {
                SourceError::Task(detail) => InspectError::Output(std::io::Error::other(detail)),
                source => InspectError::Refused {
                    file: file.clone(),
                    source,
                },
            })?;
    }
    printer.out.flush().map_err(InspectError::Output)?;
    Ok(printer.printed)
}

/// Inspects each file in turn; stops at the first error (after printing what came before it).
pub async fn inspect<W: Write + Send>(
    paths: &[PathBuf],
    opts: Options,
    out: &mut W,
) -> Result<u64, InspectError> {
    let mut n = 0;
    for i in 0..paths.len() {
        n += inspect_last(&paths[..=i], opts, out).await?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_dates_render_like_the_server_prints_them() {
        assert_eq!(civil(0), "1970-01-01T00:00:00");
        assert_eq!(civil(253_402_300_799_999_999), "9999-12-31T23:59:59.999999");
        let t = value_json(
            &ColumnKind::Time,
            &Value::TimeMicros(-((507 * 3600 + 48 * 60 + 27) * 1_000_000)),
        );
        assert_eq!(t, json!("-507:48:27"));
        assert_eq!(
            value_json(&ColumnKind::Date, &Value::Date(-1)),
            json!("1969-12-31")
        );
    }
}
