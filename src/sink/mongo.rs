//! MongoDB writer: many statements per round trip, in order, idempotent.
//!
//! Uses the `update` / `delete` database commands with arrays of statements (what every driver's
//! bulk API sends; supported by MongoDB and FerretDB alike, unlike MongoDB 8's `bulkWrite`
//! command). Statements run `ordered: true`, so writes for one key keep their order. A
//! statement-level error stops the command at that index: a duplicate `_id` on a guarded upsert
//! is a stale change (skipped), any other statement error is definite for that change only (it
//! goes to the dead-letter topic) and the rest of the run is resubmitted. A command-level
//! definite error is isolated by retrying statement by statement. Network, selection and
//! "not primary" errors are transient: the caller retries the batch.
//!
//! The writer must tolerate duplicate writes, and does: every statement carries the version guard.

use bson::{Bson, Document, doc};
use mongodb::error::ErrorKind;

use super::SinkError;
use super::mapping::Statement;

/// Statements per command (MongoDB's default `maxWriteBatchSize` is 100,000; keep requests small).
const MAX_STATEMENTS_PER_COMMAND: usize = 1_000;

/// Server error codes that are worth retrying.
const TRANSIENT_CODES: &[i32] = &[6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 50];

/// Classes a driver error.
pub fn is_transient(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => TRANSIENT_CODES.contains(&c.code),
        ErrorKind::Write(_) | ErrorKind::InsertMany(_) => false,
        ErrorKind::InvalidArgument { .. } | ErrorKind::BsonDeserialization(_) | ErrorKind::BsonSerialization(_) => false,
        _ => true,
    }
}

/// A statement tagged with the batch entry it came from.
#[derive(Debug, Clone)]
pub struct Tagged {
    /// Index of the entry in the batch (for dead-lettering).
    pub entry: usize,
    /// The statement.
    pub stmt: Statement,
}

/// What happened to a run of statements.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Entries whose statement failed definitively, with the server's message.
    pub failed: Vec<(usize, String)>,
    /// Entries skipped as stale (duplicate `_id` on a guarded upsert).
    pub stale: Vec<usize>,
}

/// The writer.
#[derive(Clone)]
pub struct MongoWriter {
    db: mongodb::Database,
}

impl MongoWriter {
    /// Connects (lazily: the driver connects on first use) to `uri` / `database`.
    pub async fn connect(uri: &str, database: &str) -> Result<Self, SinkError> {
        let mut opts = mongodb::options::ClientOptions::parse(uri).await.map_err(SinkError::Mongo)?;
        opts.app_name.get_or_insert_with(|| "ecst".into());
        if opts.server_selection_timeout.is_none() {
            opts.server_selection_timeout = Some(std::time::Duration::from_secs(5));
        }
        let client = mongodb::Client::with_options(opts).map_err(SinkError::Mongo)?;
        Ok(MongoWriter { db: client.database(database) })
    }

    /// The database handle (tests and checks).
    pub fn database(&self) -> &mongodb::Database {
        &self.db
    }

    /// Checks that `collection` has an index starting with `path`; creates it if allowed.
    pub async fn ensure_index(&self, collection: &str, path: &str, create: bool) -> Result<(), SinkError> {
        let coll = self.db.collection::<Document>(collection);
        let mut cursor = match coll.list_indexes().await {
            Ok(c) => Some(c),
            // A collection that does not exist yet has no indexes (NamespaceNotFound).
            Err(e) if matches!(e.kind.as_ref(), ErrorKind::Command(c) if c.code == 26) => None,
            Err(e) => return Err(SinkError::Mongo(e)),
        };
        if let Some(cursor) = cursor.as_mut() {
            use futures::TryStreamExt;
            while let Some(idx) = cursor.try_next().await.map_err(SinkError::Mongo)? {
                if idx.keys.keys().next().map(String::as_str) == Some(path) {
                    return Ok(());
                }
            }
        }
        if !create {
            return Err(SinkError::MissingIndex { collection: collection.into(), path: path.into() });
        }
        let model = mongodb::IndexModel::builder().keys(doc! { path: 1 }).build();
        coll.create_index(model).await.map_err(SinkError::Mongo)?;
        tracing::info!(collection, path, "index created");
        Ok(())
    }

    /// Runs the statements of one collection, in order.
    pub async fn apply(&self, collection: &str, stmts: &[Tagged]) -> Result<Outcome, SinkError> {
        let mut outcome = Outcome::default();
        let mut start = 0;
        while start < stmts.len() {
            let is_delete = matches!(stmts[start].stmt, Statement::Delete { .. });
            let mut end = start;
            while end < stmts.len()
                && end - start < MAX_STATEMENTS_PER_COMMAND
                && matches!(stmts[end].stmt, Statement::Delete { .. }) == is_delete
            {
                end += 1;
            }
            self.run_ordered(collection, &stmts[start..end], &mut outcome).await?;
            start = end;
        }
        Ok(outcome)
    }

    async fn run_ordered(&self, collection: &str, run: &[Tagged], outcome: &mut Outcome) -> Result<(), SinkError> {
        let mut from = 0;
        while from < run.len() {
            let part = &run[from..];
            let cmd = command(collection, part);
            let reply = match self.db.run_command(cmd).await {
                Ok(r) => r,
                Err(e) if is_transient(&e) => return Err(SinkError::Mongo(e)),
                Err(e) if part.len() > 1 => {
                    // Isolate the poison statement: one by one.
                    tracing::warn!(error = %e, statements = part.len(), "command failed, isolating statement by statement");
                    for one in part {
                        Box::pin(self.run_ordered(collection, std::slice::from_ref(one), outcome)).await?;
                    }
                    return Ok(());
                }
                Err(e) => {
                    outcome.failed.push((part[0].entry, e.to_string()));
                    return Ok(());
                }
            };
            let first_error = reply.get_array("writeErrors").ok().and_then(|a| a.first()).and_then(Bson::as_document);
            match first_error {
                None => return Ok(()),
                Some(err) => {
                    let index = match err.get("index") {
                        Some(Bson::Int32(i)) => *i as usize,
                        Some(Bson::Int64(i)) => *i as usize,
                        _ => 0,
                    };
                    let code = match err.get("code") {
                        Some(Bson::Int32(c)) => *c,
                        Some(Bson::Int64(c)) => *c as i32,
                        _ => 0,
                    };
                    let msg = err.get_str("errmsg").unwrap_or("write error").to_string();
                    let Some(tagged) = part.get(index) else { return Ok(()) };
                    let is_upsert = matches!(tagged.stmt, Statement::Update { upsert: true, .. });
                    if code == 11000 && is_upsert {
                        outcome.stale.push(tagged.entry);
                    } else if TRANSIENT_CODES.contains(&code) {
                        return Err(SinkError::MongoWrite { code, message: msg });
                    } else {
                        outcome.failed.push((tagged.entry, format!("code {code}: {msg}")));
                    }
                    from += index + 1;
                }
            }
        }
        Ok(())
    }
}

fn command(collection: &str, part: &[Tagged]) -> Document {
    let is_delete = part.first().is_some_and(|t| matches!(t.stmt, Statement::Delete { .. }));
    let items: Vec<Bson> = part
        .iter()
        .map(|t| match &t.stmt {
            Statement::Update { q, u, multi, upsert } => {
                Bson::Document(doc! { "q": q.clone(), "u": u.clone(), "multi": *multi, "upsert": *upsert })
            }
            Statement::Delete { q } => Bson::Document(doc! { "q": q.clone(), "limit": 1 }),
        })
        .collect();
    if is_delete {
        doc! { "delete": collection, "deletes": items, "ordered": true }
    } else {
        doc! { "update": collection, "updates": items, "ordered": true }
    }
}
