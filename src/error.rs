//! Error classes shared by every module.
//!
//! Each module owns one `thiserror` enum and implements [`Classify`] for it, so the retry policy
//! lives in exactly one `match` per module: a **transient** error (a server down, a timeout, a
//! broken connection) is retried with backoff and the component resumes from its last committed
//! position; a **definite** error (bad configuration, a schema the registry refuses, a fenced
//! producer) stops the component and tells the operator what to fix.

use std::time::Duration;

/// How an error should be handled by the component that met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry with backoff; nothing is lost because progress is only stored after success.
    Transient,
    /// Retrying cannot help: stop (source) or dead-letter the input (sink) and tell the operator.
    Definite,
}

impl ErrorClass {
    /// Lowercase label used in logs, metrics and dead-letter headers.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Definite => "definite",
        }
    }
}

/// Implemented by every module error enum: the one place where retry policy is decided.
pub trait Classify {
    /// Whether retrying can help.
    fn class(&self) -> ErrorClass;

    /// A low-cardinality name of the cause, for the `kind` metric label and for telling a run
    /// of identical failures from changing ones: a server error code (`mysql_1040`), a client
    /// error family (`kafka`, `registry_unreachable`), never a free-form message.
    fn kind(&self) -> String {
        "error".into()
    }

    /// What an operator should check when this error keeps coming back.
    fn hint(&self) -> &'static str {
        "that the server named in the error is up, reachable from ecst, and accepts its credentials"
    }
}

/// Exponential backoff with a cap, used by every retry loop (no jitter needed: one process,
/// one peer per loop).
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff starting at `initial` and doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            next: initial,
            initial,
            max,
        }
    }

    /// The delay to wait before the next attempt; doubles the following one.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the initial delay after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        assert_eq!(b.next_delay(), Duration::from_millis(200));
        assert_eq!(b.next_delay(), Duration::from_millis(350));
        assert_eq!(b.next_delay(), Duration::from_millis(350));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }
}
