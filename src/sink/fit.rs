//! Whether a mapping fits the rows its topic carries, judged from the registry's schemas.
//!
//! A mapping names columns (`fields`, `rename`) and relies on the key (`match_path` finds the
//! parents by the copy's key field). Written against rows that do not have what it names, it
//! fails on every change: a typo in `fields` or a column dropped later would dead-letter the
//! whole stream, and a copy whose match field does not come from the key orphans each parent at
//! its first update. Those are configuration problems, never properties of one message, so they
//! stop the sink with one message naming the mapping, the schema and the fix; nothing is
//! dead-lettered and no offset moves.
//!
//! **When.** At start against the latest schema of the topic's subjects (none yet: the source
//! has not written the topic, and the first change is checked instead), and in the sink's batch
//! loop for every (key, value) schema-id pair the first time a message carries it, before
//! anything of that batch is written. One registry round trip per new pair; cached after that.
//!
//! **Strict or lenient.** The latest schema must have every column `fields` names. An older
//! one may lack a column that was added later (a new sink group reading the topic from its
//! start meets rows written before `ALTER TABLE … ADD COLUMN`): the copies of those rows leave
//! the field out, as the row had it, and the next change of that row brings it. Every other
//! rule (the key, the match field, `rename`) holds for every schema.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use apache_avro::Schema;

use crate::config::{MappingConfig, MappingKind};
use crate::error::{Classify, ErrorClass};
use crate::events::registry::{Registry, RegistryError, unframe};

/// Errors of the fit check.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// A mapping does not fit the rows of its topic.
    #[error(
        "mapping `{mapping}` does not fit the rows of topic `{topic}` (value schema id {schema_id}): {problems}"
    )]
    DoesNotFit {
        /// Mapping name.
        mapping: String,
        /// Its topic.
        topic: String,
        /// The value schema judged.
        schema_id: u32,
        /// What is wrong, with the fix, `; `-separated.
        problems: String,
    },
    /// The registry could not answer.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl Classify for FitError {
    fn class(&self) -> ErrorClass {
        match self {
            FitError::DoesNotFit { .. } => ErrorClass::Definite,
            FitError::Registry(e) => e.class(),
        }
    }

    fn kind(&self) -> String {
        match self {
            FitError::DoesNotFit { .. } => "mapping_does_not_fit".into(),
            FitError::Registry(_) => "registry".into(),
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            FitError::DoesNotFit { .. } => "the mapping named above",
            FitError::Registry(_) => "that the schema registry at schema_registry.url is up",
        }
    }
}

/// What a topic's rows look like: the key's fields (`None`: no key schema, a keyless table)
/// and the row's fields, by their Avro (and so MongoDB) names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Key fields, in order.
    pub key: Option<Vec<String>>,
    /// Row fields (of `after`).
    pub row: Vec<String>,
}

fn record_fields(schema: &Schema) -> Option<Vec<String>> {
    match schema {
        Schema::Record(r) => Some(r.fields.iter().map(|f| f.name.clone()).collect()),
        _ => None,
    }
}

/// The shape of a topic from its key and value schemas; `None` when the value schema is not a
/// change envelope (a record whose `after` is a union of null and the row record).
pub fn shape_of(key: Option<&Schema>, value: &Schema) -> Option<Shape> {
    let Schema::Record(env) = value else {
        return None;
    };
    // The row record is defined at its first use (`before`); `after` names it.
    let row = ["before", "after"]
        .iter()
        .filter_map(|name| env.fields.iter().find(|f| f.name == *name))
        .find_map(|f| match &f.schema {
            Schema::Union(u) => u.variants().iter().find_map(record_fields),
            other => record_fields(other),
        })?;
    Some(Shape {
        key: key.and_then(record_fields).filter(|k| !k.is_empty()),
        row,
    })
}

/// What `cfg` needs that rows of `shape` do not give (empty: it fits). `latest`: the shape is
/// the one the source writes now, which must have every column `fields` names.
pub fn problems(cfg: &MappingConfig, shape: &Shape, latest: bool) -> Vec<String> {
    let mut out = Vec::new();
    let has = |c: &str| shape.row.iter().any(|r| r == c);
    let columns = shape.row.join(", ");
    if latest && let Some(fields) = &cfg.fields {
        for f in fields.iter().filter(|f| !has(f)) {
            out.push(format!(
                "fields names `{f}`, which the rows do not have (a typo, a column dropped since, or one not added yet); their columns: {columns}; fix: correct or remove `{f}` in fields (a new column: add it to fields once the source has seen a row with it)"
            ));
        }
    }
    for from in cfg.rename.keys() {
        // A column `fields` names is reported above; an older schema may lack one added later.
        let named = cfg.fields.as_ref().is_some_and(|f| f.contains(from));
        if latest && !named && !has(from) {
            out.push(format!(
                "rename takes `{from}`, which the rows do not have; their columns: {columns}; fix: correct or remove it in rename"
            ));
        }
    }
    let key = shape.key.as_deref().unwrap_or_default();
    match (cfg.kind, key) {
        (_, []) => out.push(
            "the table has no primary key, so its changes carry none: a mapping finds its copies by the key; fix: give the table a primary key, or remove the mapping".to_string(),
        ),
        (MappingKind::Embedded, [k]) => {
            if let Some(p) = match_field_problem(cfg, k) {
                out.push(p);
            }
        }
        (MappingKind::Embedded, many) => out.push(format!(
            "the key has {} columns ({}), and an embedded copy is matched by one value; fix: use kind = \"document\", or a table with a single-column key",
            many.len(),
            many.join(", ")
        )),
        (MappingKind::Document, _) => {}
    }
    out
}

/// For an embedded mapping whose match path runs through its copy (`user.id` into `user`):
/// the copy's field there must be the key column's, or each write replaces the copy with one
/// that no longer matches its key (the parent is orphaned at the first update).
fn match_field_problem(cfg: &MappingConfig, key: &str) -> Option<String> {
    let target = cfg.target_path.as_deref()?.replace(".$[].", ".");
    let match_path = cfg.match_path.as_deref()?;
    let leaf = match_path
        .strip_prefix(target.as_str())?
        .strip_prefix('.')?
        .split('.')
        .next()?;
    let copied = cfg
        .fields
        .as_ref()
        .is_none_or(|f| f.iter().any(|c| c == key));
    let as_name = cfg.rename.get(key).map_or(key, String::as_str);
    if copied && as_name == leaf {
        return None;
    }
    let from = if copied {
        format!("the key column `{key}` becomes `{as_name}` in the copy")
    } else {
        format!("the key column `{key}` is not in fields")
    };
    Some(format!(
        "match_path `{match_path}` finds parents by the copy's `{leaf}`, but {from}: the first update would orphan every parent; fix: copy `{key}` as `{leaf}` (fields, and rename = {{ {key} = \"{leaf}\" }} if the names differ)"
    ))
}

/// The schema ids of one message: (key id, value id).
pub type Ids = (Option<u32>, u32);

/// The schema-id pairs already judged, and the check itself (see the module note).
#[derive(Default)]
pub struct Fitting {
    /// Per topic, the (key id, value id) pairs judged.
    seen: Mutex<HashMap<String, HashSet<Ids>>>,
}

/// The schema ids of a message: (key id, value id). `None` when its framing is broken (the
/// decoder dead-letters it with its own error) or it has no value (a tombstone).
pub fn ids_of(key: Option<&[u8]>, payload: Option<&[u8]>) -> Option<Ids> {
    let (value_id, _) = unframe(payload?).ok()?;
    let key_id = match key.map(unframe) {
        Some(Ok((id, _))) => Some(id),
        Some(Err(_)) => return None,
        None => None,
    };
    Some((key_id, value_id))
}

impl Fitting {
    /// Checks the mappings of `topic` (of all `mappings`) against its latest registered schemas
    /// (nothing when the topic has none yet).
    pub async fn check_latest(
        &self,
        registry: &Registry,
        mappings: &[&MappingConfig],
        topic: &str,
    ) -> Result<(), FitError> {
        let Some((value_id, value)) = registry.latest(&format!("{topic}-value")).await? else {
            return Ok(());
        };
        let key = registry.latest(&format!("{topic}-key")).await?;
        let shape = shape_of(key.as_ref().map(|(_, s)| s.as_ref()), &value);
        judge(mappings, topic, value_id, shape.as_ref(), true)
    }

    /// Whether the pair of schema ids `ids` of `topic` was judged already (the hot path: one
    /// lookup, no allocation).
    pub fn judged(&self, topic: &str, ids: Ids) -> bool {
        self.seen
            .lock()
            .is_ok_and(|s| s.get(topic).is_some_and(|p| p.contains(&ids)))
    }

    /// Checks the mappings of `topic` (of all `mappings`) against the schemas of ids
    /// `(key_id, value_id)` that a message carries. Ids the registry does not know, or schemas
    /// it cannot parse, are left to the decoder (that message goes to the dead-letter topic
    /// with its own error), and not asked about again.
    pub async fn check_ids(
        &self,
        registry: &Registry,
        mappings: &[&MappingConfig],
        topic: &str,
        (key_id, value_id): Ids,
    ) -> Result<(), FitError> {
        let (value, key_schema) = match (
            registry.schema(value_id).await,
            match key_id {
                Some(id) => registry.schema(id).await.map(Some),
                None => Ok(None),
            },
        ) {
            (Ok(v), Ok(k)) => (v, k),
            // Unknown ids and bad schemas are the decoder's to report, per message.
            (Err(e), _) | (_, Err(e)) if e.class() == ErrorClass::Transient => {
                return Err(e.into());
            }
            (Err(RegistryError::Unauthorized { detail }), _)
            | (_, Err(RegistryError::Unauthorized { detail })) => {
                return Err(RegistryError::Unauthorized { detail }.into());
            }
            _ => {
                self.mark(topic, (key_id, value_id));
                return Ok(());
            }
        };
        let latest = registry
            .latest(&format!("{topic}-value"))
            .await?
            .is_none_or(|(id, _)| id == value_id);
        // A message without a key (a TRUNCATE, which concerns every key) says nothing of the
        // key's shape: the topic's key subject does (none: a table without a primary key).
        let key_schema = match (key_id, key_schema) {
            (None, _) => registry
                .latest(&format!("{topic}-key"))
                .await?
                .map(|(_, s)| s),
            (Some(_), k) => k,
        };
        let shape = shape_of(key_schema.as_deref(), &value);
        judge(mappings, topic, value_id, shape.as_ref(), latest)?;
        self.mark(topic, (key_id, value_id));
        Ok(())
    }

    fn mark(&self, topic: &str, ids: Ids) {
        if let Ok(mut s) = self.seen.lock() {
            s.entry(topic.to_string()).or_default().insert(ids);
        }
    }
}

fn judge(
    mappings: &[&MappingConfig],
    topic: &str,
    value_id: u32,
    shape: Option<&Shape>,
    latest: bool,
) -> Result<(), FitError> {
    // Not a change envelope: the decoder dead-letters its messages with the reason.
    let Some(shape) = shape else {
        return Ok(());
    };
    for m in mappings.iter().filter(|m| m.topic == topic) {
        let found = problems(m, shape, latest);
        if !found.is_empty() {
            return Err(FitError::DoesNotFit {
                mapping: m.name.clone(),
                topic: topic.to_string(),
                schema_id: value_id,
                problems: found.join("; "),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> Shape {
        Shape {
            key: Some(vec!["id".into()]),
            row: ["id", "firstname", "lastname", "email"]
                .map(String::from)
                .to_vec(),
        }
    }

    fn embedded(fields: Option<&[&str]>, rename: &[(&str, &str)]) -> MappingConfig {
        MappingConfig {
            name: "user_in_orders".into(),
            topic: "t".into(),
            kind: MappingKind::Embedded,
            collection: "purchase_order".into(),
            match_path: Some("user.id".into()),
            target_path: Some("user".into()),
            fields: fields.map(|f| f.iter().map(|x| x.to_string()).collect()),
            rename: rename
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            on_delete: crate::config::DeletePolicy::Keep,
            on_key_change: crate::config::KeyChangePolicy::Follow,
            on_truncate: crate::config::TruncatePolicy::Keep,
            on_error: crate::config::ErrorPolicy::DeadLetter,
        }
    }

    #[test]
    fn the_seed_mapping_fits_the_users_rows() {
        let m = embedded(Some(&["id", "firstname", "lastname", "email"]), &[]);
        assert_eq!(problems(&m, &users(), true), Vec::<String>::new());
        assert_eq!(
            problems(&embedded(None, &[]), &users(), true),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_typo_in_fields_is_named_with_the_columns_the_rows_have() {
        let m = embedded(Some(&["id", "emial"]), &[]);
        let p = problems(&m, &users(), true);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("`emial`") && p[0].contains("id, firstname, lastname, email"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn an_older_schema_may_lack_a_column_added_later_but_the_latest_may_not() {
        let m = embedded(Some(&["id", "email", "phone"]), &[]);
        assert!(problems(&m, &users(), false).is_empty());
        assert!(problems(&m, &users(), true)[0].contains("`phone`"));
    }

    #[test]
    fn a_match_field_that_is_not_the_key_column_would_orphan_the_parents() {
        // The key column `id` is copied as `userId`, while parents are found by `user.id`.
        let renamed = embedded(Some(&["id", "email"]), &[("id", "userId")]);
        let p = problems(&renamed, &users(), true);
        assert!(p.len() == 1 && p[0].contains("becomes `userId`"), "{p:?}");
        // Another column copied as `id`, the key left out.
        let mut shape = users();
        shape.key = Some(vec!["email".into()]);
        let other = embedded(Some(&["id", "firstname"]), &[]);
        let p = problems(&other, &shape, true);
        assert!(
            p.len() == 1 && p[0].contains("`email` is not in fields"),
            "{p:?}"
        );
    }

    #[test]
    fn a_keyless_or_composite_key_table_cannot_be_matched_by_an_embedded_copy() {
        let m = embedded(None, &[]);
        let keyless = Shape {
            key: None,
            ..users()
        };
        assert!(problems(&m, &keyless, true)[0].contains("no primary key"));
        let composite = Shape {
            key: Some(vec!["id".into(), "email".into()]),
            ..users()
        };
        assert!(problems(&m, &composite, true)[0].contains("2 columns (id, email)"));
    }

    #[test]
    fn a_rename_of_a_column_the_rows_do_not_have_is_named() {
        let m = embedded(None, &[("mail", "email")]);
        let p = problems(&m, &users(), true);
        assert!(
            p.len() == 1 && p[0].contains("rename takes `mail`"),
            "{p:?}"
        );
    }

    #[test]
    fn the_shape_comes_from_the_envelopes_after_record_and_the_key_record() {
        let value = Schema::parse_str(
            r#"{"type":"record","name":"Envelope","fields":[
                {"name":"before","type":["null",{"type":"record","name":"Value","fields":[{"name":"id","type":"int"},{"name":"email","type":["null","string"]}]}]},
                {"name":"after","type":["null","Value"]},
                {"name":"op","type":"string"}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let key = Schema::parse_str(
            r#"{"type":"record","name":"Key","fields":[{"name":"id","type":"int"}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            shape_of(Some(&key), &value),
            Some(Shape {
                key: Some(vec!["id".into()]),
                row: vec!["id".into(), "email".into()],
            })
        );
        assert_eq!(shape_of(None, &key), None, "not an envelope");
    }
}
