//! Mappings: how one decoded change becomes MongoDB write statements.
//!
//! Every statement is guarded by the change's version, stored beside the copy in
//! `_ecst.<mapping>`: a statement only matches documents whose stored version is missing or
//! older. So replays, duplicates and late snapshot rows change nothing, and the writer may retry
//! any statement freely ("must tolerate duplicate writes" holds by construction).
//!
//! * `embedded`: `update` with `multi: true` on `{<match_path>: key, guard}` setting
//!   `<target_path>` to the projected row. Never upserts: parents belong to the order-service.
//! * `embedded` into arrays (`target_path = "items.$[].product"`): the copy sits in each
//!   element of `items` whose `match_path` (`items.product.productId`) equals the key, and so
//!   does its version (`items.$[]._ecst.<mapping>`): one `updateMany` with an `arrayFilters`
//!   element filter `{e.<match>: key, element guard}` refreshes every matching element of every
//!   parent, each guarded by its own version, so a parent holding the product twice, or beside
//!   other products, gets exactly the elements of that key changed. Needs `arrayFilters`
//!   (MongoDB 3.6+, mongo-java-server; FerretDB 1.x lacks it and the sink refuses to start).
//! * `document`: `update` with `upsert: true` on `{_id: key, guard}` whose update is the whole
//!   new document (a replacement, the MongoDB Kafka sink connector's default write model): the
//!   document is the row, so a column dropped later leaves no field behind. When the guard
//!   rejects an existing newer document the upsert hits a duplicate `_id`: that is a stale
//!   change, skipped. A primary-key change under `on_key_change = "follow"` moves the document:
//!   the old `_id` is deleted (guarded), whatever `on_delete` says, since no row was deleted.
//!   A document mapping owns its collection (config validation): a replacement would drop what
//!   another mapping wrote into the same documents.

use bson::{Bson, Document, doc};

use super::decode::DecodedEvent;
use crate::config::{DeletePolicy, KeyChangePolicy, MappingConfig, MappingKind, TruncatePolicy};
use crate::events::Op;

/// Field holding the versions of all mappings in a document.
pub const VERSION_FIELD: &str = "_ecst";
/// Field set inside a copy by the `mark` delete policy (as Debezium's `__deleted`).
pub const DELETED_FIELD: &str = "__deleted";

/// One write statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    /// An `update` command statement.
    Update {
        /// Filter.
        q: Document,
        /// Update document.
        u: Document,
        /// Many documents.
        multi: bool,
        /// Insert when missing.
        upsert: bool,
        /// `arrayFilters` of the statement (empty: none).
        array_filters: Vec<Document>,
    },
    /// A `delete` command statement.
    Delete {
        /// Filter.
        q: Document,
        /// Every matching document (a TRUNCATE), not just one.
        many: bool,
    },
    /// An embedded-copy update of every parent whose `path` equals `key`, if older than `version`:
    /// one guarded `updateMany` on every server.
    FanOut {
        /// Guarded filter (`{path: key, $or: [version missing, version < v]}`).
        q: Document,
        /// Update document.
        u: Document,
        /// Match path, e.g. `user.id`.
        path: String,
        /// Key value at the match path.
        key: Bson,
        /// Version field path, e.g. `_ecst.user_in_orders`.
        version_path: String,
        /// Version of the change.
        version: String,
        /// Whether this statement moves copies to another key (primary-key change).
        moves: bool,
        /// `arrayFilters` selecting the array elements to change (empty: not an array copy).
        array_filters: Vec<Document>,
    },
}

/// Where an embedded mapping's copy sits inside array elements: `target_path =
/// "items.$[].product"` with `match_path = "items.product.productId"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrayTarget {
    /// The array's path in the parent (`items`).
    pub array: String,
    /// The copy's path inside an element (`product`).
    pub target: String,
    /// The key's path inside an element (`product.productId`).
    pub matcher: String,
}

/// The array form of an embedded mapping's paths: `Ok(None)` for a plain copy, an error
/// (naming what is wrong) for a notation ecst does not take.
pub fn array_target(match_path: &str, target_path: &str) -> Result<Option<ArrayTarget>, String> {
    let segs: Vec<&str> = target_path.split('.').collect();
    let marks: Vec<usize> = segs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.starts_with('$'))
        .map(|(i, _)| i)
        .collect();
    if marks.is_empty() {
        if match_path.split('.').any(|s| s.starts_with('$')) {
            return Err(format!(
                "`{match_path}`: match_path is a query path (arrays are traversed without `$`, e.g. \"items.product.productId\")"
            ));
        }
        return Ok(None);
    }
    let i = marks[0];
    if marks.len() > 1 || segs[i] != "$[]" {
        return Err(format!(
            "`{target_path}`: one `$[]` marks the array whose elements hold the copy (e.g. \"items.$[].product\"); nested arrays, `$` and `$[<id>]` are not supported"
        ));
    }
    if i == 0 || i + 1 == segs.len() {
        return Err(format!(
            "`{target_path}`: `$[]` must sit between the array's path and the copy's path inside an element (e.g. \"items.$[].product\")"
        ));
    }
    let array = segs[..i].join(".");
    let target = segs[i + 1..].join(".");
    let Some(matcher) = match_path
        .strip_prefix(array.as_str())
        .and_then(|r| r.strip_prefix('.'))
        .filter(|r| !r.is_empty() && !r.split('.').any(|s| s.starts_with('$')))
    else {
        return Err(format!(
            "`{match_path}`: with target_path `{target_path}`, match_path must be the key's path through the array, `{array}.<path in an element>` (e.g. \"{array}.{target}.id\")"
        ));
    };
    Ok(Some(ArrayTarget {
        array,
        target,
        matcher: matcher.to_string(),
    }))
}

/// A mapping ready to apply.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// Config.
    pub cfg: MappingConfig,
    version_path: String,
    /// The copy's place inside array elements, for an array mapping.
    array: Option<ArrayTarget>,
    /// Whether the guard also takes copies at the change's own version (`ecst reconcile
    /// --repair`: a copy edited behind ecst's back keeps its version).
    inclusive: bool,
}

/// A change that cannot be mapped (goes to the dead-letter topic).
#[derive(Debug, thiserror::Error)]
#[error("mapping `{mapping}`: {detail}")]
pub struct MappingError {
    /// Mapping name.
    pub mapping: String,
    /// What is wrong.
    pub detail: String,
}

impl Mapping {
    /// Builds a mapping from its config.
    pub fn new(cfg: MappingConfig) -> Self {
        let version_path = format!("{VERSION_FIELD}.{}", cfg.name);
        // Validated with the config: a bad notation never reaches here.
        let array = match (&cfg.kind, &cfg.match_path, &cfg.target_path) {
            (MappingKind::Embedded, Some(m), Some(t)) => array_target(m, t).ok().flatten(),
            _ => None,
        };
        Mapping {
            cfg,
            version_path,
            array,
            inclusive: false,
        }
    }

    /// The mapping as `ecst reconcile --repair` writes it: the same statements, whose guard also
    /// takes copies at the change's own version (so a drifted copy with a current version is
    /// rewritten), and still never one written by a newer change.
    pub fn for_repair(cfg: MappingConfig) -> Self {
        Mapping {
            inclusive: true,
            ..Mapping::new(cfg)
        }
    }

    /// The guard's comparison: older, or (repairing) not newer.
    fn older(&self) -> &'static str {
        if self.inclusive { "$lte" } else { "$lt" }
    }

    /// Where the copies sit inside array elements, for an array mapping.
    pub fn array(&self) -> Option<&ArrayTarget> {
        self.array.as_ref()
    }

    /// Path of the version field of this mapping.
    pub fn version_path(&self) -> &str {
        &self.version_path
    }

    fn err(&self, detail: impl Into<String>) -> MappingError {
        MappingError {
            mapping: self.cfg.name.clone(),
            detail: detail.into(),
        }
    }

    fn guard(&self, version: &str) -> Document {
        doc! { "$or": [
            { self.version_path.as_str(): { "$exists": false } },
            { self.version_path.as_str(): { self.older(): version } },
        ]}
    }

    fn fan_out(&self, path: &str, key: Bson, u: Document, version: &str, moves: bool) -> Statement {
        let mut q = doc! { path: key.clone() };
        q.extend(self.guard(version));
        Statement::FanOut {
            q,
            u,
            path: path.to_string(),
            key,
            version_path: self.version_path.clone(),
            version: version.to_string(),
            moves,
            array_filters: Vec::new(),
        }
    }

    /// The statements of an array mapping (see the module note): every element of `a.array`
    /// whose key is the change's, and whose own version is older, gets the change.
    fn array_statements(
        &self,
        ev: &DecodedEvent,
        a: &ArrayTarget,
        v: &str,
    ) -> Result<Vec<Statement>, MappingError> {
        let elem_version = format!("{VERSION_FIELD}.{}", self.cfg.name);
        let at = |p: &str| format!("{}.$[e].{p}", a.array);
        // Missing or older: `$not: {$gte}` (a filter's top-level fields must all name the
        // identifier, so no `$or`; versions are strings, and `$not` matches a missing field).
        let guard = |extra: Document| {
            let mut f = extra;
            let newer = if self.inclusive { "$gt" } else { "$gte" };
            f.insert(format!("e.{elem_version}"), doc! { "$not": { newer: v } });
            f
        };
        let stmt = |key: Bson, u: Document, moves: bool| Statement::FanOut {
            q: doc! { format!("{}.{}", a.array, a.matcher): key.clone() },
            u,
            path: format!("{}.{}", a.array, a.matcher),
            key: key.clone(),
            version_path: format!("{}.{elem_version}", a.array),
            version: v.to_string(),
            moves,
            array_filters: vec![guard(doc! { format!("e.{}", a.matcher): key })],
        };
        let mut out = Vec::new();
        match ev.op {
            Op::Truncate => {
                // `unset` is refused for embedded mappings by config validation.
                if self.cfg.on_truncate != TruncatePolicy::Mark {
                    return Ok(out);
                }
                let filter =
                    doc! { format!("e.{elem_version}"): { "$exists": true, self.older(): v } };
                out.push(Statement::Update {
                    q: doc! { format!("{}.{elem_version}", a.array): { "$exists": true } },
                    u: doc! { "$set": {
                        at(&format!("{}.{DELETED_FIELD}", a.target)): true,
                        at(&elem_version): v,
                    }},
                    multi: true,
                    upsert: false,
                    array_filters: vec![filter],
                });
            }
            Op::Create | Op::Read | Op::Update => {
                let row = ev
                    .after
                    .as_ref()
                    .ok_or_else(|| self.err("no after image"))?;
                let copy = self.project(row);
                let set = doc! { "$set": { at(&a.target): copy, at(&elem_version): v } };
                if let (Some(old), KeyChangePolicy::Follow) = (&ev.old_key, self.cfg.on_key_change)
                {
                    out.push(stmt(self.key_value(old)?, set.clone(), true));
                }
                out.push(stmt(self.key_value(&ev.key)?, set, false));
            }
            Op::Delete => {
                if self.key_change_follows(ev) {
                    return Ok(out); // the create half moves the copies
                }
                let key = self.key_value(&ev.key)?;
                let u = match self.cfg.on_delete {
                    DeletePolicy::Keep => return Ok(out),
                    DeletePolicy::Unset => match a
                        .matcher
                        .strip_prefix(a.target.as_str())
                        .and_then(|rest| rest.strip_prefix('.'))
                    {
                        Some(rest) => doc! { "$set": {
                            at(&a.target): nested(rest, key.clone()),
                            at(&elem_version): v,
                        }},
                        None => doc! {
                            "$unset": { at(&a.target): "" },
                            "$set": { at(&elem_version): v },
                        },
                    },
                    DeletePolicy::Mark => doc! { "$set": {
                        at(&format!("{}.{DELETED_FIELD}", a.target)): true,
                        at(&elem_version): v,
                    }},
                };
                out.push(stmt(key, u, false));
            }
        }
        Ok(out)
    }

    /// The key's match value: the single key field's value, or the whole key document.
    pub fn key_value(&self, key: &Document) -> Result<Bson, MappingError> {
        match key.len() {
            0 => Err(self.err("the change has no key (table without primary key)")),
            1 => Ok(key
                .iter()
                .next()
                .map(|(_, v)| v.clone())
                .unwrap_or(Bson::Null)),
            _ => match self.cfg.kind {
                MappingKind::Document => Ok(Bson::Document(key.clone())),
                MappingKind::Embedded => {
                    Err(self.err("embedded mappings need a single-column primary key"))
                }
            },
        }
    }

    /// The copy of a row: projected and renamed per config.
    pub fn project(&self, row: &Document) -> Document {
        let mut out = Document::new();
        match &self.cfg.fields {
            Some(fields) => {
                // A column the row lacks was added after it was written (the sink's fit
                // check stops on any other reason, see `fit`): the copy leaves it out, as the
                // row had it.
                for (f, v) in fields.iter().filter_map(|f| Some((f, row.get(f)?))) {
                    out.insert(
                        self.cfg.rename.get(f).cloned().unwrap_or_else(|| f.clone()),
                        v.clone(),
                    );
                }
            }
            None => {
                for (k, v) in row {
                    out.insert(
                        self.cfg.rename.get(k).cloned().unwrap_or_else(|| k.clone()),
                        v.clone(),
                    );
                }
            }
        }
        out
    }

    /// Whether `ev` changes nothing through this mapping (a delete kept by policy, or the
    /// delete half of a key change whose create half moves the copies). Such a change must not
    /// win a batch's per-key collapse over the change before it.
    pub fn is_noop(&self, ev: &DecodedEvent) -> bool {
        if ev.op == Op::Truncate {
            return self.cfg.on_truncate == TruncatePolicy::Keep;
        }
        if ev.op != Op::Delete {
            return false;
        }
        match (self.cfg.kind, self.key_change_follows(ev)) {
            // The create half moves the copies.
            (MappingKind::Embedded, true) => true,
            // The old document goes.
            (MappingKind::Document, true) => false,
            (_, false) => self.cfg.on_delete == DeletePolicy::Keep,
        }
    }

    /// Whether `ev` is the delete half of a primary-key change that the copies follow.
    fn key_change_follows(&self, ev: &DecodedEvent) -> bool {
        ev.op == Op::Delete
            && ev.new_key.is_some()
            && self.cfg.on_key_change == KeyChangePolicy::Follow
    }

    /// A TRUNCATE: every copy this mapping wrote before it, per `on_truncate` (guarded, so
    /// rows written after the TRUNCATE are left alone).
    fn truncate(&self, v: &str) -> Vec<Statement> {
        let mut q = doc! { self.version_path.as_str(): { "$exists": true } };
        q.extend(self.guard(v));
        match (self.cfg.on_truncate, self.cfg.kind) {
            (TruncatePolicy::Keep, _) => Vec::new(),
            (TruncatePolicy::Unset, MappingKind::Document) => {
                vec![Statement::Delete { q, many: true }]
            }
            // Refused by config validation for embedded mappings.
            (TruncatePolicy::Unset, MappingKind::Embedded) => Vec::new(),
            (TruncatePolicy::Mark, kind) => {
                let flag = match (kind, self.cfg.target_path.as_deref()) {
                    (MappingKind::Embedded, Some(t)) => format!("{t}.{DELETED_FIELD}"),
                    _ => DELETED_FIELD.to_string(),
                };
                vec![Statement::Update {
                    q,
                    u: doc! { "$set": { flag: true, self.version_path.as_str(): v } },
                    multi: true,
                    upsert: false,
                    array_filters: Vec::new(),
                }]
            }
        }
    }

    /// The statements that apply `ev`, in order.
    pub fn statements(&self, ev: &DecodedEvent) -> Result<Vec<Statement>, MappingError> {
        let v = ev.version.as_str();
        if let Some(a) = &self.array {
            return self.array_statements(ev, a, v);
        }
        if ev.op == Op::Truncate {
            return Ok(self.truncate(v));
        }
        let mut out = Vec::new();
        match self.cfg.kind {
            MappingKind::Embedded => {
                let match_path = self.cfg.match_path.clone().unwrap_or_default();
                let target = self.cfg.target_path.clone().unwrap_or_default();
                match ev.op {
                    Op::Create | Op::Read | Op::Update => {
                        let row = ev
                            .after
                            .as_ref()
                            .ok_or_else(|| self.err("no after image"))?;
                        let copy = self.project(row);
                        let set = doc! { target.as_str(): copy, self.version_path.as_str(): v };
                        if let (Some(old), KeyChangePolicy::Follow) =
                            (&ev.old_key, self.cfg.on_key_change)
                        {
                            let old_value = self.key_value(old)?;
                            out.push(self.fan_out(
                                &match_path,
                                old_value,
                                doc! { "$set": set.clone() },
                                v,
                                true,
                            ));
                        }
                        let key = self.key_value(&ev.key)?;
                        out.push(self.fan_out(&match_path, key, doc! { "$set": set }, v, false));
                    }
                    // Handled above.
                    Op::Truncate => {}
                    Op::Delete => {
                        if ev.new_key.is_some() && self.cfg.on_key_change == KeyChangePolicy::Follow
                        {
                            return Ok(out); // the create half moves the copies
                        }
                        let key = self.key_value(&ev.key)?;
                        let u = match self.cfg.on_delete {
                            DeletePolicy::Keep => return Ok(out),
                            // The copy goes, but a match field inside it stays: a row
                            // re-inserted with the same key finds its parents again.
                            DeletePolicy::Unset => match match_path
                                .strip_prefix(target.as_str())
                                .and_then(|rest| rest.strip_prefix('.'))
                            {
                                Some(rest) => doc! { "$set": {
                                    target.as_str(): nested(rest, key.clone()),
                                    self.version_path.as_str(): v,
                                }},
                                None => doc! {
                                    "$unset": { target.as_str(): "" },
                                    "$set": { self.version_path.as_str(): v },
                                },
                            },
                            DeletePolicy::Mark => doc! { "$set": {
                                format!("{target}.{DELETED_FIELD}"): true,
                                self.version_path.as_str(): v,
                            }},
                        };
                        out.push(self.fan_out(&match_path, key, u, v, false));
                    }
                }
            }
            MappingKind::Document => {
                let id = self.key_value(&ev.key)?;
                let mut q = doc! { "_id": id };
                q.extend(self.guard(v));
                match ev.op {
                    Op::Create | Op::Read | Op::Update => {
                        let row = ev.after.as_ref().ok_or_else(|| self.err("no after image"))?;
                        // The replacement: the projected row and this mapping's version (a
                        // marked delete's flag goes with the old content).
                        let mut u = self.project(row);
                        u.remove("_id");
                        u.remove(VERSION_FIELD);
                        u.insert(VERSION_FIELD, doc! { self.cfg.name.as_str(): v });
                        out.push(Statement::Update {
                            q,
                            u,
                            multi: false,
                            upsert: true,
                            array_filters: Vec::new(),
                        });
                    }
                    Op::Delete if self.key_change_follows(ev) => {
                        out.push(Statement::Delete { q, many: false });
                    }
                    Op::Delete => match self.cfg.on_delete {
                        DeletePolicy::Keep => {}
                        DeletePolicy::Unset => out.push(Statement::Delete { q, many: false }),
                        DeletePolicy::Mark => out.push(Statement::Update {
                            q,
                            u: doc! { "$set": { DELETED_FIELD: true, self.version_path.as_str(): v } },
                            multi: false,
                            upsert: true,
                            array_filters: Vec::new(),
                        }),
                    },
                    // Handled above.
                    Op::Truncate => {}
                }
            }
        }
        Ok(out)
    }
}

/// `{a: {b: value}}` for the dotted path `a.b`.
fn nested(path: &str, value: Bson) -> Bson {
    path.rsplit('.')
        .fold(value, |inner, part| Bson::Document(doc! { part: inner }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn product_mapping() -> Mapping {
        Mapping::new(MappingConfig {
            name: "product_in_orders".into(),
            topic: "ecst.test.product".into(),
            kind: MappingKind::Embedded,
            collection: "purchase_order".into(),
            match_path: Some("product.productId".into()),
            target_path: Some("product".into()),
            fields: Some(vec!["id".into(), "description".into()]),
            rename: BTreeMap::from([("id".to_string(), "productId".to_string())]),
            on_delete: DeletePolicy::Unset,
            on_key_change: KeyChangePolicy::Follow,
            on_truncate: TruncatePolicy::Mark,
            on_error: crate::config::ErrorPolicy::DeadLetter,
        })
    }

    fn event(op: Op) -> DecodedEvent {
        DecodedEvent {
            op,
            key: doc! { "id": 1 },
            before: Some(doc! { "id": 1, "description": "IPad", "price": 300 }),
            after: Some(doc! { "id": 1, "description": "IPad", "price": 300 }),
            version: "v2".into(),
            source_ts_ms: None,
            read_ts_ms: None,
            old_key: None,
            new_key: None,
        }
    }

    fn lines_mapping(on_delete: DeletePolicy) -> Mapping {
        let mut m = product_mapping().cfg;
        m.name = "p".into();
        m.match_path = Some("items.product.productId".into());
        m.target_path = Some("items.$[].product".into());
        m.on_delete = on_delete;
        Mapping::new(m)
    }

    #[test]
    fn an_array_copy_is_one_update_many_whose_array_filter_takes_the_keys_lines_older_than_the_change()
     {
        let m = lines_mapping(DeletePolicy::Unset);
        assert_eq!(
            m.array(),
            Some(&ArrayTarget {
                array: "items".into(),
                target: "product".into(),
                matcher: "product.productId".into(),
            })
        );
        let st = m.statements(&event(Op::Update)).expect("maps");
        let [
            Statement::FanOut {
                q,
                u,
                array_filters,
                ..
            },
        ] = st.as_slice()
        else {
            panic!("one fan-out: {st:?}");
        };
        assert_eq!(q, &doc! { "items.product.productId": 1 });
        assert_eq!(
            u,
            &doc! { "$set": {
                "items.$[e].product": { "productId": 1, "description": "IPad" },
                "items.$[e]._ecst.p": "v2",
            }}
        );
        assert_eq!(
            array_filters,
            &vec![doc! {
                "e.product.productId": 1,
                "e._ecst.p": { "$not": { "$gte": "v2" } },
            }],
            "the key's lines whose own version is missing or older"
        );
    }

    #[test]
    fn an_array_copy_deleted_keeps_the_lines_match_field_or_marks_it_and_a_key_change_moves_lines()
    {
        let unset = lines_mapping(DeletePolicy::Unset)
            .statements(&event(Op::Delete))
            .expect("maps");
        let [Statement::FanOut { u, .. }] = unset.as_slice() else {
            panic!("{unset:?}");
        };
        assert_eq!(
            u,
            &doc! { "$set": { "items.$[e].product": { "productId": 1 }, "items.$[e]._ecst.p": "v2" } }
        );
        let mark = lines_mapping(DeletePolicy::Mark)
            .statements(&event(Op::Delete))
            .expect("maps");
        let [Statement::FanOut { u, .. }] = mark.as_slice() else {
            panic!("{mark:?}");
        };
        assert_eq!(
            u,
            &doc! { "$set": { "items.$[e].product.__deleted": true, "items.$[e]._ecst.p": "v2" } }
        );
        let mut moved = event(Op::Update);
        moved.old_key = Some(doc! { "id": 7 });
        let st = lines_mapping(DeletePolicy::Keep)
            .statements(&moved)
            .expect("maps");
        let [
            Statement::FanOut {
                q,
                moves: true,
                array_filters,
                ..
            },
            Statement::FanOut { moves: false, .. },
        ] = st.as_slice()
        else {
            panic!("the old key's lines move, then the new key's: {st:?}");
        };
        assert_eq!(q, &doc! { "items.product.productId": 7 });
        assert_eq!(
            array_filters[0].get("e.product.productId"),
            Some(&Bson::Int32(7))
        );
    }

    fn users_document_mapping(on_delete: DeletePolicy) -> Mapping {
        Mapping::new(MappingConfig {
            name: "users_doc".into(),
            topic: "ecst.test.users".into(),
            kind: MappingKind::Document,
            collection: "users".into(),
            match_path: None,
            target_path: None,
            fields: None,
            rename: BTreeMap::new(),
            on_delete,
            on_key_change: KeyChangePolicy::Follow,
            on_truncate: TruncatePolicy::Keep,
            on_error: crate::config::ErrorPolicy::DeadLetter,
        })
    }

    #[test]
    fn a_document_mapping_replaces_the_whole_document_so_a_dropped_column_leaves_no_field() {
        let m = users_document_mapping(DeletePolicy::Mark);
        let mut ev = event(Op::Update);
        ev.after = Some(doc! { "id": 1, "description": "IPad" }); // `price` dropped
        let st = m.statements(&ev).expect("maps");
        let [
            Statement::Update {
                q,
                u,
                multi: false,
                upsert: true,
                ..
            },
        ] = st.as_slice()
        else {
            panic!("one upsert: {st:?}");
        };
        assert_eq!(q.get("_id"), Some(&Bson::Int32(1)));
        assert!(q.contains_key("$or"), "guarded: {q}");
        assert_eq!(
            u,
            &doc! { "id": 1, "description": "IPad", "_ecst": { "users_doc": "v2" } },
            "a replacement: no operator, so no field of the old document (nor its __deleted) survives"
        );
    }

    #[test]
    fn a_key_change_moves_a_mirrored_document_even_when_deletes_are_kept() {
        let m = users_document_mapping(DeletePolicy::Keep);
        let mut delete_half = event(Op::Delete);
        delete_half.new_key = Some(doc! { "id": 10 });
        assert!(!m.is_noop(&delete_half), "the old document must go");
        let st = m.statements(&delete_half).expect("maps");
        let [Statement::Delete { q, many: false }] = st.as_slice() else {
            panic!("one delete of the old _id: {st:?}");
        };
        assert_eq!(q.get("_id"), Some(&Bson::Int32(1)));
        assert!(q.contains_key("$or"), "guarded: {q}");
        // A real delete under `keep` still keeps the document.
        let plain = event(Op::Delete);
        assert!(m.is_noop(&plain));
        assert!(m.statements(&plain).expect("maps").is_empty());
    }

    #[test]
    fn embedded_update_projects_renames_and_guards_by_version() {
        let st = product_mapping()
            .statements(&event(Op::Update))
            .expect("maps");
        let [
            Statement::FanOut {
                q, u, moves: false, ..
            },
        ] = st.as_slice()
        else {
            panic!("{st:?}")
        };
        assert_eq!(q.get("product.productId"), Some(&Bson::Int32(1)));
        assert!(q.contains_key("$or"));
        let set = u.get_document("$set").expect("$set");
        assert_eq!(
            set.get_document("product").expect("copy"),
            &doc! { "productId": 1, "description": "IPad" }
        );
        assert_eq!(set.get_str("_ecst.product_in_orders"), Ok("v2"));
    }

    #[test]
    fn key_change_follows_old_copies_and_the_delete_half_does_nothing() {
        let m = product_mapping();
        let mut create = event(Op::Create);
        create.old_key = Some(doc! { "id": 9 });
        let st = m.statements(&create).expect("maps");
        assert_eq!(st.len(), 2);
        let Statement::FanOut { q, moves: true, .. } = &st[0] else {
            panic!("{st:?}")
        };
        assert_eq!(q.get("product.productId"), Some(&Bson::Int32(9)));
        let mut del = event(Op::Delete);
        del.new_key = Some(doc! { "id": 1 });
        assert!(m.statements(&del).expect("maps").is_empty());
    }

    #[test]
    fn a_row_written_before_a_projected_column_was_added_is_copied_without_it() {
        let mut ev = event(Op::Update);
        ev.after = Some(doc! { "id": 1 });
        let st = product_mapping().statements(&ev).expect("maps");
        let Some(Statement::FanOut { u, .. }) = st.first() else {
            panic!("{st:?}");
        };
        assert_eq!(
            u.get_document("$set")
                .ok()
                .and_then(|s| s.get_document("product").ok()),
            Some(&doc! { "productId": 1 }),
            "{u}"
        );
    }

    #[test]
    fn unset_keeps_the_match_field_so_a_reinserted_row_finds_its_parents_again() {
        let m = product_mapping();
        let st = m.statements(&event(Op::Delete)).expect("maps");
        let [Statement::FanOut { u, .. }] = st.as_slice() else {
            panic!("{st:?}")
        };
        let set = u.get_document("$set").expect("$set");
        assert_eq!(
            set.get_document("product").expect("the copy"),
            &doc! { "productId": 1 },
            "only the match field is left"
        );
        assert!(!u.contains_key("$unset"));
    }

    #[test]
    fn a_truncate_marks_every_copy_written_before_it_and_keep_writes_nothing() {
        let mut m = product_mapping();
        let mut t = event(Op::Truncate);
        t.before = None;
        t.after = None;
        t.key = doc! {};
        let st = m.statements(&t).expect("maps");
        let [
            Statement::Update {
                q, u, multi: true, ..
            },
        ] = st.as_slice()
        else {
            panic!("{st:?}")
        };
        assert!(
            q.contains_key("_ecst.product_in_orders") && q.contains_key("$or"),
            "{q}"
        );
        assert_eq!(
            u.get_document("$set")
                .expect("$set")
                .get_bool("product.__deleted"),
            Ok(true)
        );
        m.cfg.on_truncate = TruncatePolicy::Keep;
        assert!(m.statements(&t).expect("maps").is_empty());
        assert!(m.is_noop(&t));
    }
}
