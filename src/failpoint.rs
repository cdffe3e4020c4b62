//! Test-only pause points, compiled in only with the `failpoints` feature.
//!
//! Tests that kill or fault ecst "in the middle" of something (a snapshot, a MySQL transaction)
//! must reach that middle whatever the machine's speed: a fast machine finishes a 40,000-row
//! snapshot before a test polling from outside can kill it. A pause point makes the middle a
//! state the test waits for instead of a moment it races:
//!
//! * `ECST_FAILPOINT_<NAME>=N` arms point `<name>` (upper-cased, `.` as `_`): the first time the
//!   code passes it with a progress count of at least `N`, it creates the file named by
//!   `ECST_FAILPOINT_FILE` (if set) and then never returns. The task holding it stops there;
//!   every other task (the producer loop committing what was handed over, the metrics endpoint)
//!   goes on. The test waits for the file, asserts on the stored state and kills the process.
//! * `ECST_FAILPOINT_RELEASE_<NAME>=<path>` (optional) makes that point's pause end when the
//!   file appears: the test acts on the paused state (cuts a connection the task holds, say) and
//!   then lets the task meet the result. Without it a pause lasts for good, so one run can have a
//!   point it releases and another it kills the process at.
//! * Without the feature [`armed`] is a constant `false`: release builds carry no pause point and
//!   read no variable.
//!
//! The points: `snapshot.rows` (rows of the snapshot handed to the producer loop, checked after
//! each chunk), `stream.rows_events` (rows events handed over by the binlog reader, checked
//! after each), `stream.gtid_lookup` (progress 0: the MariaDB GTID lookup's connection is open,
//! its query not yet sent), `online.rows` (rows of the running online snapshot published, checked
//! after each chunk and its progress are handed over), `online.between_watermarks` (rows of the
//! running online snapshot published, checked after a chunk read by watermarks and before its
//! high watermark is written), `source.commit` (the Kafka transactions
//! of one producer that carry streamed changes, checked before each such commit, its records
//! and position produced).

/// Whether point `name` is armed for `progress`; if so the caller must stop there for good
/// (`std::future::pending().await`). Marks the pause in `ECST_FAILPOINT_FILE`.
#[cfg(feature = "failpoints")]
pub fn armed(name: &str, progress: u64) -> bool {
    use std::sync::Mutex;
    static FIRED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let var = format!(
        "ECST_FAILPOINT_{}",
        name.to_ascii_uppercase().replace('.', "_")
    );
    let Some(at) = std::env::var(&var).ok().and_then(|v| v.parse::<u64>().ok()) else {
        return false;
    };
    if progress < at {
        return false;
    }
    let Ok(mut fired) = FIRED.lock() else {
        return false;
    };
    if fired.iter().any(|f| f == name) {
        return false;
    }
    fired.push(name.to_string());
    tracing::warn!(
        failpoint = name,
        progress,
        "test failpoint reached: this task pauses for good"
    );
    if let Ok(path) = std::env::var("ECST_FAILPOINT_FILE")
        && let Err(e) = std::fs::write(&path, format!("{name} {progress}\n"))
    {
        tracing::warn!(error = %e, path, "cannot write the failpoint file");
    }
    true
}

/// Without the `failpoints` feature no point is ever armed.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn armed(_name: &str, _progress: u64) -> bool {
    false
}

/// Stops the calling task if point `name` is armed for `progress`: for good, or until the file
/// `ECST_FAILPOINT_RELEASE_<NAME>` names appears.
pub async fn pause_if_armed(name: &str, progress: u64) {
    if !armed(name, progress) {
        return;
    }
    let var = format!(
        "ECST_FAILPOINT_RELEASE_{}",
        name.to_ascii_uppercase().replace('.', "_")
    );
    match std::env::var_os(var) {
        Some(release) => {
            let release = std::path::PathBuf::from(release);
            while !release.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            tracing::warn!(failpoint = name, "test failpoint released");
        }
        None => std::future::pending::<()>().await,
    }
}
