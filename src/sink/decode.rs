//! Kafka message → [`DecodedEvent`]: Confluent framing, writer schema from the registry, Avro
//! datum, then BSON with the types kept faithfully:
//!
//! | Avro                          | BSON                                            |
//! |-------------------------------|-------------------------------------------------|
//! | int / long                    | Int32 / Int64                                   |
//! | float / double                | Double                                          |
//! | decimal(p,s)                  | Decimal128 (exact, ≤ 34 digits), else String    |
//! | date                          | Date (midnight UTC)                             |
//! | timestamp-/local-timestamp-µs | Date (BSON keeps milliseconds)                  |
//! | bytes / fixed                 | Binary                                          |
//! | string / enum / uuid          | String                                          |
//!
//! Any Confluent-compatible producer's envelope decodes (Debezium's too): the version of a
//! change comes from `source.file`, `source.pos` and `source.row`.

use std::collections::HashMap;

use apache_avro::Schema;
use apache_avro::schema::{Name, ResolvedSchema};
use apache_avro::types::Value as Av;
use bson::{Bson, Document};
use num_bigint::{BigInt, Sign};

use crate::events::registry::{FrameError, Registry, RegistryError, unframe};
use crate::events::{
    HEADER_EPOCH, HEADER_NEW_KEY, HEADER_OLD_KEY, HEADER_READ_TS, HEADER_SOURCE_TS, Op,
};
use crate::offsets::version_of;

/// Why a message could not be decoded. Every variant except `Registry(Unavailable)` is definite
/// and sends the message to the dead-letter topic.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Framing.
    #[error("{part}: {source}")]
    Frame {
        /// `key` or `value`.
        part: &'static str,
        /// Cause.
        #[source]
        source: FrameError,
    },
    /// Registry look-up.
    #[error("{part}: {source}")]
    Registry {
        /// `key` or `value`.
        part: &'static str,
        /// Cause.
        #[source]
        source: RegistryError,
    },
    /// Avro datum does not match its writer schema.
    #[error("{part}: avro datum does not decode with schema id {id}: {detail}")]
    Avro {
        /// `key` or `value`.
        part: &'static str,
        /// Schema id.
        id: u32,
        /// Detail.
        detail: String,
    },
    /// The value is not a change envelope.
    #[error("not a change envelope: {0}")]
    Envelope(String),
}

/// One decoded change.
#[derive(Debug, Clone)]
pub struct DecodedEvent {
    /// Operation.
    pub op: Op,
    /// Key fields.
    pub key: Document,
    /// Row before (u, d).
    pub before: Option<Document>,
    /// Row after (c, u, r).
    pub after: Option<Document>,
    /// Order-preserving version (see `offsets::version_of`).
    pub version: String,
    /// Source commit time (ms) from the header, if present.
    pub source_ts_ms: Option<i64>,
    /// Time ecst read the change from the binlog (ms), if present.
    pub read_ts_ms: Option<i64>,
    /// Old key of a primary-key change (on the create half).
    pub old_key: Option<Document>,
    /// New key of a primary-key change (on the delete half).
    pub new_key: Option<Document>,
}

/// Decodes framed Avro with a cached writer schema into an Avro value and its schema.
async fn decode_framed(
    registry: &Registry,
    part: &'static str,
    bytes: &[u8],
) -> Result<(Av, std::sync::Arc<Schema>), DecodeError> {
    let (id, mut datum) = unframe(bytes).map_err(|source| DecodeError::Frame { part, source })?;
    let schema = registry
        .schema(id)
        .await
        .map_err(|source| DecodeError::Registry { part, source })?;
    // `from_avro_datum` is deprecated in 0.22 in favour of a builder with the same behaviour.
    #[allow(deprecated)]
    let v =
        apache_avro::from_avro_datum(&schema, &mut datum, None).map_err(|e| DecodeError::Avro {
            part,
            id,
            detail: e.to_string(),
        })?;
    Ok((v, schema))
}

/// Encodes an unscaled integer and scale as IEEE 754-2008 decimal128 (BID), if it fits exactly.
pub fn decimal128(unscaled: &BigInt, scale: u32) -> Option<bson::Decimal128> {
    let (sign, mag) = unscaled.clone().into_parts();
    let digits = mag.to_u128()?;
    if digits >= 10u128.pow(34) || scale > 6176 {
        return None;
    }
    let exp = (6176i64 - i64::from(scale)) as u128;
    let mut bits = (exp << 113) | digits;
    if sign == Sign::Minus {
        bits |= 1u128 << 127;
    }
    Some(bson::Decimal128::from_bytes(bits.to_le_bytes()))
}

trait ToU128 {
    fn to_u128(&self) -> Option<u128>;
}
impl ToU128 for num_bigint::BigUint {
    fn to_u128(&self) -> Option<u128> {
        let digits = self.to_u64_digits();
        match digits.len() {
            0 => Some(0),
            1 => Some(u128::from(digits[0])),
            2 => Some(u128::from(digits[0]) | (u128::from(digits[1]) << 64)),
            _ => None,
        }
    }
}

struct Converter<'a> {
    names: HashMap<Name, &'a Schema>,
}

impl<'a> Converter<'a> {
    fn resolve(&self, s: &'a Schema) -> &'a Schema {
        match s {
            Schema::Ref { name } => self.names.get(name).copied().unwrap_or(s),
            other => other,
        }
    }

    fn to_bson(&self, v: &Av, schema: &'a Schema) -> Bson {
        let schema = self.resolve(schema);
        match (v, schema) {
            (Av::Union(i, inner), Schema::Union(u)) => match u.variants().get(*i as usize) {
                Some(s) => self.to_bson(inner, s),
                None => self.to_bson(inner, &Schema::Null),
            },
            (Av::Union(_, inner), s) => self.to_bson(inner, s),
            (Av::Null, _) => Bson::Null,
            (Av::Boolean(b), _) => Bson::Boolean(*b),
            (Av::Int(i), _) => Bson::Int32(*i),
            (Av::Long(l), _) => Bson::Int64(*l),
            (Av::Float(f), _) => Bson::Double(f64::from(*f)),
            (Av::Double(d), _) => Bson::Double(*d),
            (Av::String(s), _) | (Av::Enum(_, s), _) => Bson::String(s.clone()),
            (Av::Bytes(b), _) | (Av::Fixed(_, b), _) => Bson::Binary(bson::Binary {
                subtype: bson::spec::BinarySubtype::Generic,
                bytes: b.clone(),
            }),
            (Av::Decimal(d), Schema::Decimal(ds)) => {
                let unscaled = BigInt::from(d.clone());
                let scale = ds.scale as u32;
                match decimal128(&unscaled, scale) {
                    Some(x) => Bson::Decimal128(x),
                    None => Bson::String(decimal_text(&unscaled, scale)),
                }
            }
            (Av::Decimal(d), _) => Bson::String(BigInt::from(d.clone()).to_string()),
            (Av::BigDecimal(b), _) => Bson::String(b.to_string()),
            (Av::Date(days), _) => {
                Bson::DateTime(bson::DateTime::from_millis(i64::from(*days) * 86_400_000))
            }
            (Av::TimestampMillis(ms), _) | (Av::LocalTimestampMillis(ms), _) => {
                Bson::DateTime(bson::DateTime::from_millis(*ms))
            }
            (Av::TimestampMicros(us), _) | (Av::LocalTimestampMicros(us), _) => {
                Bson::DateTime(bson::DateTime::from_millis(us.div_euclid(1_000)))
            }
            (Av::TimestampNanos(ns), _) | (Av::LocalTimestampNanos(ns), _) => {
                Bson::DateTime(bson::DateTime::from_millis(ns.div_euclid(1_000_000)))
            }
            (Av::TimeMillis(ms), _) => Bson::Int32(*ms),
            (Av::TimeMicros(us), _) => Bson::Int64(*us),
            (Av::Uuid(u), _) => Bson::String(u.to_string()),
            (Av::Record(fields), Schema::Record(rs)) => {
                let mut doc = Document::new();
                for (name, fv) in fields {
                    let fs = rs
                        .fields
                        .iter()
                        .find(|f| &f.name == name)
                        .map(|f| &f.schema);
                    doc.insert(
                        name.clone(),
                        match fs {
                            Some(s) => self.to_bson(fv, s),
                            None => self.to_bson(fv, &Schema::Null),
                        },
                    );
                }
                Bson::Document(doc)
            }
            (Av::Record(fields), _) => {
                let mut doc = Document::new();
                for (name, fv) in fields {
                    doc.insert(name.clone(), self.to_bson(fv, &Schema::Null));
                }
                Bson::Document(doc)
            }
            (Av::Map(m), Schema::Map(ms)) => Bson::Document(
                m.iter()
                    .map(|(k, v)| (k.clone(), self.to_bson(v, &ms.types)))
                    .collect(),
            ),
            (Av::Array(items), Schema::Array(a)) => {
                Bson::Array(items.iter().map(|v| self.to_bson(v, &a.items)).collect())
            }
            (other, _) => Bson::String(format!("{other:?}")),
        }
    }
}

fn decimal_text(unscaled: &BigInt, scale: u32) -> String {
    let s = unscaled.magnitude().to_string();
    let scale = scale as usize;
    let neg = unscaled.sign() == Sign::Minus;
    let body = if scale == 0 {
        s
    } else if s.len() > scale {
        format!("{}.{}", &s[..s.len() - scale], &s[s.len() - scale..])
    } else {
        format!("0.{}{}", "0".repeat(scale - s.len()), s)
    };
    if neg { format!("-{body}") } else { body }
}

fn convert(v: &Av, schema: &Schema) -> Result<Bson, DecodeError> {
    let resolved =
        ResolvedSchema::try_from(schema).map_err(|e| DecodeError::Envelope(e.to_string()))?;
    let names = resolved
        .get_names()
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    Ok(Converter { names }.to_bson(v, schema))
}

fn header_str<'h>(headers: &'h [(String, Vec<u8>)], key: &str) -> Option<&'h str> {
    headers
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// A key carried in a header: framed Avro with the key schema (what ecst writes now, and
/// Debezium with the AvroConverter), else JSON (ecst before; lossy for some key types).
async fn key_header(
    registry: &Registry,
    headers: &[(String, Vec<u8>)],
    name: &str,
) -> Result<Option<Document>, DecodeError> {
    let Some((_, bytes)) = headers.iter().find(|(k, _)| k == name) else {
        return Ok(None);
    };
    if bytes.first() != Some(&0) {
        return Ok(std::str::from_utf8(bytes).ok().and_then(json_to_doc));
    }
    let (kv, ks) = decode_framed(registry, "key header", bytes).await?;
    Ok(match convert(&kv, &ks)? {
        Bson::Document(d) => Some(d),
        _ => None,
    })
}

fn json_to_doc(s: &str) -> Option<Document> {
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    match bson::to_bson(&v).ok()? {
        Bson::Document(d) => Some(d),
        _ => None,
    }
}

/// Decodes one message. `Ok(None)` is a tombstone (nothing to apply).
pub async fn decode_message(
    registry: &Registry,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: &[(String, Vec<u8>)],
) -> Result<Option<DecodedEvent>, DecodeError> {
    let Some(payload) = payload else {
        return Ok(None);
    };
    // The value first: its error is the more telling one when both are broken.
    let (vv, vs) = decode_framed(registry, "value", payload).await?;
    let Bson::Document(env) = convert(&vv, &vs)? else {
        return Err(DecodeError::Envelope("value is not a record".into()));
    };
    let key_doc = match key {
        Some(k) => {
            let (kv, ks) = decode_framed(registry, "key", k).await?;
            match convert(&kv, &ks)? {
                Bson::Document(d) => d,
                other => {
                    let mut d = Document::new();
                    d.insert("key", other);
                    d
                }
            }
        }
        None => Document::new(),
    };
    let op = env
        .get_str("op")
        .ok()
        .and_then(Op::from_code)
        .ok_or_else(|| DecodeError::Envelope("missing or unknown `op`".into()))?;
    let doc_of = |k: &str| match env.get(k) {
        Some(Bson::Document(d)) => Some(d.clone()),
        _ => None,
    };
    let before = doc_of("before");
    let after = doc_of("after");
    let source =
        doc_of("source").ok_or_else(|| DecodeError::Envelope("missing `source`".into()))?;
    let file = source.get_str("file").unwrap_or_default().to_string();
    let num = |k: &str| match source.get(k) {
        Some(Bson::Int64(x)) => *x,
        Some(Bson::Int32(x)) => i64::from(*x),
        _ => 0,
    };
    let epoch = header_str(headers, HEADER_EPOCH)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let version = version_of(
        epoch,
        &file,
        num("pos").max(0) as u64,
        num("row").max(0) as u32,
    );
    if matches!(op, Op::Create | Op::Update | Op::Read) && after.is_none() {
        return Err(DecodeError::Envelope(format!(
            "op `{}` without `after`",
            op.code()
        )));
    }
    if op == Op::Delete && before.is_none() {
        return Err(DecodeError::Envelope("op `d` without `before`".into()));
    }
    Ok(Some(DecodedEvent {
        op,
        key: key_doc,
        before,
        after,
        version,
        source_ts_ms: header_str(headers, HEADER_SOURCE_TS).and_then(|s| s.parse().ok()),
        read_ts_ms: header_str(headers, HEADER_READ_TS).and_then(|s| s.parse().ok()),
        old_key: key_header(registry, headers, HEADER_OLD_KEY).await?,
        new_key: key_header(registry, headers, HEADER_NEW_KEY).await?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A byte string edited by `edits` (overwrite, insert or remove at a position), then cut.
    fn corrupt(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)], cut: Option<usize>) -> Vec<u8> {
        for &(at, b, how) in edits {
            let i = at % (bytes.len() + 1);
            match how {
                0 if i < bytes.len() => bytes[i] = b,
                1 => bytes.insert(i, b),
                _ if i < bytes.len() => {
                    bytes.remove(i);
                }
                _ => {}
            }
        }
        if let Some(c) = cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        bytes
    }

    /// What the sink does with a value's bytes, short of the registry: unframe, decode against
    /// the schema, convert to BSON. Any outcome but a panic is fine.
    #[allow(deprecated)]
    fn decode_as_the_sink_does(schema: &Schema, framed: &[u8]) {
        let Ok((_, datum)) = crate::events::registry::unframe(framed) else {
            return;
        };
        if let Ok(v) = apache_avro::from_avro_datum(schema, &mut &datum[..], None) {
            let _ = convert(&v, schema);
        }
    }

    fn framed(datum: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        crate::events::registry::frame_into(&mut out, 1, datum);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn a_corrupted_change_envelope_is_decoded_or_refused_never_a_panic(
            edits in prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..8),
            cut in prop::option::of(any::<usize>()),
        ) {
            let (avro, _, datum) = crate::events::avro::tests::sample_envelope();
            decode_as_the_sink_does(&avro.value, &corrupt(framed(&datum), &edits, cut));
        }

        #[test]
        fn arbitrary_bytes_as_a_change_envelope_are_refused_or_decoded_never_a_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            let (avro, _, _) = crate::events::avro::tests::sample_envelope();
            decode_as_the_sink_does(&avro.value, &framed(&bytes));
            decode_as_the_sink_does(&avro.value, &bytes);
        }
    }

    #[test]
    fn decimals_become_exact_decimal128() {
        let d = decimal128(&BigInt::from(-12_345_678), 4).expect("fits");
        assert_eq!(d.to_string(), "-1234.5678");
        let big = BigInt::parse_bytes(b"1234567890123456789012345678901234567", 10).expect("n");
        assert!(
            decimal128(&big, 0).is_none(),
            "37 digits do not fit decimal128"
        );
        assert_eq!(decimal_text(&BigInt::from(-5), 3), "-0.005");
    }
}
