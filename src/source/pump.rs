//! The producer loop of a session: what the reader hands over ([`SourceMsg`]) is produced in
//! Kafka transactions, and each transaction is committed with the [`SourceOffset`] of the last
//! resume point it covers (see the module note of `source` for why that is exactly once).
//!
//! When it commits: at a transaction boundary of the source, at once when caught up, else
//! after `commit_interval_ms` or longer if commits are slow (group commit); a snapshot's chunk
//! boundaries and its end likewise. Inside a source transaction too large for one Kafka
//! transaction (`source.max_transaction_bytes`, or open for a quarter of the transaction
//! timeout), at the reader's next split point: the offset stored then is the last boundary
//! with how much of the transaction is in Kafka (`offsets::Within`, `source::decoder`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::SourceError;
use super::handover::{Inbox, SourceMsg};
use super::publisher::Publisher;
use super::window::Window;
use crate::config::SourceConfig;
use crate::metrics::{self as m, Readiness};
use crate::offsets::{OnlineState, SourceOffset};
use crate::retry::RetryLoop;
use crate::shutdown::ShutdownRx;

/// How long a transaction stays open while input is waiting (catching up): at least
/// `interval`, and long enough that the commit (which stalls producing until every record is
/// acknowledged) takes at most a tenth of the time, capped at ten intervals. When caught up the
/// pump commits at once (latency).
fn busy_interval(interval: Duration, last_commit_took: Duration) -> Duration {
    interval.max((last_commit_took * 9).min(interval * 10))
}

/// Where this session's positions come from: their epoch and the server that writes them,
/// stored with every offset.
pub(super) struct Lineage {
    pub(super) epoch: u64,
    pub(super) server_id: Option<u32>,
    pub(super) server_uuid: Option<String>,
}

/// How long a session must stream without an error before a retry run counts as over.
const RECOVERED_AFTER: Duration = Duration::from_secs(10);

/// The offset of a boundary once the snapshot is complete: `position` with its GTID and GTID
/// state, this session's lineage and tables, the resumed snapshot's segments while the stream
/// still replays their stretch, and the online snapshots' state.
fn completed_offset(
    lineage: &Lineage,
    tables: &[String],
    window: Option<&Window>,
    online: &OnlineState,
    position: crate::offsets::BinlogPosition,
    (gtid, gtid_set): (Option<String>, Option<String>),
) -> SourceOffset {
    SourceOffset {
        position,
        gtid,
        gtid_set,
        epoch: lineage.epoch,
        server_id: lineage.server_id,
        server_uuid: lineage.server_uuid.clone(),
        snapshot_completed: true,
        tables: tables.to_vec(),
        snapshot_segments: window.map(|w| w.segments().to_vec()).unwrap_or_default(),
        online: online.clone(),
        within: None,
    }
}

/// Commits `o`, unless a shutdown comes first (`Ok(false)`). A commit waits for the brokers up
/// to the commit deadline, longer than a shutdown may take: when the sink has already stopped
/// on an error (brokers refusing a rotated password), that wait would outlast the shutdown
/// deadline and hide the error. Left uncommitted, the transaction never becomes visible and its
/// changes are read again from the stored position after the restart: nothing is lost or
/// doubled.
async fn commit_unless_shutdown(
    publisher: &mut Publisher,
    o: &SourceOffset,
    shutdown: &mut ShutdownRx,
) -> Result<bool, SourceError> {
    tokio::select! {
        r = publisher.commit(o) => r.map(|()| true),
        () = shutdown.wait() => {
            tracing::info!("shutdown during a commit: the open transaction is left uncommitted and read again at the next start");
            Ok(false)
        }
    }
}

/// The producer loop of one session.
#[allow(clippy::too_many_arguments)]
pub(super) async fn pump(
    src: &SourceConfig,
    tables: Vec<String>,
    mut online: OnlineState,
    publisher: &mut Publisher,
    committed: &mut Option<SourceOffset>,
    no_snapshot: bool,
    lineage: &Lineage,
    rx: &mut Inbox,
    shutdown: &mut ShutdownRx,
    readiness: &Arc<Readiness>,
    retry: &mut RetryLoop,
) -> Result<(), SourceError> {
    let interval = Duration::from_millis(src.commit_interval_ms);
    let started = Instant::now();
    let idle_interval = interval.max(Duration::from_secs(1));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_commit = Instant::now();
    let mut at_boundary = true;
    // Without a snapshot in this session (a stored position, or `snapshot_mode = never` from the
    // binlog's end) every boundary is a resume point to commit.
    let mut snapshot_done = no_snapshot || committed.as_ref().is_some_and(|o| o.snapshot_completed);
    let mut pending: Option<SourceOffset> = None;
    let mut last_ts_ms: i64 = 0;
    let mut committed_here = false;
    // While the stream replays a resumed snapshot's stretch, offsets keep its segments.
    let mut window = committed
        .as_ref()
        .filter(|o| o.snapshot_completed)
        .and_then(|o| Window::new(&o.snapshot_segments, &o.tables));
    // The offset of the last boundary the stream reached (what an online snapshot's progress is
    // stored with when it arrives between two boundaries).
    let mut boundary: Option<SourceOffset> = committed
        .clone()
        .filter(|o| o.snapshot_completed && snapshot_done);
    readiness.source_ready.store(true, Ordering::Relaxed);
    // The permits of the last message received (released once its rows are handed over).
    let mut permits = (0, 0);
    loop {
        let msg = tokio::select! {
            biased;
            // PRIORITY 1: shutdown — commit if at a boundary, else the open work is re-read later.
            () = shutdown.wait() => {
                if at_boundary && let Some(o) = pending.take() {
                    publisher.commit(&o).await?;
                    *committed = Some(o);
                }
                return Ok(());
            }
            // PRIORITY 2: the commit timer.
            _ = tick.tick() => None,
            // PRIORITY 3: new input.
            m = rx.recv() => match m {
                Some((m, p)) => {
                    permits = p;
                    Some(m)
                }
                None => return Err(SourceError::ChannelClosed),
            },
        };
        match msg {
            Some(SourceMsg::Changes(evs)) => {
                at_boundary = false;
                for ev in evs {
                    publisher.publish(ev).await?;
                }
                rx.release(permits);
            }
            Some(SourceMsg::Commit {
                position,
                gtid,
                gtid_set,
                ts_ms,
            }) => {
                at_boundary = true;
                if ts_ms > 0 {
                    last_ts_ms = ts_ms;
                }
                if snapshot_done {
                    if window.as_ref().is_some_and(|w| w.passed(&position)) {
                        window = None;
                    }
                    pending = Some(completed_offset(
                        lineage,
                        &tables,
                        window.as_ref(),
                        &online,
                        position,
                        (gtid, gtid_set),
                    ));
                    boundary = pending.clone();
                }
            }
            Some(SourceMsg::Split(within)) => {
                // Committed only when the open transaction has grown too large; the offset is
                // the last boundary and what of the next transaction is published.
                if snapshot_done
                    && publisher.too_large()
                    && let Some(b) = boundary.as_ref()
                {
                    if committed.as_ref().is_none_or(|c| c.within.is_none()) {
                        tracing::info!(position = %b.position, gtid = within.gtid.as_deref().unwrap_or("-"), bytes = publisher.bytes_since_commit, "a source transaction too large for one Kafka transaction is split (source.max_transaction_bytes): consumers see its first part before the rest");
                    }
                    let o = SourceOffset {
                        within: Some(within),
                        ..b.clone()
                    };
                    if !commit_unless_shutdown(publisher, &o, shutdown).await? {
                        return Ok(());
                    }
                    metrics::counter!(m::SOURCE_TRANSACTION_SPLITS_TOTAL).increment(1);
                    *committed = Some(o);
                    committed_here = true;
                    pending = None;
                    last_commit = Instant::now();
                }
            }
            Some(SourceMsg::OnlineProgress { state, at }) => {
                online = state;
                // Stored at once when the reader stands at the last boundary (everything sent
                // is covered by it and this state), else with the next boundary.
                if let (Some(at), Some(b)) = (at, boundary.as_ref())
                    && b.position == at
                {
                    let o = SourceOffset {
                        online: online.clone(),
                        ..b.clone()
                    };
                    boundary = Some(o.clone());
                    pending = Some(o);
                    at_boundary = true;
                }
            }
            Some(SourceMsg::SnapshotProgress(segments)) => {
                at_boundary = true;
                if let Some(first) = segments.first() {
                    pending = Some(SourceOffset {
                        position: first.at.clone(),
                        gtid: None,
                        gtid_set: None,
                        epoch: lineage.epoch,
                        server_id: lineage.server_id,
                        server_uuid: lineage.server_uuid.clone(),
                        snapshot_completed: false,
                        tables: tables.clone(),
                        snapshot_segments: segments,
                        online: online.clone(),
                        within: None,
                    });
                }
            }
            Some(SourceMsg::SnapshotDone { segments, gtid_set }) => {
                at_boundary = true;
                snapshot_done = true;
                window = Window::new(&segments, &tables);
                let Some(first) = segments.first() else {
                    return Err(SourceError::NoBinlogPosition);
                };
                pending = Some(completed_offset(
                    lineage,
                    &tables,
                    window.as_ref(),
                    &online,
                    first.at.clone(),
                    (None, gtid_set),
                ));
                boundary = pending.clone();
                // The end of a snapshot is committed at once.
                if let Some(o) = pending.take() {
                    if !commit_unless_shutdown(publisher, &o, shutdown).await? {
                        return Ok(());
                    }
                    *committed = Some(o);
                    last_commit = Instant::now();
                }
            }
            None => {}
        }
        // A snapshot unit that cannot be checkpointed (a table without a primary key; on MySQL
        // with locks, a key with a text column) is one Kafka transaction: past the transaction
        // timeout the broker aborts it and the snapshot would read it again, for ever. Stop
        // loudly before that, naming it and the fixes.
        if !snapshot_done
            && let Some(open_s) = publisher.open_for().map(|d| d.as_secs())
            && open_s.saturating_mul(4_000) >= src.transaction_timeout_ms.saturating_mul(3)
        {
            return Err(SourceError::SnapshotUnitTooLong {
                tables: publisher.open_tables().join(", "),
                open_s,
                timeout_ms: src.transaction_timeout_ms,
            });
        }
        // A retry run is over once this session has held up: it committed, or it has been
        // streaming for a while without an error (an idle source has nothing to commit).
        if retry.is_retrying() && (committed_here || started.elapsed() >= RECOVERED_AFTER) {
            retry.recovered();
        }
        if !at_boundary {
            continue;
        }
        let due = if publisher.open {
            // Caught up (nothing waiting): commit now, a lone change is not held back.
            // Behind: collect for at least the interval, longer if commits are slow, so
            // commits stay a small share of the time (group commit).
            let open_for = if rx.is_empty() {
                Duration::ZERO
            } else {
                busy_interval(interval, publisher.last_commit_took)
            };
            last_commit.elapsed() >= open_for
        } else {
            last_commit.elapsed() >= idle_interval
        };
        if due && let Some(o) = pending.take() {
            if committed.as_ref() != Some(&o) {
                if !commit_unless_shutdown(publisher, &o, shutdown).await? {
                    return Ok(());
                }
                *committed = Some(o);
                committed_here = true;
                if last_ts_ms > 0 {
                    let now = crate::events::now_ms();
                    metrics::gauge!(m::SOURCE_MS_BEHIND).set((now - last_ts_ms).max(0) as f64);
                }
            }
            last_commit = Instant::now();
        }
    }
}
