//! MariaDB's compressed binlog events (`log_bin_compress = ON`): QUERY_COMPRESSED_EVENT (165)
//! and the compressed rows events (166–168, and 169–171 for the version-2 layout), turned back
//! into the plain events they compress, so the decoder handles them exactly as it handles
//! uncompressed ones — a compressed TRUNCATE or ALTER is the same lifecycle event or schema
//! change, a compressed row the same change.
//!
//! Layout (MariaDB `binlog_buf_compress`): the part of the event that can be large is replaced
//! by one header byte `0x80 | n` (`n` = bytes of the length that follows, 1–4; bits 4–6: the
//! algorithm, 0 = zlib), the uncompressed length in `n` bytes, big-endian, and a zlib stream.
//! For a query event that part is the statement text (after the post-header, the status
//! variables and the NUL-terminated default database); for a rows event, the rows (after the
//! post-header, the column count and the column bitmaps). Everything else is kept byte for byte,
//! and the event keeps its header (timestamp, server id, end position, flags) with the plain
//! type and the new size. Its CRC32 was checked on the compressed bytes, as the server wrote
//! them.
//!
//! Bounds: the declared length is checked against the largest event the reader takes (1 GiB)
//! before anything is allocated, and the zlib stream must produce exactly that many bytes.

use std::io::Read;

use mysql_common::binlog::events::{Event, FormatDescriptionEvent};

use super::decoder::read_framed;

/// QUERY_COMPRESSED_EVENT.
pub const QUERY_COMPRESSED: u8 = 165;
/// The first and last compressed rows event types.
pub const ROWS_COMPRESSED: std::ops::RangeInclusive<u8> = 166..=171;

const QUERY_EVENT: u8 = 2;
/// A query event's post-header: thread id (4), exec time (4), db length (1), error code (2),
/// status variables length (2).
const QUERY_POST_HEADER: usize = 13;
/// A rows event's post-header: table id (6) and flags (2); version 2 adds the extra data length.
const ROWS_POST_HEADER: usize = 8;
const HEADER_LEN: usize = 19;
/// The largest event the binlog reader takes (the server's own limit for a replicated event).
const MAX_EVENT_BYTES: usize = 1 << 30;

/// Whether `etype` is one of MariaDB's compressed events.
pub fn is_compressed(etype: u8) -> bool {
    etype == QUERY_COMPRESSED || ROWS_COMPRESSED.contains(&etype)
}

/// The plain event a compressed one stands for; `Err` says what is wrong with it.
pub fn uncompress(event: &Event) -> Result<Event, String> {
    let header = event.header();
    let etype = header.event_type_raw();
    let data = event.data();
    let (plain_type, kept) = if etype == QUERY_COMPRESSED {
        (QUERY_EVENT, query_prefix(data)?)
    } else if ROWS_COMPRESSED.contains(&etype) {
        // 166–168 → WRITE/UPDATE/DELETE_ROWS_EVENT_V1 (23–25); 169–171 → the v2 ones (30–32).
        let plain = if etype <= 168 {
            etype - 143
        } else {
            etype - 139
        };
        (plain, rows_prefix(data, etype)?)
    } else {
        return Err(format!("event type {etype} is not a compressed one"));
    };
    let (head, packed) = data.split_at(kept);
    let body = unpack(packed)?;
    let size = HEADER_LEN + head.len() + body.len();
    if size > MAX_EVENT_BYTES {
        return Err(format!("it uncompresses to {size} bytes, more than 1 GiB"));
    }
    let mut bytes = Vec::with_capacity(size);
    bytes.extend_from_slice(&header.timestamp().to_le_bytes());
    bytes.push(plain_type);
    bytes.extend_from_slice(&header.server_id().to_le_bytes());
    bytes.extend_from_slice(&(size as u32).to_le_bytes());
    bytes.extend_from_slice(&header.log_pos().to_le_bytes());
    bytes.extend_from_slice(&header.flags_raw().to_le_bytes());
    bytes.extend_from_slice(head);
    bytes.extend_from_slice(&body);
    // The plain event carries no checksum of its own.
    let mut footer = event.footer();
    footer.set_checksum_enabled(false);
    let fde: FormatDescriptionEvent<'static> = event.fde().clone().with_footer(footer);
    read_framed(&fde, &mut &bytes[..])
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "it uncompresses to nothing".to_string())
}

/// Bytes of a compressed query event before its compressed statement text.
fn query_prefix(data: &[u8]) -> Result<usize, String> {
    let short = || "a compressed query event shorter than its post-header".to_string();
    let db_len = usize::from(*data.get(8).ok_or_else(short)?);
    let status_len = data
        .get(11..13)
        .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
        .ok_or_else(short)?;
    let end = QUERY_POST_HEADER + status_len + db_len + 1;
    if end > data.len() {
        return Err(format!(
            "a compressed query event of {} bytes declares {end} before its text",
            data.len()
        ));
    }
    Ok(end)
}

/// Bytes of a compressed rows event before its compressed rows.
fn rows_prefix(data: &[u8], etype: u8) -> Result<usize, String> {
    let short = |what: &str| format!("a compressed rows event ends inside its {what}");
    let mut at = ROWS_POST_HEADER;
    if etype >= 169 {
        // Version 2: the extra data length counts its own two bytes.
        let extra = data
            .get(at..at + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
            .ok_or_else(|| short("post-header"))?;
        at += extra.max(2);
    }
    let (columns, width) = lenenc(data.get(at..).ok_or_else(|| short("post-header"))?)
        .ok_or_else(|| short("column count"))?;
    at += width;
    let bitmap = usize::try_from(columns.div_ceil(8)).map_err(|e| e.to_string())?;
    // UPDATE_ROWS_COMPRESSED(_V1) carry the before and the after image's bitmaps.
    let bitmaps = if etype == 167 || etype == 170 { 2 } else { 1 };
    at = at
        .checked_add(bitmap * bitmaps)
        .filter(|&end| end <= data.len())
        .ok_or_else(|| short("column bitmaps"))?;
    Ok(at)
}

/// A length-encoded integer and its width.
fn lenenc(b: &[u8]) -> Option<(u64, usize)> {
    let first = *b.first()?;
    let width = match first {
        0..=0xfa => return Some((u64::from(first), 1)),
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        _ => return None,
    };
    let bytes = b.get(1..=width)?;
    let mut v = 0u64;
    for (i, x) in bytes.iter().enumerate() {
        v |= u64::from(*x) << (8 * i);
    }
    Some((v, width + 1))
}

/// The bytes a compressed part stands for (see the module note).
fn unpack(packed: &[u8]) -> Result<Vec<u8>, String> {
    let (&head, rest) = packed.split_first().ok_or("the compressed part is empty")?;
    let algorithm = (head >> 4) & 0x07;
    if algorithm != 0 {
        return Err(format!(
            "compression algorithm {algorithm} (only zlib, 0, exists)"
        ));
    }
    let n = usize::from(head & 0x07);
    if !(1..=4).contains(&n) || rest.len() < n {
        return Err(format!(
            "a length of {n} bytes in the compression header {head:#04x}"
        ));
    }
    let (len, stream) = rest.split_at(n);
    let len = len
        .iter()
        .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    if len > MAX_EVENT_BYTES {
        return Err(format!(
            "it declares {len} uncompressed bytes, more than 1 GiB"
        ));
    }
    let mut out = Vec::with_capacity(len);
    flate2::read::ZlibDecoder::new(stream)
        .take(len as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("zlib: {e}"))?;
    if out.len() != len {
        return Err(format!(
            "it uncompresses to {} bytes, its header says {len}",
            out.len()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn packed(plain: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(plain).expect("compresses");
        let stream = z.finish().expect("compresses");
        let len = u32::try_from(plain.len()).expect("small");
        let mut out = vec![0x80 | 3];
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&stream);
        out
    }

    #[test]
    fn a_compressed_part_uncompresses_to_its_declared_length_and_nothing_else() {
        let text = b"ALTER TABLE t ADD COLUMN c INT NOT NULL DEFAULT 1 COMMENT 'a long comment'";
        assert_eq!(unpack(&packed(text)).as_deref(), Ok(&text[..]));
        // A length that lies, an unknown algorithm, a cut stream: refused, never guessed.
        let mut lying = packed(text);
        lying[3] = lying[3].wrapping_add(1);
        assert!(unpack(&lying).unwrap_err().contains("its header says"));
        let mut lzma = packed(text);
        lzma[0] = 0x80 | 0x10 | 3;
        assert!(unpack(&lzma).unwrap_err().contains("algorithm 1"));
        let cut = packed(text);
        assert!(unpack(&cut[..cut.len() - 6]).is_err());
        assert!(
            unpack(&[0x80 | 4, 0x7f, 0xff, 0xff, 0xff])
                .unwrap_err()
                .contains("more than 1 GiB")
        );
        assert!(unpack(&[]).is_err());
    }

    #[test]
    fn the_kept_prefix_of_a_rows_event_ends_after_its_column_bitmaps() {
        // table id, flags, 10 columns, one bitmap of 2 bytes (write) or two (update).
        let mut data = vec![1, 0, 0, 0, 0, 0, 0, 0, 10, 0xff, 0x03];
        assert_eq!(rows_prefix(&data, 166), Ok(11));
        assert!(
            rows_prefix(&data, 167).is_err(),
            "the update's second bitmap is missing"
        );
        data.extend_from_slice(&[0xff, 0x03]);
        assert_eq!(rows_prefix(&data, 167), Ok(13));
        // Version 2: the extra data (length 2: none) before the column count.
        let v2 = [1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 10, 0xff, 0x03];
        assert_eq!(rows_prefix(&v2, 169), Ok(13));
    }

    #[test]
    fn the_kept_prefix_of_a_query_event_ends_after_its_default_database() {
        // post-header with db length 4 and 3 bytes of status variables, then "test\0".
        let mut data = vec![0; 13];
        data[8] = 4;
        data[11] = 3;
        data.extend_from_slice(&[1, 2, 3]);
        data.extend_from_slice(b"test\0");
        assert_eq!(query_prefix(&data), Ok(21));
        assert!(query_prefix(&data[..20]).is_err());
        assert!(query_prefix(&data[..5]).is_err());
    }
}
