//! Column character sets: from a collation id (binlog TABLE_MAP) or a charset name
//! (`information_schema`, snapshot) to one [`Charset`], so both paths give the same shape, and
//! the decoding of binlog text bytes in that charset.
//!
//! The snapshot reads text converted by the server (connection charset utf8mb4); the binlog
//! carries the column's own bytes. Decoding them like the server means knowing the charset of
//! each collation id, and ids differ between servers and versions (MySQL 8's `utf8mb4_0900_*`
//! are 255+, MariaDB 10.10+'s `uca1400` ones 2048+). So the source asks the server once per
//! session (`information_schema`), and only offline inspection falls back to the table of the
//! ids both servers share ([`Collations::builtin`]).
//!
//! Decoders: UTF-8 and the UTF-16/32 family by hand; the legacy charsets with the WHATWG
//! decoders of `encoding_rs` that match them (`latin2` → ISO-8859-2, `cp1251` → windows-1251,
//! `gbk`/`gb2312` → GBK, `sjis`/`cp932` → Shift_JIS, `big5` → Big5, …). Those tables agree with
//! MySQL's on every character of the charsets' standard repertoire; vendor extensions at the
//! edges (a few cp932 and Big5-HKSCS code points) may differ. A charset with no matching decoder
//! (`armscii8`, `keybcs2`, `geostd8`, `swe7`, `dec8`, `hp8`, `cp850`, `cp852`, `macce`) is refused
//! when the table's shape is read, on both paths: its text would otherwise become garbage.

use std::collections::HashMap;

use encoding_rs::Encoding;

use crate::events::Charset;

/// The charset of a MySQL charset name (`None`: `binary`, i.e. bytes). `Err`: a charset ecst
/// cannot decode.
pub fn of_name(name: &str) -> Result<Option<Charset>, String> {
    let lower = name.to_ascii_lowercase();
    Ok(Some(match lower.as_str() {
        "binary" => return Ok(None),
        "utf8" | "utf8mb3" | "utf8mb4" => Charset::Utf8,
        "latin1" => Charset::Latin1,
        "ascii" => Charset::Ascii,
        "utf16" | "ucs2" => Charset::Utf16Be,
        "utf16le" => Charset::Utf16Le,
        "utf32" => Charset::Utf32,
        other => match legacy_label(other) {
            Some(label) => Charset::Legacy(label),
            None => {
                return Err(format!(
                    "character set {name} has no decoder in ecst; convert the column (ALTER TABLE … CONVERT TO CHARACTER SET utf8mb4)"
                ));
            }
        },
    }))
}

/// The WHATWG label of a legacy MySQL charset, as a static name (stored in [`Charset`]).
fn legacy_label(mysql: &str) -> Option<&'static str> {
    Some(match mysql {
        "latin2" => "iso-8859-2",
        "latin5" => "windows-1254",
        "latin7" => "iso-8859-13",
        "cp1250" => "windows-1250",
        "cp1251" => "windows-1251",
        "cp1256" => "windows-1256",
        "cp1257" => "windows-1257",
        "cp866" => "ibm866",
        "koi8r" => "koi8-r",
        "koi8u" => "koi8-u",
        "greek" => "iso-8859-7",
        "hebrew" => "iso-8859-8",
        "tis620" => "windows-874",
        "macroman" => "macintosh",
        "gbk" | "gb2312" => "gbk",
        "gb18030" => "gb18030",
        "sjis" | "cp932" => "shift_jis",
        "ujis" | "eucjpms" => "euc-jp",
        "euckr" => "euc-kr",
        "big5" => "big5",
        _ => return None,
    })
}

/// Collation id → charset name, as the server knows them.
#[derive(Debug, Clone, Default)]
pub struct Collations {
    ids: HashMap<u16, String>,
    /// The built-in table, not a server's list.
    offline: bool,
}

impl Collations {
    /// From the server's `information_schema` (the ids its binlog writes).
    pub fn new(ids: HashMap<u16, String>) -> Self {
        Collations {
            ids,
            offline: false,
        }
    }

    /// The ids MySQL and MariaDB share (≤ 247), MySQL 8's `utf8mb4_0900_*` (255–323) and
    /// MariaDB's NO PAD variants (1024 + id): for offline inspection, where no server is asked.
    pub fn builtin() -> Self {
        let mut m = HashMap::new();
        let mut put = |ids: &[u16], name: &str| {
            for &id in ids {
                m.insert(id, name.to_string());
            }
        };
        put(&[1, 84], "big5");
        put(&[2, 9, 21, 27, 77], "latin2");
        put(&[5, 8, 15, 31, 47, 48, 49, 94], "latin1");
        put(&[7, 74], "koi8r");
        put(&[11, 65], "ascii");
        put(&[12, 91], "ujis");
        put(&[13, 88], "sjis");
        put(&[14, 23, 50, 51, 52], "cp1251");
        put(&[16, 71], "hebrew");
        put(&[18, 89], "tis620");
        put(&[19, 85], "euckr");
        put(&[20, 41, 42, 79], "latin7");
        put(&[22, 75], "koi8u");
        put(&[24, 86], "gb2312");
        put(&[25, 70], "greek");
        put(&[26, 34, 44, 66, 99], "cp1250");
        put(&[28, 87], "gbk");
        put(&[29, 58, 59], "cp1257");
        put(&[30, 78], "latin5");
        put(&[33, 76, 83, 223], "utf8mb3");
        put(&[35, 90, 159], "ucs2");
        put(&[36, 68], "cp866");
        put(&[39, 53], "macroman");
        put(&[45, 46], "utf8mb4");
        put(&[54, 55], "utf16");
        put(&[56, 62], "utf16le");
        put(&[57, 67], "cp1256");
        put(&[60, 61], "utf32");
        put(&[63], "binary");
        put(&[95, 96], "cp932");
        put(&[97, 98], "eucjpms");
        put(&[248, 249, 250], "gb18030");
        put(&(101..=124).collect::<Vec<_>>(), "utf16");
        put(&(128..=151).collect::<Vec<_>>(), "ucs2");
        put(&(160..=183).collect::<Vec<_>>(), "utf32");
        put(&(192..=215).collect::<Vec<_>>(), "utf8mb3");
        put(&(224..=247).collect::<Vec<_>>(), "utf8mb4");
        put(&(255..=323).collect::<Vec<_>>(), "utf8mb4");
        let nopad: Vec<(u16, String)> = m
            .iter()
            .filter(|(id, _)| **id < 256)
            .map(|(id, n)| (id + 1024, n.clone()))
            .collect();
        m.extend(nopad);
        Collations {
            ids: m,
            offline: true,
        }
    }

    /// The charset of collation `id`. `Err`: an id the server did not list, or a charset ecst
    /// cannot decode.
    pub fn charset(&self, id: u16) -> Result<Option<Charset>, String> {
        match self.ids.get(&id) {
            Some(name) => of_name(name),
            None if self.offline => Err(format!(
                "collation id {id} is not in the built-in table (offline, only the common ids are known)"
            )),
            None => Err(format!("collation id {id} is not listed by the server")),
        }
    }
}

/// Decodes column bytes in `cs` (the binlog path). Invalid sequences are replaced, and the
/// count of replacements is returned so the caller can say so.
pub fn decode(bytes: &[u8], cs: Charset) -> (String, bool) {
    match cs {
        Charset::Utf8 => match String::from_utf8(bytes.to_vec()) {
            Ok(s) => (s, false),
            Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), true),
        },
        Charset::Latin1 | Charset::Ascii => (super::decode::decode_latin1(bytes), false),
        Charset::Utf16Be | Charset::Utf16Le => {
            let units: Vec<u16> = bytes
                .chunks(2)
                .map(|c| {
                    let pair = [
                        c.first().copied().unwrap_or(0),
                        c.get(1).copied().unwrap_or(0),
                    ];
                    if cs == Charset::Utf16Be {
                        u16::from_be_bytes(pair)
                    } else {
                        u16::from_le_bytes(pair)
                    }
                })
                .collect();
            let odd = bytes.len() % 2 != 0;
            match String::from_utf16(&units) {
                Ok(s) => (s, odd),
                Err(_) => (String::from_utf16_lossy(&units), true),
            }
        }
        Charset::Utf32 => {
            let mut bad = bytes.len() % 4 != 0;
            let s = bytes
                .chunks(4)
                .map(|c| {
                    let mut q = [0u8; 4];
                    q[..c.len()].copy_from_slice(c);
                    char::from_u32(u32::from_be_bytes(q)).unwrap_or_else(|| {
                        bad = true;
                        char::REPLACEMENT_CHARACTER
                    })
                })
                .collect();
            (s, bad)
        }
        Charset::Legacy(label) => match Encoding::for_label(label.as_bytes()) {
            Some(enc) => {
                let (s, had_errors) = enc.decode_without_bom_handling(bytes);
                (s.into_owned(), had_errors)
            }
            None => (String::from_utf8_lossy(bytes).into_owned(), true),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_supported_charset_decodes_its_own_bytes() {
        let cases: &[(&str, &[u8], &str)] = &[
            ("latin2", &[0x50, 0xf8, 0xed, 0x6c, 0x69, 0xb9], "Příliš"),
            ("cp1251", &[0xcf, 0xf0, 0xe8, 0xe2, 0xe5, 0xf2], "Привет"),
            ("gbk", &[0xc4, 0xe3, 0xba, 0xc3], "你好"),
            ("sjis", &[0x82, 0xb1, 0x82, 0xf1], "こん"),
            ("big5", &[0xa7, 0x41, 0xa6, 0x6e], "你好"),
            ("utf16", &[0x00, 0x41, 0xd8, 0x3d, 0xde, 0x00], "A😀"),
            ("ucs2", &[0x04, 0x1f, 0x00, 0x21], "П!"),
            ("utf16le", &[0x41, 0x00], "A"),
            ("utf32", &[0x00, 0x01, 0xf6, 0x00], "😀"),
            ("latin1", &[0x63, 0x61, 0x66, 0xe9, 0x80], "café€"),
        ];
        for (name, bytes, want) in cases {
            let cs = of_name(name).unwrap().unwrap();
            assert_eq!(decode(bytes, cs), (want.to_string(), false), "{name}");
        }
    }

    #[test]
    fn charsets_without_a_decoder_and_unknown_collations_are_refused_not_guessed() {
        assert!(of_name("armscii8").is_err());
        assert_eq!(of_name("binary"), Ok(None));
        let builtin = Collations::builtin();
        assert_eq!(builtin.charset(255), Ok(Some(Charset::Utf8)));
        assert_eq!(builtin.charset(1024 + 8), Ok(Some(Charset::Latin1)));
        assert_eq!(
            builtin.charset(51),
            Ok(Some(Charset::Legacy("windows-1251")))
        );
        assert!(builtin.charset(2304).is_err());
    }
}
