//! Preflight: server settings and grants checked before streaming, one clear line each.
//!
//! Every check yields a [`Check`] (name, pass/fail, what was found, how to fix it). The source
//! refuses to start when any fails; `ecst check` prints them all.

use mysql_async::prelude::Queryable;

use super::{SourceError, connect};
use crate::config::MysqlConfig;
use crate::offsets::BinlogPosition;

/// Name of the line about the stored resume position: the source reads a failing one as "purged",
/// and `ecst check` words it after the snapshot mode.
pub const RESUME_POSITION_CHECK: &str = "mysql resume position";

/// One preflight result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked, e.g. `mysql binlog_format`.
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found, and for failures what it must be and how to fix it.
    pub detail: String,
}

impl Check {
    fn pass(name: &str, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            ok: true,
            detail: detail.into(),
        }
    }
    fn fail(name: &str, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            ok: false,
            detail: detail.into(),
        }
    }
}

fn setting(name: &str, actual: Option<&str>, expected: &str, fix: &str) -> Check {
    let check = format!("mysql {name}");
    match actual {
        Some(a) if a.eq_ignore_ascii_case(expected) => Check::pass(&check, format!("{name} = {a}")),
        other => Check::fail(
            &check,
            format!(
                "{name} is {}, must be {expected}; fix: {fix}",
                other.unwrap_or("unset")
            ),
        ),
    }
}

/// Who the server is: what a stored position is checked against before a resume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerIdentity {
    /// `@@server_id`.
    pub server_id: u32,
    /// `@@server_uuid` (MySQL; MariaDB has none).
    pub server_uuid: Option<String>,
    /// `@@gtid_binlog_pos` (MariaDB): the last GTID of each domain in the binlog.
    pub gtid_binlog_pos: Option<String>,
    /// `@@global.gtid_executed` and `@@global.gtid_purged` (MySQL): every transaction this
    /// server has, and those of them its binlog no longer holds.
    pub gtid_executed: Option<(String, String)>,
}

/// The server's own spelling of `db.table` when it differs from the configured one in case
/// only (`None` when it is the same, or when no such table exists).
fn spelled_otherwise(db: &str, table: &str, stored: &[(String, String)]) -> Option<String> {
    if stored.iter().any(|(d, t)| d == db && t == table) {
        return None;
    }
    stored.first().map(|(d, t)| format!("{d}.{t}"))
}

/// Why a configured name that differs from the server's in case only is refused, and the fix.
fn name_case_fix(configured: &str, theirs: &str, lctn: u32) -> String {
    if lctn == 0 {
        format!(
            "no table `{configured}`: the server has `{theirs}` and compares names case-sensitively (lower_case_table_names = 0); fix: write `{theirs}` in source.tables"
        )
    } else {
        format!(
            "the server stores it as `{theirs}` (lower_case_table_names = {lctn}) and its binlog names it so: with `{configured}` the snapshot would read it but no change would be captured; fix: write `{theirs}` in source.tables"
        )
    }
}

/// Reads the server's identity (on the preflight's connection: no round trip of its own).
async fn server_identity(conn: &mut mysql_async::Conn) -> Result<ServerIdentity, SourceError> {
    let server_id: Option<u32> = conn.query_first("SELECT @@server_id").await?;
    // MariaDB: "Unknown system variable" (1193).
    let server_uuid: Option<String> = match conn.query_first("SELECT @@server_uuid").await {
        Ok(v) => v,
        Err(mysql_async::Error::Server(e)) if e.code == 1193 => None,
        Err(e) => return Err(e.into()),
    };
    let (gtid_binlog_pos, gtid_executed) = if server_uuid.is_none() {
        (conn.query_first("SELECT @@gtid_binlog_pos").await?, None)
    } else {
        let sets: Option<(String, String)> = conn
            .query_first("SELECT @@global.gtid_executed, @@global.gtid_purged")
            .await?;
        (None, sets)
    };
    Ok(ServerIdentity {
        server_id: server_id.unwrap_or(0),
        server_uuid,
        gtid_binlog_pos,
        gtid_executed,
    })
}

/// Whether the binlog went back behind a stored MariaDB GTID (`domain-server-seq`): its domain
/// is gone from `@@gtid_binlog_pos`, or holds a lower sequence number. `RESET MASTER` does that
/// (the binlog and its GTID state start again), as does a restore of an older backup; purging
/// old files does not (the binlog keeps the GTID state).
pub fn gtid_went_back(stored: &str, binlog_pos: &str) -> bool {
    let parse = |g: &str| -> Option<(u32, u64)> {
        let mut it = g.trim().split('-');
        let domain = it.next()?.parse().ok()?;
        let _server: u32 = it.next()?.parse().ok()?;
        let seq = it.next()?.parse().ok()?;
        it.next().is_none().then_some((domain, seq))
    };
    let Some((domain, seq)) = parse(stored) else {
        return false; // not a MariaDB GTID: nothing to compare
    };
    let now = binlog_pos
        .split(',')
        .filter_map(parse)
        .find(|(d, _)| *d == domain);
    now.is_none_or(|(_, s)| s < seq)
}

/// Why a stored position written by `stored_id`/`stored_uuid` is not a position on `now`
/// (`None`: it is, or nothing says otherwise).
pub fn foreign_position(
    stored_id: Option<u32>,
    stored_uuid: Option<&str>,
    now: &ServerIdentity,
) -> Option<String> {
    if let (Some(a), Some(b)) = (stored_uuid, now.server_uuid.as_deref())
        && a != b
    {
        return Some(format!("server_uuid {a}, now {b}"));
    }
    match stored_id {
        Some(id) if id != now.server_id => Some(format!("server_id {id}, now {}", now.server_id)),
        _ => None,
    }
}

/// The server's current binlog end, read by column name (MySQL 8.0 returns five columns where
/// MariaDB returns four): `SHOW BINARY LOG STATUS` (MySQL 8.2+; 8.4 removed the older statement),
/// else `SHOW MASTER STATUS` (MySQL before 8.2, MariaDB).
pub async fn binlog_end(conn: &mut mysql_async::Conn) -> Result<BinlogPosition, SourceError> {
    Ok(binlog_status(conn).await?.0)
}

/// The binlog's current end and, on MySQL, the GTID set it covers (`Executed_Gtid_Set`, read
/// in the same statement, so the two agree).
pub async fn binlog_status(
    conn: &mut mysql_async::Conn,
) -> Result<(BinlogPosition, Option<String>), SourceError> {
    let row: Option<mysql_async::Row> = match conn.query_first("SHOW BINARY LOG STATUS").await {
        Ok(r) => r,
        // 1064: a syntax error, the server predates the statement.
        Err(mysql_async::Error::Server(e)) if e.code == 1064 => {
            conn.query_first("SHOW MASTER STATUS").await?
        }
        Err(e) => return Err(e.into()),
    };
    let row = row.ok_or(SourceError::NoBinlogPosition)?;
    let position = position_of_status_row(&row).ok_or(SourceError::NoBinlogPosition)?;
    let executed = row
        .columns_ref()
        .iter()
        .position(|c| c.name_str().eq_ignore_ascii_case("Executed_Gtid_Set"))
        .and_then(|i| row.get_opt::<String, _>(i))
        .and_then(Result::ok)
        .map(|s| s.replace(['\n', ' '], ""));
    Ok((position, executed))
}

/// `File` and `Position` of a binlog status row, whatever other columns it has.
fn position_of_status_row(row: &mysql_async::Row) -> Option<BinlogPosition> {
    let idx = |name: &str| {
        row.columns_ref()
            .iter()
            .position(|c| c.name_str().eq_ignore_ascii_case(name))
    };
    let file: String = row.get_opt(idx("File")?)?.ok()?;
    let pos: u64 = row.get_opt(idx("Position")?)?.ok()?;
    (!file.is_empty()).then_some(BinlogPosition { file, pos })
}

/// The stored GTID state, if this server can resume after it although it did not write the
/// stored position (a promoted replica), with a non-empty state:
/// * MariaDB: every domain of it at or behind the server's `@@gtid_binlog_pos`. The dump then
///   checks strictly that each GTID is in the server's binlog (1236 otherwise).
/// * MySQL: every transaction of it in the server's `gtid_executed`, and every one the server
///   purged from its binlog among them (else the server lacks transactions after the stored
///   position). The dump (`COM_BINLOG_DUMP_GTID`) then sends every transaction not in it.
pub fn resumable_by_gtid(stored: Option<&str>, now: &ServerIdentity) -> Option<String> {
    use crate::gtid::GtidState;
    let set = stored.filter(|s| !s.is_empty())?;
    let ours = GtidState::parse(set).ok()?;
    let resumable = match &ours {
        GtidState::MariaDb(_) => {
            ours.contained_in(&GtidState::parse_mariadb(now.gtid_binlog_pos.as_deref()?).ok()?)
        }
        GtidState::MySql(_) => {
            let (executed, purged) = now.gtid_executed.as_ref()?;
            ours.contained_in(&GtidState::parse_mysql(executed).ok()?)
                && GtidState::parse_mysql(purged).ok()?.contained_in(&ours)
        }
    };
    resumable.then(|| set.to_string())
}

/// What preflight found: one line per check, and who the server is.
#[derive(Debug, Clone)]
pub struct Preflight {
    /// The checks, in order.
    pub checks: Vec<Check>,
    /// The server's identity, to compare with the stored position's.
    pub identity: ServerIdentity,
}

/// Runs every MySQL check, on one connection. A connection failure is returned as an error
/// (transient).
pub async fn check_mysql(
    cfg: &MysqlConfig,
    tables: &[String],
    resume: Option<&BinlogPosition>,
) -> Result<Preflight, SourceError> {
    let mut conn = connect(cfg).await?;
    let identity = server_identity(&mut conn).await?;
    let mut out = Vec::new();
    let version: String = conn
        .query_first("SELECT VERSION()")
        .await?
        .unwrap_or_default();
    out.push(Check::pass(
        "mysql connection",
        format!("connected to {version}"),
    ));
    let mariadb = version.contains("MariaDB");
    let vars: Vec<(String, String)> = conn
        .query(
            "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('log_bin', 'binlog_format', \
             'binlog_row_image', 'binlog_row_metadata', 'binlog_checksum', 'binlog_row_value_options')",
        )
        .await?;
    let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let cnf = "set it in the server config ([mysqld] section) and restart, or SET GLOBAL";
    out.push(setting(
        "log_bin",
        get("log_bin"),
        "ON",
        "start the server with log_bin (and a server_id)",
    ));
    out.push(setting("binlog_format", get("binlog_format"), "ROW", cnf));
    out.push(setting(
        "binlog_row_image",
        get("binlog_row_image"),
        "FULL",
        cnf,
    ));
    out.push(setting(
        "binlog_row_metadata",
        get("binlog_row_metadata"),
        "FULL",
        "SET GLOBAL binlog_row_metadata = FULL (MariaDB 10.5+, MySQL 8.0+): column names, signedness and keys are read from the binlog",
    ));
    match get("binlog_row_value_options") {
        Some(v) if v.to_ascii_uppercase().contains("PARTIAL_JSON") => out.push(Check::fail(
            "mysql binlog_row_value_options",
            "is PARTIAL_JSON, must be empty as the server default: ecst applies the partial JSON updates of a session that sets it to the FULL before image (tested on recorded binlogs only, no live MySQL)",
        )),
        _ => {}
    }
    match get("binlog_checksum") {
        Some(c) if c.eq_ignore_ascii_case("CRC32") || c.eq_ignore_ascii_case("NONE") => out.push(
            Check::pass("mysql binlog_checksum", format!("binlog_checksum = {c}")),
        ),
        other => out.push(Check::fail(
            "mysql binlog_checksum",
            format!(
                "binlog_checksum is {}, must be CRC32 or NONE",
                other.unwrap_or("unset")
            ),
        )),
    }
    // Grants: try what the source does rather than parse SHOW GRANTS.
    match conn.query::<mysql_async::Row, _>("SHOW BINARY LOGS").await {
        Ok(logs) => {
            let names: Vec<String> = logs.iter().filter_map(|r| r.get::<String, _>(0)).collect();
            let size_of = |file: &str| {
                logs.iter()
                    .find(|r| r.get::<String, _>(0).as_deref() == Some(file))
                    .and_then(|r| r.get::<u64, _>(1))
            };
            out.push(Check::pass(
                "mysql grant binlog monitor",
                format!("{} binlog file(s) visible", names.len()),
            ));
            if let Some(pos) = resume {
                if let Some(size) = size_of(&pos.file).filter(|&size| pos.pos > size) {
                    // The file is there but shorter: the binlog was reset (RESET MASTER) and
                    // has been written again, or this is another server with the same names.
                    out.push(Check::fail(
                        RESUME_POSITION_CHECK,
                        format!(
                            "{pos} lies beyond the end of {} ({size} bytes): the binlog was reset (RESET MASTER) or this is another server; fix: snapshot_mode = \"when_needed\" re-snapshots",
                            pos.file
                        ),
                    ));
                } else if names.iter().any(|n| n == &pos.file) {
                    out.push(Check::pass(
                        RESUME_POSITION_CHECK,
                        format!("{pos} is still on the server"),
                    ));
                } else {
                    out.push(Check::fail(
                        RESUME_POSITION_CHECK,
                        format!(
                            "{pos} was purged from the server (oldest is {}); fix: snapshot_mode = \"when_needed\" re-snapshots",
                            names.first().map_or("none", String::as_str)
                        ),
                    ));
                }
            }
        }
        Err(e) => out.push(Check::fail(
            "mysql grant binlog monitor",
            format!(
                "SHOW BINARY LOGS failed ({e}); fix: GRANT {} ON *.* TO '{}'",
                if mariadb {
                    "BINLOG MONITOR, REPLICATION SLAVE"
                } else {
                    "REPLICATION CLIENT, REPLICATION SLAVE"
                },
                cfg.user
            ),
        )),
    }
    let lctn: u32 = conn
        .query_first("SELECT @@lower_case_table_names")
        .await?
        .unwrap_or(0);
    // The names the server stores, which are the ones its binlog carries: the configured
    // schemas' tables, in one query (one per table scanned every schema's tables each time, a
    // lowered name being no lookup key: 9 s of start-up for 1,000 tables).
    let mut schemas: Vec<String> = tables
        .iter()
        .map(|t| t.split_once('.').map_or("", |(db, _)| db).to_lowercase())
        .collect();
    schemas.sort();
    schemas.dedup();
    let in_list = vec!["?"; schemas.len()].join(", ");
    let rows: Vec<(String, String)> = if schemas.is_empty() {
        Vec::new()
    } else {
        conn.exec(
            format!(
                "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES \
                 WHERE LOWER(TABLE_SCHEMA) IN ({in_list})"
            ),
            schemas,
        )
        .await?
    };
    let mut all_stored: std::collections::HashMap<(String, String), Vec<(String, String)>> =
        std::collections::HashMap::new();
    for (d, n) in rows {
        all_stored
            .entry((d.to_lowercase(), n.to_lowercase()))
            .or_default()
            .push((d, n));
    }
    for t in tables {
        let (db, table) = t.split_once('.').unwrap_or(("", t));
        let sql = format!(
            "SELECT 1 FROM `{}`.`{}` LIMIT 0",
            db.replace('`', "``"),
            table.replace('`', "``")
        );
        let read = conn.query_drop(sql).await;
        let stored = all_stored
            .get(&(db.to_lowercase(), table.to_lowercase()))
            .cloned()
            .unwrap_or_default();
        let name = format!("mysql table {t}");
        out.push(match (read, spelled_otherwise(db, table, &stored)) {
            (_, Some(theirs)) => Check::fail(&name, name_case_fix(t, &theirs, lctn)),
            (Ok(()), None) => Check::pass(&name, "exists and is readable"),
            (Err(e), None) => Check::fail(
                &name,
                format!(
                    "cannot be read ({e}); fix: create it or GRANT SELECT ON {db}.* TO '{}'",
                    cfg.user
                ),
            ),
        });
    }
    Ok(Preflight {
        checks: out,
        identity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_name_spelled_otherwise_than_the_server_stores_it_is_refused_with_its_spelling()
    {
        let stored = vec![("shop".to_string(), "users".to_string())];
        assert_eq!(spelled_otherwise("shop", "users", &stored), None);
        assert_eq!(
            spelled_otherwise("shop", "Users", &stored).as_deref(),
            Some("shop.users")
        );
        assert_eq!(spelled_otherwise("shop", "nope", &[]), None);
        let under_1 = name_case_fix("shop.Users", "shop.users", 1);
        assert!(
            under_1.contains("lower_case_table_names = 1")
                && under_1.contains("no change would be captured")
                && under_1.contains("write `shop.users`"),
            "{under_1}"
        );
        let under_0 = name_case_fix("shop.users", "shop.Users", 0);
        assert!(under_0.contains("case-sensitively"), "{under_0}");
    }

    #[test]
    fn a_position_written_by_another_server_is_foreign_and_an_unknown_writer_is_not() {
        let now = ServerIdentity {
            server_id: 3,
            server_uuid: None,
            gtid_binlog_pos: None,
            gtid_executed: None,
        };
        assert!(foreign_position(Some(1), None, &now).is_some_and(|w| w.contains("server_id 1")));
        assert_eq!(foreign_position(Some(3), None, &now), None);
        assert_eq!(
            foreign_position(None, None, &now),
            None,
            "positions stored before identities existed resume as before"
        );
        let mysql = ServerIdentity {
            server_id: 1,
            server_uuid: Some("b".into()),
            gtid_binlog_pos: None,
            gtid_executed: None,
        };
        assert!(foreign_position(Some(1), Some("a"), &mysql).is_some_and(|w| w.contains("uuid")));
    }

    #[test]
    fn a_mysql_server_resumes_a_gtid_set_it_holds_whose_later_transactions_it_has_not_purged() {
        const A: &str = "3e11fa47-71ca-11e1-9e33-c80aa9429562";
        let server = |executed: &str, purged: &str| ServerIdentity {
            server_id: 2,
            server_uuid: Some("b".into()),
            gtid_executed: Some((executed.into(), purged.into())),
            ..ServerIdentity::default()
        };
        let stored = format!("{A}:1-57");
        let resumed = |s: &ServerIdentity| resumable_by_gtid(Some(&stored), s);
        assert_eq!(
            resumed(&server(&format!("{A}:1-90"), &format!("{A}:1-40"))),
            Some(stored.clone()),
            "a replica that has all of it and still holds 58 on"
        );
        assert_eq!(
            resumed(&server(&format!("{A}:1-50"), "")),
            None,
            "a replica that lags behind it"
        );
        assert_eq!(
            resumed(&server(&format!("{A}:1-90"), &format!("{A}:1-60"))),
            None,
            "a server that purged transactions after it"
        );
        assert_eq!(
            resumed(&ServerIdentity::default()),
            None,
            "a MariaDB server"
        );
    }

    #[test]
    fn a_binlog_reset_behind_the_stored_gtid_is_seen_and_progress_is_not() {
        assert!(
            gtid_went_back("0-1-500", ""),
            "RESET MASTER empties the state"
        );
        assert!(
            gtid_went_back("0-1-500", "0-1-3"),
            "and numbering starts again"
        );
        assert!(!gtid_went_back("0-1-500", "0-1-500"));
        assert!(!gtid_went_back("0-1-500", "1-1-2,0-1-900"));
        assert!(
            gtid_went_back("1-1-7", "0-1-900"),
            "the stored domain is gone"
        );
        assert!(
            !gtid_went_back("3e11fa47-71ca-11e1-9e33-c80aa9429562:23", ""),
            "MySQL GTIDs are not compared here"
        );
    }
}
