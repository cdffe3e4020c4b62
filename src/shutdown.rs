//! One shutdown signal for every task: a `watch` channel that flips to `true` once.

use tokio::sync::watch;

/// Sender side, owned by `app`.
#[derive(Debug)]
pub struct ShutdownTx(watch::Sender<bool>);

/// Receiver side, cloned into every loop.
#[derive(Debug, Clone)]
pub struct ShutdownRx(watch::Receiver<bool>);

/// A connected pair.
pub fn channel() -> (ShutdownTx, ShutdownRx) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTx(tx), ShutdownRx(rx))
}

impl ShutdownTx {
    /// Asks every task to stop.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl ShutdownRx {
    /// Whether shutdown was asked.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown is asked (or the sender is gone).
    pub async fn wait(&mut self) {
        // An error means the sender was dropped: treat it as shutdown too.
        let _closed_or_triggered = self.0.wait_for(|v| *v).await;
    }

    /// A receiver that never triggers (for tests and one-shot tools).
    pub fn never() -> ShutdownRx {
        let (tx, rx) = watch::channel(false);
        std::mem::forget(tx);
        ShutdownRx(rx)
    }
}

/// Aborts a spawned task when dropped: a helper task never outlives the function that owns it,
/// whichever way that function returns.
#[derive(Debug)]
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
