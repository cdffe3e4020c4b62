//! `ecst check`: a dry run against the real services, one line per check with the fix.

use std::time::Duration;

use mysql_async::prelude::Queryable;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

use crate::config::{Config, MappingKind, SnapshotMode};
use crate::events::avro::TableAvro;
use crate::kafka::client_config;
use crate::sink::mongo::MongoWriter;
use crate::source::online::Method;
use crate::source::preflight::{Check, RESUME_POSITION_CHECK, check_mysql};
use crate::source::{connect, load_offset, table_map};

fn pass(name: &str, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok: true,
        detail: detail.into(),
    }
}
/// A purged resume position fails the check only where the source would stop on it: with
/// `when_needed` or `always` it re-snapshots, and the line says so.
fn resume_check_for_mode(c: Check, mode: SnapshotMode) -> Check {
    let mode = match mode {
        SnapshotMode::WhenNeeded => "when_needed",
        SnapshotMode::Always => "always",
        SnapshotMode::Initial | SnapshotMode::Never => return c,
    };
    if c.name != RESUME_POSITION_CHECK || c.ok {
        return c;
    }
    let what = c
        .detail
        .split("; fix:")
        .next()
        .unwrap_or(&c.detail)
        .to_string();
    pass(
        &c.name,
        format!("{what}; the source will re-snapshot (snapshot_mode = \"{mode}\")"),
    )
}
/// How tables added to `source.tables` and `ecst snapshot` are read on this server, and the
/// online snapshots the stored position says are still running.
fn online_check(method: &Method, running: Option<&[crate::offsets::OnlineTable]>) -> Check {
    const READ: &str = "a table added to source.tables, or asked for with `ecst snapshot`, is read online in chunks (no lock; every table streams on meanwhile); one without a primary key is read before the stream resumes, and `ecst snapshot` refuses it";
    let mut detail = match method {
        Method::ReadView => format!("MariaDB, at each chunk's read view: {READ}"),
        Method::Watermarks { table, .. } => format!(
            "by watermarks written to {table} (source.watermark_table) around each chunk: {READ}"
        ),
        Method::Unsupported => "MySQL: none (no binlog position is tied to a consistent read, and source.watermark_table is not set): a table added to source.tables is read before the stream resumes, and `ecst snapshot` is refused; set source.watermark_table to read them online".to_string(),
    };
    if let Some(running) = running.filter(|r| !r.is_empty()) {
        let list: Vec<String> = running
            .iter()
            .map(|t| format!("{} ({} rows so far)", t.table, t.rows_done))
            .collect();
        detail.push_str(&format!("; running: {}", list.join(", ")));
    }
    pass("online snapshots", detail)
}

/// How a fresh snapshot is made consistent (`source.snapshot_locking`) on this server.
fn snapshot_method_check(
    src: &crate::config::SourceConfig,
    mariadb: bool,
    method: &Method,
) -> Check {
    use crate::config::SnapshotLocking as L;
    const NAME: &str = "mysql snapshot method";
    let wait = src.snapshot_lock_wait_s;
    let no_lock = |how: &str| {
        format!(
            "no lock and no consistent read: the stream starts at the binlog's end and every table is read online, {how}, while all of them stream"
        )
    };
    let how = match method {
        Method::Watermarks { table, .. } => {
            format!("its chunks placed by watermarks written to {table}")
        }
        _ => "each chunk at its read view's binlog position".to_string(),
    };
    match (src.snapshot_locking, mariadb) {
        (L::Tables, _) => pass(
            NAME,
            format!(
                "LOCK TABLES … READ on the captured tables for the whole snapshot (source.snapshot_locking = \"tables\"): their writers wait until it ends; locks waited for at most {wait} s"
            ),
        ),
        (L::Online, _) if !method.supported() => fail(
            NAME,
            "snapshot_locking = \"online\" on MySQL needs source.watermark_table (no binlog position is tied to a consistent read); fix: set it, or choose \"auto\", \"global\" or \"tables\"",
        ),
        (L::Online, _) => pass(
            NAME,
            format!(
                "{} (source.snapshot_locking = \"online\"; every table needs a primary key)",
                no_lock(&how)
            ),
        ),
        (L::Auto, false) if method.supported() => pass(
            NAME,
            format!(
                "MySQL: {} (source.watermark_table is set); if a table has no primary key, the locks of the line below instead: FLUSH TABLES WITH READ LOCK for milliseconds, or LOCK TABLES … READ where the server refuses it",
                no_lock(&how)
            ),
        ),
        (_, true) => pass(
            NAME,
            "MariaDB: a consistent snapshot with no lock (its binlog_snapshot_file/position)",
        ),
        (L::Global, false) => pass(
            NAME,
            format!(
                "MySQL: FLUSH TABLES WITH READ LOCK, held only while the position is read and the snapshot transaction opened, waited for at most {wait} s (source.snapshot_lock_wait_s)"
            ),
        ),
        (L::Auto, false) => pass(
            NAME,
            format!(
                "MySQL: FLUSH TABLES WITH READ LOCK, held only while the position is read and the snapshot transaction opened, waited for at most {wait} s; where the server refuses it (RDS, Aurora), LOCK TABLES … READ on the captured tables for the whole snapshot. Set source.watermark_table for a snapshot with no lock"
            ),
        ),
    }
}

/// Whether `source.watermark_table` exists with the columns ecst writes (it is created at the
/// first chunk when missing).
async fn watermark_table_check(mysql: &crate::config::MysqlConfig, table: &str) -> Check {
    const NAME: &str = "mysql watermark table";
    let create = crate::source::watermark::create_statement(table);
    let Ok(mut conn) = crate::source::connect(mysql).await else {
        return fail(NAME, "no connection (see the mysql connection line)");
    };
    if let Ok(false) = crate::source::watermark::commits_in_binlog_order(&mut conn).await {
        return fail(
            NAME,
            "the server has binlog_order_commits = OFF, which placing chunks by watermarks cannot work with; fix: SET GLOBAL binlog_order_commits = ON (the default), or unset source.watermark_table",
        );
    }
    let (db, name) = table.split_once('.').unwrap_or(("", table));
    let cols: Result<Vec<String>, _> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
            (db, name),
        )
        .await;
    match cols {
        Err(e) => fail(NAME, format!("{table}: {e}")),
        Ok(c) if c.is_empty() => pass(
            NAME,
            format!(
                "{table} is missing: ecst creates it at the first online snapshot chunk (CREATE on `{db}`), or create it: {create}; ecst's user needs INSERT and UPDATE on it"
            ),
        ),
        Ok(c) if c.iter().any(|n| n == "source") && c.iter().any(|n| n == "seq") => pass(
            NAME,
            format!("{table}: present; ecst's user needs INSERT and UPDATE on it"),
        ),
        Ok(c) => fail(
            NAME,
            format!(
                "{table} has columns {c:?}, not ecst's (source, seq); fix: choose another table, or drop it and let ecst create it ({create})"
            ),
        ),
    }
}

/// One line per captured table without a primary key, or with `source.message_key_columns`:
/// what keys its Kafka records.
async fn message_key_checks(
    mysql: &crate::config::MysqlConfig,
    src: &crate::config::SourceConfig,
) -> Vec<Check> {
    let mut out = Vec::new();
    let Ok(mut conn) = crate::source::connect(mysql).await else {
        return out; // the connection line already says why
    };
    for t in &src.tables {
        let (db, table) = t.split_once('.').unwrap_or(("", t));
        let Ok(shape) =
            crate::source::table_map::from_information_schema(&mut conn, db, table).await
        else {
            continue; // the table's own line says why
        };
        let columns: Vec<&str> = shape.columns.iter().map(|c| c.name.as_str()).collect();
        let configured = src.message_key_columns.get(t).map(Vec::as_slice);
        if let Some(c) = message_key_line(t, !shape.key.is_empty(), &columns, configured) {
            out.push(c);
        }
    }
    let _ = conn.disconnect().await;
    out
}

/// What keys `table`'s records (see [`message_key_checks`]); `None` for a table keyed by its
/// primary key with nothing configured.
fn message_key_line(
    table: &str,
    has_primary_key: bool,
    columns: &[&str],
    configured: Option<&[String]>,
) -> Option<Check> {
    let name = format!("message key of {table}");
    match (has_primary_key, configured) {
        (true, None) => None,
        (true, Some(_)) => Some(fail(
            &name,
            "the table has a primary key, which is its message key; fix: remove it from source.message_key_columns",
        )),
        (false, None) => Some(pass(
            &name,
            "no primary key: a null Kafka key and no tombstones (as Debezium); read before the stream when added (no online snapshot); source.message_key_columns can key its records",
        )),
        (false, Some(cols)) => match cols.iter().find(|c| !columns.contains(&c.as_str())) {
            Some(missing) => Some(fail(
                &name,
                format!(
                    "source.message_key_columns names `{missing}`, which it has not (its columns: {}); fix: name its columns",
                    columns.join(", ")
                ),
            )),
            None => Some(pass(
                &name,
                format!(
                    "no primary key: keyed by ({}) (source.message_key_columns), with tombstones after deletes",
                    cols.join(", ")
                ),
            )),
        },
    }
}

fn fail(name: &str, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok: false,
        detail: detail.into(),
    }
}

/// Whether the stored position belongs to the server ecst talks to, and what the source will do.
fn lineage_check(
    stored: Option<&crate::offsets::SourceOffset>,
    now: &crate::source::preflight::ServerIdentity,
    mode: SnapshotMode,
) -> Check {
    const NAME: &str = "mysql lineage";
    let Some(o) = stored else {
        return pass(
            NAME,
            format!(
                "no stored position: a fresh start on server_id {} (snapshot_mode = \"{}\")",
                now.server_id,
                mode_name(mode)
            ),
        );
    };
    let foreign =
        crate::source::preflight::foreign_position(o.server_id, o.server_uuid.as_deref(), now);
    match foreign {
        None => pass(
            NAME,
            format!(
                "the stored position {} (epoch {}) was written by this server (server_id {})",
                o.position, o.epoch, now.server_id
            ),
        ),
        Some(why)
            if let Some(set) =
                crate::source::preflight::resumable_by_gtid(o.gtid_set.as_deref(), now) =>
        {
            pass(
                NAME,
                format!(
                    "the stored position {} was written by another server ({why}), which this one has replicated: the source will resume after GTID {set} in a new epoch, with no snapshot",
                    o.position
                ),
            )
        }
        Some(why) if matches!(mode, SnapshotMode::WhenNeeded | SnapshotMode::Always) => pass(
            NAME,
            format!(
                "the stored position {} was written by another server ({why}); the source will re-snapshot in a new epoch",
                o.position
            ),
        ),
        Some(why) => fail(
            NAME,
            format!(
                "the stored position {} was written by another server ({why}); fix: snapshot_mode = \"when_needed\" re-snapshots in a new epoch",
                o.position
            ),
        ),
    }
}

fn mode_name(mode: SnapshotMode) -> &'static str {
    match mode {
        SnapshotMode::Initial => "initial",
        SnapshotMode::WhenNeeded => "when_needed",
        SnapshotMode::Never => "never",
        SnapshotMode::Always => "always",
    }
}

/// Runs every check that applies to the configuration.
pub async fn run_checks(cfg: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    // Kafka first: the stored source position lives there.
    let admin: Result<AdminClient<DefaultClientContext>, _> = client_config(&cfg.kafka).create();
    let mut kafka_ok = false;
    match admin {
        Err(e) => out.push(fail(
            "kafka client",
            format!("{e}; fix: check [kafka] properties"),
        )),
        Ok(admin) => {
            let md = tokio::task::spawn_blocking({
                let client =
                    client_config(&cfg.kafka).create::<AdminClient<DefaultClientContext>>();
                move || {
                    client.map_err(|e| e.to_string()).and_then(|c| {
                        c.inner()
                            .fetch_metadata(None, Duration::from_secs(5))
                            .map(|m| m.brokers().len())
                            .map_err(|e| e.to_string())
                    })
                }
            })
            .await;
            match md {
                Ok(Ok(n)) => {
                    kafka_ok = true;
                    out.push(pass(
                        "kafka reachable",
                        format!("{n} broker(s) at {}", cfg.kafka.bootstrap_servers),
                    ));
                }
                Ok(Err(e)) => out.push(fail(
                    "kafka reachable",
                    format!("{e}; fix: check kafka.bootstrap_servers and the broker"),
                )),
                Err(e) => out.push(fail("kafka reachable", e.to_string())),
            }
            if kafka_ok {
                let mut names = vec![cfg.offsets_topic()];
                if let Some(src) = &cfg.source {
                    for t in &src.tables {
                        let (db, table) = t.split_once('.').unwrap_or(("", t));
                        names.push(cfg.topic_for(db, table));
                    }
                }
                let topics: Vec<NewTopic<'_>> = names
                    .iter()
                    .map(|n| NewTopic::new(n, 1, TopicReplication::Fixed(-1)))
                    .collect();
                let opts = AdminOptions::new()
                    .validate_only(true)
                    .operation_timeout(Some(Duration::from_secs(10)));
                match admin.create_topics(&topics, &opts).await {
                    Ok(results) => {
                        let bad: Vec<String> =
                            results
                                .into_iter()
                                .filter_map(|r| match r {
                                    Ok(_)
                                    | Err((
                                        _,
                                        rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                                    )) => None,
                                    Err((t, c)) => Some(format!("{t}: {c}")),
                                })
                                .collect();
                        if bad.is_empty() {
                            out.push(pass(
                                "kafka topics creatable",
                                format!("{} topic(s) exist or can be created", names.len()),
                            ));
                        } else {
                            out.push(fail(
                                "kafka topics creatable",
                                format!("{}; fix: grant CREATE or create them", bad.join(", ")),
                            ));
                        }
                    }
                    Err(e) => out.push(fail("kafka topics creatable", e.to_string())),
                }
            }
        }
    }
    let registry = crate::app::registry(cfg);
    let mut registry_ok = None;
    match &registry {
        Err(e) => out.push(fail("schema registry", e.to_string())),
        Ok(r) => match r.subjects().await {
            Ok(s) => {
                out.push(pass(
                    "schema registry reachable",
                    format!("{} subject(s) at {}", s.len(), cfg.schema_registry.url),
                ));
                registry_ok = Some(r.clone());
            }
            Err(e) => out.push(fail(
                "schema registry reachable",
                format!("{e}; fix: check schema_registry.url"),
            )),
        },
    }
    if let (Some(mysql), Some(src)) = (&cfg.mysql, &cfg.source) {
        let stored = if kafka_ok {
            load_offset(cfg, &cfg.offsets_topic()).await.ok().flatten()
        } else {
            None
        };
        let resume = stored
            .as_ref()
            .filter(|o| o.snapshot_completed)
            .map(|o| &o.position);
        match check_mysql(mysql, &src.tables, resume).await {
            Ok(crate::source::preflight::Preflight { checks, identity }) => {
                let mariadb = checks
                    .iter()
                    .any(|c| c.name == "mysql connection" && c.detail.contains("MariaDB"));
                out.extend(
                    checks
                        .into_iter()
                        .map(|c| resume_check_for_mode(c, src.snapshot_mode)),
                );
                let method = Method::choose(mariadb, src.watermark_table.as_deref(), &cfg.name);
                out.push(snapshot_method_check(src, mariadb, &method));
                out.push(online_check(
                    &method,
                    stored.as_ref().map(|o| &o.online.tables[..]),
                ));
                if let Some(table) = &src.watermark_table {
                    out.push(watermark_table_check(mysql, table).await);
                }
                out.extend(message_key_checks(mysql, src).await);
                out.push(lineage_check(stored.as_ref(), &identity, src.snapshot_mode));
            }
            // An error that names its own fix (a refused login names the account's plugin)
            // is shown as it is; the others get the generic one.
            Err(e) if e.names_its_fix() => out.push(fail("mysql connection", e.to_string())),
            Err(e) => out.push(fail(
                "mysql connection",
                format!("{e}; fix: check [mysql] host, port, user and password"),
            )),
        }
        if let (Some(reg), Ok(mut conn)) = (&registry_ok, connect(mysql).await) {
            for t in &src.tables {
                let (db, table) = t.split_once('.').unwrap_or(("", t));
                let Ok(schema) = table_map::from_information_schema(&mut conn, db, table).await
                else {
                    continue;
                };
                let Ok(avro) = TableAvro::derive(&cfg.name, &schema) else {
                    continue;
                };
                let subject = format!("{}-value", cfg.topic_for(db, table));
                match reg.is_compatible(&subject, &avro.value_json).await {
                    Ok(None) => out.push(pass(&format!("schema {subject}"), "new subject, will be registered")),
                    Ok(Some(true)) => out.push(pass(&format!("schema {subject}"), "current table shape is compatible")),
                    Ok(Some(false)) => out.push(fail(&format!("schema {subject}"), "current table shape is NOT compatible with the registered schema; fix: relax the subject's compatibility or revert the column change")),
                    Err(e) => out.push(fail(&format!("schema {subject}"), e.to_string())),
                }
            }
        }
    }
    if let (Some(reg), Some(sink)) = (&registry_ok, &cfg.sink) {
        for m in &sink.mappings {
            out.push(mapping_fit(reg, m).await);
        }
    }
    if let (Some(mongo), Some(sink)) = (&cfg.mongo, &cfg.sink) {
        match MongoWriter::connect(mongo.uri.expose(), &mongo.database).await {
            Err(e) => out.push(fail("mongodb connection", e.to_string())),
            Ok(w) => {
                check_mongo(&w, mongo, sink, &mut out).await;
                w.close().await;
            }
        }
    }
    out
}

/// Whether mapping `m` fits the latest schema of its topic (see [`crate::sink::fit`]).
async fn mapping_fit(
    reg: &crate::events::registry::Registry,
    m: &crate::config::MappingConfig,
) -> Check {
    let name = format!("mapping {} fits {}", m.name, m.topic);
    match reg.latest(&format!("{}-value", m.topic)).await {
        Ok(None) => {
            return pass(
                &name,
                "the topic has no schema yet: checked when its first change arrives",
            );
        }
        Ok(Some(_)) => {}
        Err(e) => return fail(&name, e.to_string()),
    }
    match crate::sink::fit::Fitting::default()
        .check_latest(reg, &[m], &m.topic)
        .await
    {
        Ok(()) => pass(
            &name,
            "the latest schema has every column it names and its key",
        ),
        Err(e) => fail(&name, e.to_string()),
    }
}

/// The MongoDB lines of `check` over an open writer.
async fn check_mongo(
    w: &MongoWriter,
    mongo: &crate::config::MongoConfig,
    sink: &crate::config::SinkConfig,
    out: &mut Vec<Check>,
) {
    if let Err(e) = w.database().run_command(bson::doc! { "ping": 1 }).await {
        out.push(fail(
            "mongodb reachable",
            format!("{e}; fix: check mongo.uri"),
        ));
        return;
    }
    out.push(pass(
        "mongodb reachable",
        format!("database `{}`", mongo.database),
    ));
    match crate::sink::server_supports(w, &sink.mappings) {
        Ok(()) => {}
        Err(e) => out.push(fail("mongodb supports every mapping", e.to_string())),
    }
    for m in &sink.mappings {
        if m.kind != MappingKind::Embedded {
            continue;
        }
        let path = m.match_path.clone().unwrap_or_default();
        let name = format!("mongodb index {}.{path}", m.collection);
        match w.ensure_index(&m.collection, &path, false).await {
            Ok(()) => out.push(pass(&name, "present")),
            Err(e) if sink.create_indexes => out.push(pass(
                &name,
                format!("missing, will be created at start ({e})"),
            )),
            Err(e) => out.push(fail(&name, e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purged() -> Check {
        fail(
            "mysql resume position",
            "b.000013:4 was purged from the server (oldest is b.000043); fix: snapshot_mode = \"when_needed\" re-snapshots",
        )
    }

    #[test]
    fn a_purged_position_fails_the_check_only_where_the_source_would_stop() {
        for mode in [SnapshotMode::Initial, SnapshotMode::Never] {
            assert!(!resume_check_for_mode(purged(), mode).ok, "{mode:?}");
        }
        let c = resume_check_for_mode(purged(), SnapshotMode::WhenNeeded);
        assert!(c.ok);
        assert_eq!(
            c.detail,
            "b.000013:4 was purged from the server (oldest is b.000043); the source will re-snapshot (snapshot_mode = \"when_needed\")"
        );
        assert!(resume_check_for_mode(purged(), SnapshotMode::Always).ok);
        let other = fail("mysql log_bin", "off");
        assert!(!resume_check_for_mode(other, SnapshotMode::WhenNeeded).ok);
    }

    #[test]
    fn the_message_key_line_says_what_keys_a_keyless_table_and_refuses_what_cannot_be() {
        let cols = ["msg", "n"];
        assert!(message_key_line("d.t", true, &cols, None).is_none());
        let null = message_key_line("d.t", false, &cols, None).expect("a line");
        assert!(
            null.ok && null.detail.contains("null Kafka key"),
            "{}",
            null.detail
        );
        let keyed =
            message_key_line("d.t", false, &cols, Some(&["msg".to_string()])).expect("a line");
        assert!(
            keyed.ok && keyed.detail.contains("keyed by (msg)"),
            "{}",
            keyed.detail
        );
        let typo =
            message_key_line("d.t", false, &cols, Some(&["mgs".to_string()])).expect("a line");
        assert!(!typo.ok && typo.detail.contains("`mgs`"), "{}", typo.detail);
        let keyed_table =
            message_key_line("d.t", true, &cols, Some(&["msg".to_string()])).expect("a line");
        assert!(!keyed_table.ok && keyed_table.detail.contains("has a primary key"));
    }

    #[test]
    fn the_online_snapshot_line_says_how_added_tables_are_read_and_which_are_running() {
        let none = online_check(&Method::ReadView, None);
        assert!(
            none.ok && none.detail.contains("read online"),
            "{}",
            none.detail
        );
        let running = [crate::offsets::OnlineTable {
            table: "test.product".into(),
            last_key: None,
            rows_done: 1200,
        }];
        let some = online_check(&Method::ReadView, Some(&running));
        assert!(
            some.detail
                .contains("running: test.product (1200 rows so far)"),
            "{}",
            some.detail
        );
        let mysql = online_check(&Method::Unsupported, None);
        assert!(
            mysql.detail.starts_with("MySQL: none")
                && mysql.detail.contains("refused")
                && mysql.detail.contains("source.watermark_table"),
            "{}",
            mysql.detail
        );
        let marks = online_check(&Method::choose(false, Some("ops.wm"), "me"), None);
        assert!(
            marks.detail.contains("by watermarks written to ops.wm")
                && marks.detail.contains("read online"),
            "{}",
            marks.detail
        );
    }

    #[test]
    fn the_lineage_line_says_whose_position_is_stored_and_fails_only_where_the_source_would_stop() {
        let now = crate::source::preflight::ServerIdentity {
            server_id: 7,
            server_uuid: None,
            gtid_binlog_pos: None,
            gtid_executed: None,
        };
        let stored = |server_id| crate::offsets::SourceOffset {
            position: "mariadb-bin.000003:400".parse().expect("position"),
            gtid: None,
            gtid_set: None,
            epoch: 5,
            server_id: Some(server_id),
            server_uuid: None,
            snapshot_completed: true,
            tables: vec![],
            snapshot_segments: vec![],
            online: Default::default(),
            within: None,
        };
        let same = lineage_check(Some(&stored(7)), &now, SnapshotMode::Initial);
        assert!(same.ok && same.detail.contains("epoch 5") && same.detail.contains("this server"));
        let other = lineage_check(Some(&stored(1)), &now, SnapshotMode::Initial);
        assert!(
            !other.ok && other.detail.contains("server_id 1"),
            "{}",
            other.detail
        );
        assert!(lineage_check(Some(&stored(1)), &now, SnapshotMode::WhenNeeded).ok);
        assert!(lineage_check(None, &now, SnapshotMode::Initial).ok);
        // A promoted replica that has every GTID of the stored state: resumed by GTID.
        let replica = crate::source::preflight::ServerIdentity {
            gtid_binlog_pos: Some("0-1-9".into()),
            ..now.clone()
        };
        let with_set = crate::offsets::SourceOffset {
            gtid_set: Some("0-1-5".into()),
            ..stored(1)
        };
        let resumed = lineage_check(Some(&with_set), &replica, SnapshotMode::Initial);
        assert!(
            resumed.ok && resumed.detail.contains("resume after GTID 0-1-5"),
            "{}",
            resumed.detail
        );
        // One that lags behind it is not.
        let lagging = crate::source::preflight::ServerIdentity {
            gtid_binlog_pos: Some("0-1-4".into()),
            ..now.clone()
        };
        assert!(!lineage_check(Some(&with_set), &lagging, SnapshotMode::Initial).ok);
    }
}
