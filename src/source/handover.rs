//! The hand-over from the reader (snapshot or binlog) to the producer loop: a bounded channel
//! of [`SourceMsg`]s whose rows are also bounded by permits, so memory stays bounded whatever
//! one message holds.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::SourceError;
use crate::events::ChangeEvent;
use crate::offsets::{BinlogPosition, OnlineState, SnapshotSegment, Within};

/// Messages the hand-over holds at most (commits and batches alike); rows are bounded
/// separately by [`Outbox`]'s permits.
const CHANNEL_MESSAGES: usize = 1024;

/// The reader's end of the hand-over to the producer loop. A message carries a whole rows
/// event or snapshot chunk, so a message count alone would not bound memory: sending a batch
/// first takes one permit per row (`source.channel_capacity` in all), and the producer loop
/// returns them once the rows are handed to Kafka.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<SourceMsg>,
    rows: Arc<tokio::sync::Semaphore>,
    capacity: u32,
}

impl Outbox {
    /// A hand-over bounded to `capacity` buffered rows, and the producer loop's end.
    pub(super) fn new(capacity: usize) -> (Outbox, Inbox) {
        let (tx, rx) = mpsc::channel(CHANNEL_MESSAGES);
        let capacity = u32::try_from(capacity.max(1)).unwrap_or(u32::MAX);
        let rows = Arc::new(tokio::sync::Semaphore::new(capacity as usize));
        let inbox = Inbox {
            rx,
            rows: rows.clone(),
            capacity,
        };
        (Outbox { tx, rows, capacity }, inbox)
    }

    /// Sends `msg`, waiting while the producer loop holds `channel_capacity` rows.
    pub async fn send(&self, msg: SourceMsg) -> Result<(), SourceError> {
        if let SourceMsg::Changes(evs) = &msg {
            let n = permits_for(evs.len(), self.capacity);
            self.rows
                .acquire_many(n)
                .await
                .map_err(|_| SourceError::ChannelClosed)?
                .forget();
        }
        self.tx
            .send(msg)
            .await
            .map_err(|_| SourceError::ChannelClosed)
    }
}

/// The producer loop's end of the hand-over.
pub(super) struct Inbox {
    pub(super) rx: mpsc::Receiver<SourceMsg>,
    pub(super) rows: Arc<tokio::sync::Semaphore>,
    pub(super) capacity: u32,
}

impl Inbox {
    /// Returns the permits of a batch of `rows` rows once they are handed to Kafka.
    pub(super) fn release(&self, rows: usize) {
        self.rows
            .add_permits(permits_for(rows, self.capacity) as usize);
    }
}

/// Permits a batch takes: one per row, at most the whole capacity (a larger batch goes alone).
fn permits_for(rows: usize, capacity: u32) -> u32 {
    u32::try_from(rows).unwrap_or(u32::MAX).clamp(1, capacity)
}

/// What the reader hands to the producer loop.
#[derive(Debug)]
pub enum SourceMsg {
    /// Row changes in source order (one rows event, or one snapshot chunk).
    Changes(Vec<ChangeEvent>),
    /// A source transaction boundary: everything before it is complete.
    Commit {
        /// Resume position after this transaction.
        position: BinlogPosition,
        /// Its GTID, if known.
        gtid: Option<String>,
        /// The GTID state this position covers (`gtid`), if known.
        gtid_set: Option<String>,
        /// Its commit time (ms), 0 if unknown.
        ts_ms: i64,
    },
    /// A point inside a large source transaction where it may be split across Kafka
    /// transactions: everything sent before it is covered by the last boundary and this.
    Split(Within),
    /// A snapshot chunk boundary: everything sent before it is covered by these segments.
    SnapshotProgress(Vec<SnapshotSegment>),
    /// Online snapshots moved on (a chunk published, a table queued by a signal): stored with
    /// the next position. `at`: the stream's resume point when everything sent before this is
    /// covered by it and this state (it may be committed at once); `None`: the state goes with
    /// the next boundary.
    OnlineProgress {
        /// The whole state.
        state: OnlineState,
        /// The resume point it is stored at, if it may be stored now.
        at: Option<BinlogPosition>,
    },
    /// The snapshot finished; streaming starts at the first segment's position.
    SnapshotDone {
        /// Every segment of the snapshot (more than one if it was resumed).
        segments: Vec<SnapshotSegment>,
        /// The GTID state at the first segment's position, if known.
        gtid_set: Option<String>,
    },
}
