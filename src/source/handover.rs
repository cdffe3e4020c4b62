//! The hand-over from the reader (snapshot or binlog) to the producer loop: a bounded channel
//! of [`SourceMsg`]s whose rows, and the bytes of their values, are also bounded by permits, so
//! memory stays bounded whatever one message holds: 8,192 rows of 1 MB would be 8 GB.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::SourceError;
use crate::events::{ChangeEvent, Value};
use crate::offsets::{BinlogPosition, OnlineState, SnapshotSegment, Within};

/// Messages the hand-over holds at most (commits and batches alike); rows are bounded
/// separately by [`Outbox`]'s permits.
const CHANNEL_MESSAGES: usize = 1024;

/// The reader's end of the hand-over to the producer loop. A message carries a whole rows
/// event or snapshot chunk, so a message count alone would not bound memory: sending a batch
/// first takes one row permit per row (`source.channel_capacity` in all) and one byte permit
/// per KiB of its values ([`batch_kib`]; `source.channel_max_bytes` in all), and the producer
/// loop returns them once the rows are handed to Kafka. A batch larger than a whole budget
/// takes all of it, so it goes alone.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<(SourceMsg, Permits)>,
    budget: Budget,
}

/// The row and KiB permits a message took (none but a batch takes any): they travel with it,
/// so that the producer loop returns exactly them without sizing the batch again.
pub(super) type Permits = (u32, u32);

/// The two permit pools, shared by both ends.
#[derive(Clone)]
struct Budget {
    rows: Arc<tokio::sync::Semaphore>,
    rows_cap: u32,
    kib: Arc<tokio::sync::Semaphore>,
    kib_cap: u32,
}

impl Budget {
    fn permits(&self, evs: &[ChangeEvent]) -> Permits {
        (
            clamp_permits(evs.len() as u64, self.rows_cap),
            clamp_permits(batch_kib(evs), self.kib_cap),
        )
    }
}

impl Outbox {
    /// A hand-over bounded to `rows` buffered rows and `bytes` of their values, and the
    /// producer loop's end.
    pub(super) fn new(rows: usize, bytes: usize) -> (Outbox, Inbox) {
        let (tx, rx) = mpsc::channel(CHANNEL_MESSAGES);
        let rows_cap = u32::try_from(rows.max(1)).unwrap_or(u32::MAX);
        let kib_cap = u32::try_from((bytes / 1024).max(1)).unwrap_or(u32::MAX);
        let budget = Budget {
            rows: Arc::new(tokio::sync::Semaphore::new(rows_cap as usize)),
            rows_cap,
            kib: Arc::new(tokio::sync::Semaphore::new(kib_cap as usize)),
            kib_cap,
        };
        let inbox = Inbox {
            rx,
            budget: budget.clone(),
        };
        (Outbox { tx, budget }, inbox)
    }

    /// Sends `msg`, waiting while the producer loop holds `channel_capacity` rows or
    /// `channel_max_bytes` of values.
    pub async fn send(&self, msg: SourceMsg) -> Result<(), SourceError> {
        let mut taken = (0, 0);
        if let SourceMsg::Changes(evs) = &msg {
            let (rows, kib) = self.budget.permits(evs);
            taken = (rows, kib);
            self.budget
                .rows
                .acquire_many(rows)
                .await
                .map_err(|_| SourceError::ChannelClosed)?
                .forget();
            self.budget
                .kib
                .acquire_many(kib)
                .await
                .map_err(|_| SourceError::ChannelClosed)?
                .forget();
        }
        self.tx
            .send((msg, taken))
            .await
            .map_err(|_| SourceError::ChannelClosed)
    }
}

/// The producer loop's end of the hand-over.
pub(super) struct Inbox {
    rx: mpsc::Receiver<(SourceMsg, Permits)>,
    budget: Budget,
}

impl Inbox {
    /// The next message and the permits it took (`None`: every sender is gone).
    pub(super) async fn recv(&mut self) -> Option<(SourceMsg, Permits)> {
        self.rx.recv().await
    }

    /// Whether nothing waits to be received.
    pub(super) fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Returns the permits of a batch once its rows are handed to Kafka.
    pub(super) fn release(&self, permits: Permits) {
        self.budget.rows.add_permits(permits.0 as usize);
        self.budget.kib.add_permits(permits.1 as usize);
    }
}

/// Permits a batch of `n` units takes: at most the whole capacity (a larger batch goes alone).
fn clamp_permits(n: u64, capacity: u32) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX).clamp(1, capacity)
}

/// The approximate memory of one decoded row's values.
pub(super) fn row_bytes(row: &[Value]) -> usize {
    row.iter()
        .map(|v| match v {
            Value::String(s) | Value::Decimal(s) => s.len() + 24,
            Value::Bytes(b) => b.len() + 24,
            _ => 16,
        })
        .sum::<usize>()
        + 24
}

/// KiB of values a batch holds (its before and after images, rounded up).
pub(super) fn batch_kib(evs: &[ChangeEvent]) -> u64 {
    let bytes: usize = evs
        .iter()
        .map(|e| e.before.as_deref().map_or(0, row_bytes) + e.after.as_deref().map_or(0, row_bytes))
        .sum();
    (bytes as u64).div_ceil(1024)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Op, SourceInfo, TableSchema};

    /// A batch of one row holding `kib` KiB of text.
    fn batch(kib: usize) -> SourceMsg {
        let schema = Arc::new(TableSchema {
            db: "d".into(),
            table: "t".into(),
            columns: Vec::new(),
            key: Vec::new(),
        });
        SourceMsg::Changes(vec![ChangeEvent {
            schema,
            op: Op::Create,
            before: None,
            after: Some(vec![Value::String("x".repeat(kib * 1024))]),
            source: SourceInfo {
                ts_ms: 0,
                snapshot: "false",
                server_id: 1,
                gtid: None,
                file: "f.000001".into(),
                pos: 4,
                row: 0,
                epoch: 1,
                read_ts_ms: 0,
            },
        }])
    }

    #[tokio::test]
    async fn the_hand_over_holds_rows_up_to_its_byte_budget_and_a_larger_batch_goes_alone() {
        let (tx, mut rx) = Outbox::new(10_000, 1 << 20);
        let wait = std::time::Duration::from_millis(200);
        // Two rows of 400 KiB fit in 1 MiB; a third waits although the row budget is far off.
        for _ in 0..2 {
            tokio::time::timeout(wait, tx.send(batch(400)))
                .await
                .expect("fits")
                .expect("sent");
        }
        let third = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(batch(400)).await }
        });
        tokio::time::sleep(wait).await;
        assert!(!third.is_finished(), "800 KiB held: 400 more must wait");
        // Once the producer loop has handed the first batch to Kafka, it goes.
        let Some((SourceMsg::Changes(_), permits)) = rx.recv().await else {
            panic!("a batch")
        };
        rx.release(permits);
        tokio::time::timeout(wait, third)
            .await
            .expect("sent after the release")
            .expect("joined")
            .expect("sent");
        // A batch larger than the whole budget takes all of it: it waits until the rest is
        // released, then goes alone.
        let big = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(batch(3 * 1024)).await }
        });
        tokio::time::sleep(wait).await;
        assert!(!big.is_finished());
        for _ in 0..2 {
            let Some((SourceMsg::Changes(_), permits)) = rx.recv().await else {
                panic!("a batch")
            };
            rx.release(permits);
        }
        tokio::time::timeout(wait, big)
            .await
            .expect("sent once alone")
            .expect("joined")
            .expect("sent");
    }
}
