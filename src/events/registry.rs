//! Schema Registry client, id caches and Confluent wire framing.
//!
//! Registration and look-ups go through `schema_registry_converter`'s async calls (any
//! Confluent-compatible registry: Confluent, Apicurio's `ccompat` API, Redpanda, Karapace).
//! Ids are cached per (subject, schema text) and schemas per id, so the hot path never calls the
//! registry: a new id costs one round trip the first time a table shape or writer appears.
//!
//! Framing is `0x00 | u32 big-endian schema id | Avro datum`. [`unframe`] checks the length and
//! the magic byte before reading anything, so a poison message is a typed error, never a panic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schema_registry_converter::async_impl::schema_registry::{
    SrSettings, get_all_subjects, get_schema_by_id, get_schema_by_subject_and_version,
    is_compatible_schema, post_schema,
};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};

use crate::error::{Classify, ErrorClass};

/// Errors of registry calls and framing.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be reached or answered 5xx/408/429.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
    /// The registry refused a new schema version (compatibility rules).
    #[error("schema registry refused the new schema of subject `{subject}`: {detail}")]
    Refused {
        /// The subject.
        subject: String,
        /// The registry's explanation.
        detail: String,
    },
    /// The registry does not know a schema id, or answered 4xx for it.
    #[error("schema id {id} cannot be fetched: {detail}")]
    UnknownId {
        /// The id from the frame.
        id: u32,
        /// The registry's explanation.
        detail: String,
    },
    /// A schema returned by the registry does not parse as Avro.
    #[error("schema id {id} is not a valid Avro schema: {source}")]
    BadSchema {
        /// The id.
        id: u32,
        /// Parse error.
        #[source]
        source: apache_avro::Error,
    },
    /// The registry refused ecst's credentials (HTTP 401/403): a rotated password or a missing
    /// permission, never a property of one message.
    #[error(
        "schema registry refused the credentials ({detail}); fix: schema_registry.username and password (or password_file, read at start: after a password rotation, restart ecst with the file updated), or the registry's permissions for that user"
    )]
    Unauthorized {
        /// The registry's answer.
        detail: String,
    },
    /// Settings could not be built (bad URL or TLS setup).
    #[error("schema registry settings: {0}")]
    Settings(String),
}

impl Classify for RegistryError {
    fn class(&self) -> ErrorClass {
        match self {
            RegistryError::Unavailable(_) => ErrorClass::Transient,
            RegistryError::Refused { .. }
            | RegistryError::UnknownId { .. }
            | RegistryError::BadSchema { .. }
            | RegistryError::Unauthorized { .. }
            | RegistryError::Settings(_) => ErrorClass::Definite,
        }
    }
}

/// Errors of the Confluent wire framing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer than 5 bytes.
    #[error("message of {0} bytes is too short for the Confluent wire format (needs at least 5)")]
    TooShort(usize),
    /// First byte is not 0.
    #[error("magic byte is {0:#04x}, expected 0x00 (not Confluent wire format)")]
    BadMagic(u8),
}

/// Frames an Avro datum: `0x00 | id (u32 BE) | datum`.
pub fn frame_into(out: &mut Vec<u8>, id: u32, datum: &[u8]) {
    out.reserve(5 + datum.len());
    out.push(0);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(datum);
}

/// Splits a framed message into schema id and datum, checking length and magic byte.
pub fn unframe(bytes: &[u8]) -> Result<(u32, &[u8]), FrameError> {
    if bytes.len() < 5 {
        return Err(FrameError::TooShort(bytes.len()));
    }
    if bytes[0] != 0 {
        return Err(FrameError::BadMagic(bytes[0]));
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    Ok((id, &bytes[5..]))
}

/// Connection settings of the registry.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Base URL (Confluent API root; for Apicurio `.../apis/ccompat/v7`).
    pub url: String,
    /// Basic auth user, if any.
    pub username: Option<String>,
    /// Basic auth password, if any.
    pub password: Option<String>,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// A caching registry client, cheap to clone.
#[derive(Clone)]
pub struct Registry {
    sr: Arc<SrSettings>,
    ids: Arc<Mutex<HashMap<(String, String), u32>>>,
    schemas: Arc<Mutex<HashMap<u32, Arc<apache_avro::Schema>>>>,
}

fn error_text(err: &SRCError) -> String {
    match &err.cause {
        Some(c) => format!("{}: {c}", err.error),
        None => err.error.clone(),
    }
}

/// The HTTP status in the client's error text ("… failed with status 409 Conflict").
fn status_of(text: &str) -> Option<u16> {
    text.split("status ")
        .nth(1)
        .and_then(|rest| rest.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
}

fn classify_src(err: &SRCError) -> (bool, String) {
    let text = error_text(err);
    // 4xx is definite except 408 and 429; no status at all means the request never got an
    // answer (transient).
    let transient = match status_of(&text) {
        Some(s) => s >= 500 || s == 408 || s == 429,
        None => err.retriable || !text.contains("could not parse"),
    };
    (transient, text)
}

/// Counts one request to the registry.
fn requested(op: &'static str) {
    metrics::counter!(crate::metrics::REGISTRY_REQUESTS_TOTAL, crate::metrics::OP_LABEL => op)
        .increment(1);
}

/// A credentials refusal, whatever the call was.
fn unauthorized(text: &str) -> Option<RegistryError> {
    matches!(status_of(text), Some(401 | 403)).then(|| RegistryError::Unauthorized {
        detail: text.to_string(),
    })
}

impl Registry {
    /// Builds the client (no request is made).
    pub fn new(settings: &RegistrySettings) -> Result<Self, RegistryError> {
        let mut b = SrSettings::new_builder(settings.url.trim_end_matches('/').to_string());
        b.set_timeout(settings.timeout);
        if let Some(user) = &settings.username {
            b.set_basic_authorization(user, settings.password.as_deref());
        }
        let sr = b
            .build()
            .map_err(|e| RegistryError::Settings(e.to_string()))?;
        Ok(Registry {
            sr: Arc::new(sr),
            ids: Arc::default(),
            schemas: Arc::default(),
        })
    }

    /// Registers (or finds) `schema_json` under `subject`; returns its id. Cached.
    pub async fn register(&self, subject: &str, schema_json: &str) -> Result<u32, RegistryError> {
        let cache_key = (subject.to_string(), schema_json.to_string());
        if let Some(id) = self.ids.lock().map_err(poisoned)?.get(&cache_key) {
            return Ok(*id);
        }
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema_json.to_string());
        requested("register");
        let registered = post_schema(&self.sr, subject.to_string(), supplied)
            .await
            .map_err(|e| {
                let (transient, text) = classify_src(&e);
                if transient {
                    RegistryError::Unavailable(text)
                } else if let Some(auth) = unauthorized(&text) {
                    auth
                } else {
                    RegistryError::Refused {
                        subject: subject.to_string(),
                        detail: text,
                    }
                }
            })?;
        self.ids
            .lock()
            .map_err(poisoned)?
            .insert(cache_key, registered.id);
        Ok(registered.id)
    }

    /// All subjects (a reachability check).
    pub async fn subjects(&self) -> Result<Vec<String>, RegistryError> {
        requested("subjects");
        get_all_subjects(&self.sr).await.map_err(|e| {
            let (transient, text) = classify_src(&e);
            if transient {
                RegistryError::Unavailable(text)
            } else if let Some(auth) = unauthorized(&text) {
                auth
            } else {
                RegistryError::Settings(text)
            }
        })
    }

    /// Whether `schema_json` may be registered next under `subject` (`None`: new subject).
    pub async fn is_compatible(
        &self,
        subject: &str,
        schema_json: &str,
    ) -> Result<Option<bool>, RegistryError> {
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema_json.to_string());
        requested("compatibility");
        match is_compatible_schema(&self.sr, subject.to_string(), supplied).await {
            Ok(ok) => Ok(Some(ok)),
            Err(e) => {
                let (transient, text) = classify_src(&e);
                if transient {
                    Err(RegistryError::Unavailable(text))
                } else if text.contains("404") {
                    Ok(None)
                } else {
                    Err(RegistryError::Refused {
                        subject: subject.into(),
                        detail: text,
                    })
                }
            }
        }
    }

    /// The id and schema of the latest version registered under `subject` (`None`: no such
    /// subject yet). Never cached: a new version may have come since the last call.
    pub async fn latest(
        &self,
        subject: &str,
    ) -> Result<Option<(u32, Arc<apache_avro::Schema>)>, RegistryError> {
        requested("latest");
        let registered = match get_schema_by_subject_and_version(&self.sr, subject, None).await {
            Ok(r) => r,
            Err(e) => {
                let (transient, text) = classify_src(&e);
                return if transient {
                    Err(RegistryError::Unavailable(text))
                } else if let Some(auth) = unauthorized(&text) {
                    Err(auth)
                } else if status_of(&text) == Some(404) || text.contains("404") {
                    Ok(None)
                } else {
                    Err(RegistryError::Settings(text))
                };
            }
        };
        let id = registered.id;
        Ok(Some((id, self.schema(id).await?)))
    }

    /// The writer schema of `id`. Cached; an unknown id is fetched once.
    pub async fn schema(&self, id: u32) -> Result<Arc<apache_avro::Schema>, RegistryError> {
        if let Some(s) = self.schemas.lock().map_err(poisoned)?.get(&id) {
            return Ok(s.clone());
        }
        requested("schema");
        let registered = get_schema_by_id(id, &self.sr).await.map_err(|e| {
            let (transient, text) = classify_src(&e);
            if transient {
                RegistryError::Unavailable(text)
            } else if let Some(auth) = unauthorized(&text) {
                auth
            } else {
                RegistryError::UnknownId { id, detail: text }
            }
        })?;
        let parsed = apache_avro::Schema::parse_str(&registered.schema)
            .map_err(|source| RegistryError::BadSchema { id, source })?;
        let parsed = Arc::new(parsed);
        self.schemas
            .lock()
            .map_err(poisoned)?
            .insert(id, parsed.clone());
        Ok(parsed)
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> RegistryError {
    RegistryError::Settings("registry cache lock poisoned by a panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trips_and_rejects_short_or_foreign_bytes() {
        let mut out = Vec::new();
        frame_into(&mut out, 258, b"abc");
        assert_eq!(out, vec![0, 0, 0, 1, 2, b'a', b'b', b'c']);
        assert_eq!(unframe(&out), Ok((258, &b"abc"[..])));
        assert_eq!(unframe(&[0, 1]), Err(FrameError::TooShort(2)));
        assert_eq!(unframe(&[7, 0, 0, 0, 1]), Err(FrameError::BadMagic(7)));
    }

    #[test]
    fn a_credentials_refusal_is_its_own_definite_error_and_other_statuses_are_not() {
        let e = unauthorized("HTTP request to schema registry failed with status 401 Unauthorized")
            .expect("401 is a credentials refusal");
        assert!(matches!(e, RegistryError::Unauthorized { .. }));
        assert_eq!(e.class(), ErrorClass::Definite);
        assert!(e.to_string().contains("schema_registry.username"));
        assert!(unauthorized("failed with status 403 Forbidden").is_some());
        assert!(unauthorized("failed with status 404 Not Found").is_none());
        assert!(unauthorized("connection refused").is_none());
    }

    #[test]
    fn registry_errors_are_classed_by_http_status() {
        let e = SRCError::new(
            "HTTP request to schema registry failed with status 409 Conflict",
            None,
            false,
        );
        assert!(!classify_src(&e).0);
        let e = SRCError::new(
            "HTTP request to schema registry failed with status 503 Service Unavailable",
            None,
            true,
        );
        assert!(classify_src(&e).0);
        let e = SRCError::new("error sending request", None, true);
        assert!(classify_src(&e).0);
    }
}
