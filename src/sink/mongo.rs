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
//!
//! **One plan for every server.** An embedded fan-out is one guarded `updateMany` per changed
//! key (`{match_path: key, guard}`), over an index on the match path on MongoDB. FerretDB 1.x
//! used to get a plan of its own (one `$in` lookup per batch, then `_id`-keyed writes), because
//! on SQLite it scanned the collection for every dotted filter. On PostgreSQL it pushes dotted
//! equality down, and the plain plan is far faster there (BENCHMARKS.md, 2026-12-01: at 100
//! changes/s over 5,000 orders, p50 140 ms and p99 249 ms against 1.8 s and 4.9 s for the lookup
//! plan). The lookup plan is gone, and with it its defects (lookups run before the batch's
//! writes, so a key change followed by an update landed on the wrong parents; `_id` writes
//! without the guard). Two FerretDB deviations remain handled here: commands stay small (it
//! holds a pooled connection per matched single-document statement until the command ends, and
//! 50 of them wedge its default pool), and a statement error in a multi-statement command is
//! isolated statement by statement (FerretDB reports it at index 0, whichever it was).

use bson::{Bson, Document, doc};
use mongodb::error::ErrorKind;

use super::SinkError;
use super::mapping::Statement;

/// Statements per command on MongoDB (its `maxWriteBatchSize` is 100,000; keep requests small).
const MAX_STATEMENTS_PER_COMMAND: usize = 1_000;
/// Statements per command on FerretDB 1.x: it keeps one pooled connection per matched
/// single-document statement until the whole command ends (its default pool holds 50, and on
/// SQLite 100), so a larger command can wait for a connection for ever.
const MAX_STATEMENTS_PER_COMMAND_FERRETDB: usize = 25;

/// Server error codes that say something about the server or the environment, never about the
/// change: retried (the retry loop makes a long run visible), never dead-lettered. Network and
/// election codes (6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 50),
/// authorization and quotas (13 Unauthorized, 8000 AtlasError), lock and interruption
/// (24 LockTimeout, 11601 Interrupted, 112 WriteConflict), sharding (13388 StaleConfig,
/// 63 StaleShardVersion, 150 StaleEpoch), write-concern failures (64, 91), and 1 InternalError:
/// the server failing in itself, which is what FerretDB answers while its PostgreSQL is down or
/// restarting ("dial tcp …: connection refused", "terminating connection"); dead-lettered, those
/// changes were lost to their copies.
const TRANSIENT_CODES: &[i32] = &[
    1, 6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 50, 13, 8000, 24, 11601,
    112, 13388, 63, 150, 64,
];

/// Classes a driver error.
pub fn is_transient(e: &mongodb::error::Error) -> bool {
    // The server's own verdict on a write: retry it.
    if e.contains_label("RetryableWriteError") || e.contains_label("TransientTransactionError") {
        return true;
    }
    match e.kind.as_ref() {
        ErrorKind::Command(c) => TRANSIENT_CODES.contains(&c.code),
        ErrorKind::Write(_) | ErrorKind::InsertMany(_) => false,
        ErrorKind::InvalidArgument { .. }
        | ErrorKind::BsonDeserialization(_)
        | ErrorKind::BsonSerialization(_) => false,
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
    client: mongodb::Client,
    db: mongodb::Database,
    /// FerretDB (`buildInfo.ferretdbVersion`): smaller commands, errors isolated one by one.
    ferretdb: bool,
    /// The URI's write concern, sent with every command (`run_command` applies none itself).
    write_concern: Option<Document>,
}

impl MongoWriter {
    /// Connects (lazily: the driver connects on first use) to `uri` / `database`.
    pub async fn connect(uri: &str, database: &str) -> Result<Self, SinkError> {
        let mut opts = mongodb::options::ClientOptions::parse(uri)
            .await
            .map_err(SinkError::mongo)?;
        opts.app_name.get_or_insert_with(|| "ecst".into());
        if opts.server_selection_timeout.is_none() {
            opts.server_selection_timeout = Some(std::time::Duration::from_secs(5));
        }
        let opts_write_concern = opts.write_concern.clone();
        let client = mongodb::Client::with_options(opts).map_err(SinkError::mongo)?;
        let db = client.database(database);
        let info = db
            .run_command(doc! { "buildInfo": 1 })
            .await
            .map_err(SinkError::mongo)?;
        let ferretdb = info.contains_key("ferretdbVersion");
        if ferretdb {
            tracing::info!(
                version = info.get_str("ferretdbVersion").unwrap_or("?"),
                "ferretdb detected: commands of at most {MAX_STATEMENTS_PER_COMMAND_FERRETDB} statements, write errors isolated one by one"
            );
        }
        let write_concern = match &opts_write_concern {
            Some(wc) if wc.w.is_some() || wc.w_timeout.is_some() || wc.journal.is_some() => {
                Some(bson::to_document(wc).map_err(|e| {
                    SinkError::Mongo(mongodb::error::Error::custom(format!(
                        "write concern of mongo.uri: {e}"
                    )))
                })?)
            }
            _ => None,
        };
        Ok(MongoWriter {
            client,
            db,
            ferretdb,
            write_concern,
        })
    }

    /// Shuts the client down: its background tasks end and its connections close now, while
    /// the runtime runs (bounded: a server that does not answer does not hold up the exit).
    pub async fn close(self) {
        let shutdown = self.client.shutdown();
        if tokio::time::timeout(std::time::Duration::from_secs(5), shutdown)
            .await
            .is_err()
        {
            tracing::warn!("mongodb client did not shut down within 5 s");
        }
    }

    /// Whether the server is FerretDB.
    pub fn is_ferretdb(&self) -> bool {
        self.ferretdb
    }

    /// The database handle (tests and checks).
    pub fn database(&self) -> &mongodb::Database {
        &self.db
    }

    /// Checks that `collection` has an index starting with `path`; creates it if allowed.
    pub async fn ensure_index(
        &self,
        collection: &str,
        path: &str,
        create: bool,
    ) -> Result<(), SinkError> {
        let coll = self.db.collection::<Document>(collection);
        let mut cursor = match coll.list_indexes().await {
            Ok(c) => Some(c),
            // A collection that does not exist yet has no indexes (NamespaceNotFound).
            Err(e) if matches!(e.kind.as_ref(), ErrorKind::Command(c) if c.code == 26) => None,
            Err(e) => return Err(SinkError::mongo(e)),
        };
        if let Some(cursor) = cursor.as_mut() {
            use futures::TryStreamExt;
            while let Some(idx) = cursor.try_next().await.map_err(SinkError::mongo)? {
                if idx.keys.keys().next().map(String::as_str) == Some(path) {
                    return Ok(());
                }
            }
        }
        if !create {
            return Err(SinkError::MissingIndex {
                collection: collection.into(),
                path: path.into(),
            });
        }
        let model = mongodb::IndexModel::builder()
            .keys(doc! { path: 1 })
            .build();
        coll.create_index(model).await.map_err(SinkError::mongo)?;
        tracing::info!(collection, path, "index created");
        Ok(())
    }

    /// Runs the statements of one collection, in order.
    pub async fn apply(&self, collection: &str, stmts: &[Tagged]) -> Result<Outcome, SinkError> {
        let stmts: Vec<Tagged> = stmts
            .iter()
            .map(|t| match &t.stmt {
                Statement::FanOut {
                    q,
                    u,
                    array_filters,
                    ..
                } => Tagged {
                    entry: t.entry,
                    stmt: Statement::Update {
                        q: q.clone(),
                        u: u.clone(),
                        multi: true,
                        upsert: false,
                        array_filters: array_filters.clone(),
                    },
                },
                _ => t.clone(),
            })
            .collect();
        let stmts = stmts.as_slice();
        let per_command = if self.ferretdb {
            MAX_STATEMENTS_PER_COMMAND_FERRETDB
        } else {
            MAX_STATEMENTS_PER_COMMAND
        };
        let mut outcome = Outcome::default();
        let mut start = 0;
        while start < stmts.len() {
            let is_delete = matches!(stmts[start].stmt, Statement::Delete { .. });
            let mut end = start;
            while end < stmts.len()
                && end - start < per_command
                && matches!(stmts[end].stmt, Statement::Delete { .. }) == is_delete
            {
                end += 1;
            }
            self.run_ordered(collection, &stmts[start..end], &mut outcome)
                .await?;
            start = end;
        }
        Ok(outcome)
    }

    async fn run_ordered(
        &self,
        collection: &str,
        run: &[Tagged],
        outcome: &mut Outcome,
    ) -> Result<(), SinkError> {
        let mut from = 0;
        while from < run.len() {
            let part = &run[from..];
            let mut cmd = command(collection, part);
            if let Some(wc) = &self.write_concern {
                cmd.insert("writeConcern", wc.clone());
            }
            let reply = match self.db.run_command(cmd).await.map_err(SinkError::mongo) {
                Ok(r) => r,
                // Only a definite error of the statements themselves is isolated and
                // dead-lettered; the environment's (an outage, refused credentials, untrusted
                // TLS) stops or retries the batch.
                Err(SinkError::Mongo(e)) if !is_transient(&e) && part.len() > 1 => {
                    // Isolate the poison statement: one by one.
                    tracing::warn!(error = %e, statements = part.len(), "command failed, isolating statement by statement");
                    for one in part {
                        Box::pin(self.run_ordered(collection, std::slice::from_ref(one), outcome))
                            .await?;
                    }
                    return Ok(());
                }
                Err(SinkError::Mongo(e)) if !is_transient(&e) => {
                    outcome.failed.push((part[0].entry, e.to_string()));
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            // `ok: 1` with a writeConcernError: the writes may be rolled back (a primary that
            // stepped down during a majority wait). Not acknowledged, so retried as a whole.
            if let Some(e) = write_concern_error(&reply) {
                return Err(e);
            }
            let first_error = reply
                .get_array("writeErrors")
                .ok()
                .and_then(|a| a.first())
                .and_then(Bson::as_document);
            match first_error {
                None => return Ok(()),
                // FerretDB reports a statement error at index 0 whichever statement it was:
                // find it one by one (what ran before it is guarded, so running it again is
                // a no-op).
                Some(_) if self.ferretdb && part.len() > 1 => {
                    for one in part {
                        Box::pin(self.run_ordered(collection, std::slice::from_ref(one), outcome))
                            .await?;
                    }
                    return Ok(());
                }
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
                    let Some(tagged) = part.get(index) else {
                        return Ok(());
                    };
                    let is_upsert = matches!(tagged.stmt, Statement::Update { upsert: true, .. });
                    if code == 11000 && is_upsert && duplicate_is_on_id(err) {
                        outcome.stale.push(tagged.entry);
                    } else if code == 11000 {
                        // Another unique index (e.g. on email) refused the copy: not stale,
                        // and not silent.
                        outcome.failed.push((
                            tagged.entry,
                            format!("a unique index other than _id refused the write: {msg}"),
                        ));
                    } else if TRANSIENT_CODES.contains(&code) {
                        return Err(SinkError::MongoWrite { code, message: msg });
                    } else {
                        outcome
                            .failed
                            .push((tagged.entry, format!("code {code}: {msg}")));
                    }
                    from += index + 1;
                }
            }
        }
        Ok(())
    }
}

/// One statement of an `update` command.
fn update_item(
    q: &Document,
    u: &Document,
    multi: bool,
    upsert: bool,
    filters: &[Document],
) -> Bson {
    let mut d = doc! { "q": q.clone(), "u": u.clone(), "multi": multi, "upsert": upsert };
    if !filters.is_empty() {
        d.insert("arrayFilters", filters.to_vec());
    }
    Bson::Document(d)
}

/// The write-concern error of a command reply, if any (`ok: 1` does not mean acknowledged).
fn write_concern_error(reply: &Document) -> Option<SinkError> {
    let wce = reply.get_document("writeConcernError").ok()?;
    Some(SinkError::WriteConcern {
        code: wce.get_i32("code").unwrap_or(0),
        message: wce
            .get_str("errmsg")
            .unwrap_or("write concern error")
            .into(),
    })
}

/// Whether a duplicate-key write error is on `_id` (the race of two guarded upserts of one
/// document: the other, newer one won) rather than on another unique index.
fn duplicate_is_on_id(err: &Document) -> bool {
    match err.get_document("keyPattern") {
        Ok(kp) => kp.keys().eq(["_id"]),
        // Servers that report no key pattern name the index in the message.
        Err(_) => err
            .get_str("errmsg")
            .is_ok_and(|m| m.contains("index: _id_ ") || m.contains("_id_ dup key")),
    }
}

fn command(collection: &str, part: &[Tagged]) -> Document {
    let is_delete = part
        .first()
        .is_some_and(|t| matches!(t.stmt, Statement::Delete { .. }));
    let items: Vec<Bson> = part
        .iter()
        .map(|t| match &t.stmt {
            Statement::Update {
                q,
                u,
                multi,
                upsert,
                array_filters,
            } => update_item(q, u, *multi, *upsert, array_filters),
            // Turned into updates by `apply` before commands are built.
            Statement::FanOut {
                q,
                u,
                array_filters,
                ..
            } => update_item(q, u, true, false, array_filters),
            Statement::Delete { q, many } => {
                Bson::Document(doc! { "q": q.clone(), "limit": i32::from(!*many) })
            }
        })
        .collect();
    if is_delete {
        doc! { "delete": collection, "deletes": items, "ordered": true }
    } else {
        doc! { "update": collection, "updates": items, "ordered": true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Classify, ErrorClass};

    #[test]
    fn an_ok_reply_with_a_write_concern_error_is_a_transient_failure_not_a_success() {
        let reply = doc! {
            "ok": 1, "n": 3, "nModified": 3,
            "writeConcernError": { "code": 91, "codeName": "ShutdownInProgress", "errmsg": "primary stepped down" },
        };
        let e = write_concern_error(&reply).expect("a write concern error");
        assert_eq!(e.class(), ErrorClass::Transient);
        assert!(e.to_string().contains("primary stepped down"), "{e}");
        assert!(write_concern_error(&doc! { "ok": 1, "n": 3 }).is_none());
    }

    #[test]
    fn a_duplicate_key_is_stale_only_on_the_id_index() {
        let on_id = doc! { "code": 11000, "keyPattern": { "_id": 1 }, "errmsg": "E11000 duplicate key error collection: d.c index: _id_ dup key: { _id: 1 }" };
        let on_email = doc! { "code": 11000, "keyPattern": { "email": 1 }, "errmsg": "E11000 duplicate key error collection: d.c index: email_1 dup key: { email: \"a@x\" }" };
        assert!(duplicate_is_on_id(&on_id));
        assert!(!duplicate_is_on_id(&on_email));
        // Without a key pattern, the index name in the message decides.
        assert!(duplicate_is_on_id(
            &doc! { "errmsg": "E11000 duplicate key error collection: d.c index: _id_ dup key: { _id: 1 }" }
        ));
        assert!(!duplicate_is_on_id(
            &doc! { "errmsg": "E11000 duplicate key error collection: d.c index: email_1 dup key" }
        ));
    }

    #[test]
    fn an_untrusted_certificate_and_refused_credentials_are_definite_stops_naming_mongodb() {
        let cert = mongodb::error::Error::from(std::io::Error::other(
            "invalid peer certificate: UnknownIssuer",
        ));
        // A transient driver error as such: only the conversion makes it a definite stop,
        // so the write path never dead-letters it either.
        assert!(is_transient(&cert));
        let e = SinkError::mongo(cert);
        assert!(matches!(e, SinkError::MongoTls { .. }), "{e:?}");
        assert_eq!(e.class(), ErrorClass::Definite);
        assert!(
            e.to_string().starts_with("mongodb's TLS") && e.to_string().contains("tlsCAFile"),
            "{e}"
        );
        let refused: mongodb::error::CommandError = bson::from_document(doc! {
            "code": 18, "codeName": "AuthenticationFailed", "errmsg": "Authentication failed.",
        })
        .expect("a command error");
        let e = SinkError::mongo(ErrorKind::Command(refused).into());
        assert!(matches!(e, SinkError::MongoCredentials { .. }), "{e:?}");
        assert_eq!(e.class(), ErrorClass::Definite);
        assert!(
            e.to_string().contains("mongodb refused the credentials"),
            "{e}"
        );
        let outage =
            SinkError::mongo(std::io::Error::from(std::io::ErrorKind::ConnectionReset).into());
        assert!(matches!(outage, SinkError::Mongo(_)));
        assert_eq!(outage.class(), ErrorClass::Transient);
    }

    #[test]
    fn environment_codes_and_retryable_labels_are_transient() {
        for code in [1, 13, 8000, 24, 11601, 13388, 112, 91] {
            assert!(TRANSIENT_CODES.contains(&code), "{code}");
        }
        assert!(
            !TRANSIENT_CODES.contains(&11000),
            "a duplicate key is about the data"
        );
    }
}
