//! Binlog retention: how far the committed position is from the server's end, and from being
//! purged.
//!
//! A poller beside the stream asks the server, every [`INTERVAL`], for its binlog files
//! (`SHOW BINARY LOGS`: name and size) and its purge setting, on a connection of its own, and
//! sets the `ecst_source_server_binlog_*` and `ecst_source_binlog_*` gauges against the position
//! the source last committed (handed over through a `watch`, so the stream never waits for it).
//! It only observes: its failures (a missing privilege, the server down) are logged and retried
//! and never stop the source, whose own connection already says when the server is gone.
//!
//! Why the purge margin is a lower bound. An automatic purge removes a file whose last write
//! (its modification time) is older than the expire age, and never the active file. The
//! committed position's file was last written no earlier than (a) the commit time of the last
//! transaction committed from it, which it contains, and (b) the last poll that still saw it as
//! the server's newest file. So while it is active the margin is the whole expire age, and once
//! the server has moved on it is `max(a, b) + expire − now`, which a real purge can only come
//! after. Without (a) or (b) (a restart behind, before a first commit) the margin is not set
//! rather than guessed. A manual `PURGE BINARY LOGS` is not bounded by anything; the file count
//! before our file (`ecst_source_binlog_files_before_position`, 0 = ours goes next) shows that
//! exposure, and -1 says the file is already gone.

use std::time::Duration;

use mysql_async::prelude::Queryable;
use tokio::sync::watch;

use super::SourceError;
use crate::config::MysqlConfig;
use crate::metrics as m;
use crate::offsets::BinlogPosition;
use crate::shutdown::ShutdownRx;

/// How often the server is asked.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// What the source last committed, as the poller needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub position: BinlogPosition,
    /// MySQL commit time (ms) of the last transaction committed, 0 when unknown.
    pub commit_ts_ms: i64,
}

/// One row of `SHOW BINARY LOGS`.
#[derive(Debug, Clone, PartialEq)]
pub struct BinlogFile {
    pub name: String,
    pub size: u64,
}

/// The gauges' values for one poll.
#[derive(Debug, Clone, PartialEq)]
pub struct Assessment {
    pub server_end: BinlogPosition,
    pub bytes_behind: Option<u64>,
    /// Files older than the committed position's; -1: that file is gone.
    pub files_before: Option<i64>,
    pub purge_margin_s: Option<f64>,
}

fn base(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(b, _)| b)
}

fn seq(name: &str) -> Option<u64> {
    name.rsplit_once('.').and_then(|(_, n)| n.parse().ok())
}

/// Compares the server's files with the committed position. `written_s` is a lower bound of the
/// committed file's last write (Unix seconds), `expire_s` the purge age (0: never by age).
pub fn assess(
    files: &[BinlogFile],
    committed: Option<&BinlogPosition>,
    written_s: Option<f64>,
    expire_s: f64,
    now_s: f64,
) -> Option<Assessment> {
    let last = files.last()?;
    let mut a = Assessment {
        server_end: BinlogPosition {
            file: last.name.clone(),
            pos: last.size,
        },
        bytes_behind: None,
        files_before: None,
        purge_margin_s: None,
    };
    let Some(c) = committed else {
        return Some(a);
    };
    if let Some(i) = files.iter().position(|f| f.name == c.file) {
        let behind = files[i].size.saturating_sub(c.pos)
            + files[i + 1..].iter().map(|f| f.size).sum::<u64>();
        a.bytes_behind = Some(behind);
        a.files_before = Some(i as i64);
        if expire_s > 0.0 {
            a.purge_margin_s = if i + 1 == files.len() {
                Some(expire_s)
            } else {
                written_s.map(|w| (w + expire_s - now_s).max(0.0))
            };
        }
    } else if base(&c.file) == base(&files[0].name)
        && matches!((seq(&c.file), seq(&files[0].name)), (Some(ours), Some(oldest)) if ours < oldest)
    {
        // Same server lineage, older than the oldest file left: purged.
        a.files_before = Some(-1);
        if expire_s > 0.0 {
            a.purge_margin_s = Some(0.0);
        }
    }
    Some(a)
}

/// Remembers, per committed file, the last poll that saw it still being written.
#[derive(Debug, Default)]
struct Tracker {
    file: Option<String>,
    active_seen_s: Option<f64>,
}

impl Tracker {
    /// The lower bound of the committed file's last write, after this poll.
    fn written_s(&mut self, c: &Committed, files: &[BinlogFile], now_s: f64) -> Option<f64> {
        if self.file.as_deref() != Some(c.position.file.as_str()) {
            self.file = Some(c.position.file.clone());
            self.active_seen_s = None;
        }
        if files.last().is_some_and(|f| f.name == c.position.file) {
            self.active_seen_s = Some(now_s);
        }
        let committed_s = (c.commit_ts_ms > 0).then(|| c.commit_ts_ms as f64 / 1000.0);
        match (self.active_seen_s, committed_s) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The purge age in seconds from `SHOW GLOBAL VARIABLES` rows (0: never by age).
pub fn expire_seconds(vars: &[(String, String)]) -> f64 {
    let get = |n: &str| {
        vars.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    };
    // MySQL 8.0.29+: automatic purge can be switched off whatever the age says.
    if get("binlog_expire_logs_auto_purge").is_some_and(|v| v.eq_ignore_ascii_case("OFF")) {
        return 0.0;
    }
    let secs = get("binlog_expire_logs_seconds")
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    if secs > 0.0 {
        return secs;
    }
    get("expire_logs_days")
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |d| d * 86400.0)
}

async fn poll(conn: &mut mysql_async::Conn) -> Result<(Vec<BinlogFile>, f64), SourceError> {
    let files = binlog_files(conn).await?;
    let vars: Vec<(String, String)> = conn
        .query(
            "SHOW GLOBAL VARIABLES WHERE Variable_name IN \
             ('binlog_expire_logs_seconds', 'expire_logs_days', 'binlog_expire_logs_auto_purge')",
        )
        .await?;
    Ok((files, expire_seconds(&vars)))
}

/// The server's binlog files, oldest first (`SHOW BINARY LOGS`, read by column name).
pub(crate) async fn binlog_files(
    conn: &mut mysql_async::Conn,
) -> Result<Vec<BinlogFile>, SourceError> {
    let rows: Vec<mysql_async::Row> = conn.query("SHOW BINARY LOGS").await?;
    let mut files = Vec::with_capacity(rows.len());
    for row in rows {
        let idx = |name: &str| {
            row.columns_ref()
                .iter()
                .position(|c| c.name_str().eq_ignore_ascii_case(name))
        };
        let name: Option<String> = idx("Log_name").and_then(|i| row.get_opt(i)?.ok());
        let size: Option<u64> = idx("File_size").and_then(|i| row.get_opt(i)?.ok());
        if let (Some(name), Some(size)) = (name, size) {
            files.push(BinlogFile { name, size });
        }
    }
    Ok(files)
}

fn record(a: &Assessment, expire_s: f64) {
    if let Some(seq) = a.server_end.file_seq() {
        metrics::gauge!(m::SERVER_BINLOG_FILE).set(seq as f64);
    }
    metrics::gauge!(m::SERVER_BINLOG_POS).set(a.server_end.pos as f64);
    metrics::gauge!(m::BINLOG_EXPIRE_SECONDS).set(expire_s);
    if let Some(b) = a.bytes_behind {
        metrics::gauge!(m::BINLOG_BYTES_BEHIND).set(b as f64);
    }
    if let Some(f) = a.files_before {
        metrics::gauge!(m::BINLOG_FILES_BEFORE).set(f as f64);
    }
    // Unknown (not guessed) is NaN while the server purges by age: no stale value stays, and a
    // comparison with it (an alert) is false.
    match a.purge_margin_s {
        Some(mg) => metrics::gauge!(m::BINLOG_PURGE_MARGIN_SECONDS).set(mg),
        None if expire_s > 0.0 => metrics::gauge!(m::BINLOG_PURGE_MARGIN_SECONDS).set(f64::NAN),
        None => {}
    }
}

/// Polls until shutdown; never fails.
pub async fn watch(
    cfg: MysqlConfig,
    mut committed: watch::Receiver<Option<Committed>>,
    mut shutdown: ShutdownRx,
) {
    let mut tracker = Tracker::default();
    let mut warned = false;
    let mut conn: Option<mysql_async::Conn> = None;
    loop {
        let outcome = async {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => conn.insert(super::connect(&cfg).await?),
            };
            poll(c).await
        }
        .await;
        match outcome {
            Ok((files, expire_s)) => {
                if warned {
                    tracing::info!("binlog retention figures available again");
                    warned = false;
                }
                let now = crate::metrics::now_s();
                let current = committed.borrow().clone();
                let written = current
                    .as_ref()
                    .and_then(|c| tracker.written_s(c, &files, now));
                let a = assess(
                    &files,
                    current.as_ref().map(|c| &c.position),
                    written,
                    expire_s,
                    now,
                );
                if let Some(a) = a {
                    if a.files_before == Some(-1) {
                        tracing::warn!(position = %current.as_ref().map(|c| c.position.to_string()).unwrap_or_default(),
                            oldest = %files.first().map(|f| f.name.as_str()).unwrap_or(""),
                            "the committed position's binlog file is purged: the source cannot resume from it (ecst offsets reset --source resnapshot)");
                    }
                    record(&a, expire_s);
                }
            }
            Err(e) => {
                conn = None;
                if warned {
                    tracing::debug!(error = %e, "binlog retention poll failed");
                } else {
                    tracing::warn!(error = %e, "binlog retention poll failed (the metrics ecst_source_binlog_* stay as they were; SHOW BINARY LOGS needs REPLICATION CLIENT, BINLOG MONITOR on MariaDB); retrying");
                    warned = true;
                }
            }
        }
        // Until the first committed position is known, that is polled for at once (the figures
        // against it appear within moments of a start, not an interval later).
        let waiting = committed.borrow().is_none();
        tokio::select! {
            () = shutdown.wait() => break,
            () = tokio::time::sleep(INTERVAL) => {}
            r = committed.changed(), if waiting => {
                if r.is_err() {
                    break;
                }
            }
        }
    }
    if let Some(c) = conn
        && let Err(e) = c.disconnect().await
    {
        tracing::debug!(error = %e, "binlog retention connection closed uncleanly");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(v: &[(&str, u64)]) -> Vec<BinlogFile> {
        v.iter()
            .map(|(n, s)| BinlogFile {
                name: (*n).into(),
                size: *s,
            })
            .collect()
    }

    fn pos(file: &str, pos: u64) -> BinlogPosition {
        BinlogPosition {
            file: file.into(),
            pos,
        }
    }

    #[test]
    fn bytes_behind_count_the_rest_of_our_file_and_every_later_one() {
        let f = files(&[("b.000002", 1000), ("b.000003", 500), ("b.000004", 300)]);
        let a = assess(&f, Some(&pos("b.000003", 200)), Some(100.0), 0.0, 1000.0).unwrap();
        assert_eq!(a.server_end, pos("b.000004", 300));
        assert_eq!(a.bytes_behind, Some(300 + 300));
        assert_eq!(a.files_before, Some(1));
        assert_eq!(a.purge_margin_s, None, "no margin without automatic purge");
    }

    #[test]
    fn the_active_file_keeps_the_whole_expire_age_and_an_old_one_counts_from_its_last_write() {
        let f = files(&[("b.000002", 1000), ("b.000003", 500)]);
        let a = assess(&f, Some(&pos("b.000003", 500)), None, 3600.0, 1000.0).unwrap();
        assert_eq!(
            (a.bytes_behind, a.files_before, a.purge_margin_s),
            (Some(0), Some(1), Some(3600.0))
        );
        let a = assess(&f, Some(&pos("b.000002", 900)), Some(400.0), 3600.0, 1000.0).unwrap();
        assert_eq!(a.purge_margin_s, Some(3000.0));
        let a = assess(&f, Some(&pos("b.000002", 900)), Some(400.0), 3600.0, 9000.0).unwrap();
        assert_eq!(a.purge_margin_s, Some(0.0), "never negative");
        let a = assess(&f, Some(&pos("b.000002", 900)), None, 3600.0, 1000.0).unwrap();
        assert_eq!(a.purge_margin_s, None, "unknown rather than guessed");
    }

    #[test]
    fn a_position_older_than_every_file_is_purged_and_one_of_another_server_is_not_judged() {
        let f = files(&[("b.000005", 1000)]);
        let a = assess(&f, Some(&pos("b.000003", 4)), Some(1.0), 60.0, 10.0).unwrap();
        assert_eq!((a.files_before, a.purge_margin_s), (Some(-1), Some(0.0)));
        let a = assess(&f, Some(&pos("other.000001", 4)), Some(1.0), 60.0, 10.0).unwrap();
        assert_eq!((a.files_before, a.bytes_behind), (None, None));
        assert!(assess(&[], Some(&pos("b.000001", 4)), None, 0.0, 0.0).is_none());
    }

    #[test]
    fn the_last_write_bound_is_the_later_of_the_commit_and_the_last_poll_that_saw_the_file_active()
    {
        let mut t = Tracker::default();
        let c = Committed {
            position: pos("b.000002", 100),
            commit_ts_ms: 50_000,
        };
        let active = files(&[("b.000002", 100)]);
        let rotated = files(&[("b.000002", 100), ("b.000003", 4)]);
        assert_eq!(t.written_s(&c, &active, 80.0), Some(80.0));
        assert_eq!(
            t.written_s(&c, &rotated, 90.0),
            Some(80.0),
            "the last poll that saw it active"
        );
        let moved = Committed {
            position: pos("b.000003", 4),
            commit_ts_ms: 0,
        };
        assert_eq!(t.written_s(&moved, &rotated, 95.0), Some(95.0));
        let mut fresh = Tracker::default();
        assert_eq!(
            fresh.written_s(&c, &rotated, 90.0),
            Some(50.0),
            "the commit time alone"
        );
    }

    #[test]
    fn the_expire_age_comes_from_seconds_then_days_and_auto_purge_off_means_never() {
        let v = |p: &[(&str, &str)]| -> Vec<(String, String)> {
            p.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect()
        };
        assert_eq!(
            expire_seconds(&v(&[
                ("binlog_expire_logs_seconds", "0"),
                ("expire_logs_days", "2")
            ])),
            172_800.0
        );
        assert_eq!(
            expire_seconds(&v(&[
                ("binlog_expire_logs_seconds", "3600"),
                ("expire_logs_days", "0.000000")
            ])),
            3600.0
        );
        assert_eq!(
            expire_seconds(&v(&[
                ("binlog_expire_logs_seconds", "3600"),
                ("binlog_expire_logs_auto_purge", "OFF")
            ])),
            0.0
        );
        assert_eq!(expire_seconds(&v(&[])), 0.0);
    }
}
