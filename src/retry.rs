//! Retry loops that are never invisible.
//!
//! Every component retries transient errors with backoff (see `error`). A loop that retries
//! quietly for hours is as bad as a silent stop: the copies go stale and nothing says why. A
//! [`RetryLoop`] therefore makes each run of failures visible in three places at once:
//!
//! * the log: each failure is one `warn` line with the cause, the attempt number and how long
//!   the run has lasted; the 10th failure in a row with the same kind of cause (and every 10th
//!   after) is an `error` line saying that it looks permanent and what to check;
//! * `/ready`: answers 503 while a component retries, with the component, the duration and the
//!   last cause in the body ([`Readiness`]);
//! * metrics: `ecst_component_retrying{component}` is 1 during the run,
//!   `ecst_component_last_error_timestamp_seconds{component}` holds the time of the last failure
//!   and `ecst_component_errors_total{component,kind}` counts failures by kind (a server error
//!   code such as `mysql_1040`, never a free-form message).
//!
//! A run ends with [`RetryLoop::recovered`], called by the component once it works again (the
//! source: its session streamed; the sink: a batch was written). If `max_retry_duration_ms` is
//! set and one run lasts longer, [`RetryLoop::failed`] answers [`Verdict::GiveUp`] and the
//! component stops with the last cause; by default it retries for as long as it takes.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Backoff, Classify};
use crate::metrics::{self as m, Readiness};

/// Failures in a row with the same kind after which the log says the cause looks permanent.
pub const LOOKS_PERMANENT_AFTER: u32 = 10;

/// What the component does after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Wait this long, then try again.
    RetryIn(Duration),
    /// The run lasted longer than `max_retry_duration_ms`: stop with the cause.
    GiveUp,
}

/// The retry state of one component.
pub struct RetryLoop {
    component: &'static str,
    backoff: Backoff,
    max: Option<Duration>,
    readiness: Arc<Readiness>,
    run: Option<Run>,
}

struct Run {
    started: Instant,
    attempts: u32,
    last_kind: String,
    same_kind: u32,
}

impl RetryLoop {
    /// A loop for `component`, backing off from `initial` to `max_delay`; `max_duration` 0 is
    /// unbounded.
    pub fn new(
        component: &'static str,
        initial: Duration,
        max_delay: Duration,
        max_duration_ms: u64,
        readiness: Arc<Readiness>,
    ) -> RetryLoop {
        metrics::gauge!(m::COMPONENT_RETRYING, m::COMPONENT_LABEL => component).set(0.0);
        RetryLoop {
            component,
            backoff: Backoff::new(initial, max_delay),
            max: (max_duration_ms > 0).then(|| Duration::from_millis(max_duration_ms)),
            readiness,
            run: None,
        }
    }

    /// Records a transient failure (`what` says what was interrupted) and decides what next.
    pub fn failed<E: std::fmt::Display + Classify>(&mut self, what: &str, e: &E) -> Verdict {
        let kind = e.kind();
        let run = self.run.get_or_insert_with(|| Run {
            started: Instant::now(),
            attempts: 0,
            last_kind: kind.clone(),
            same_kind: 0,
        });
        run.attempts += 1;
        if run.last_kind == kind {
            run.same_kind += 1;
        } else {
            run.last_kind = kind.clone();
            run.same_kind = 1;
        }
        let retrying_for = run.started.elapsed();
        let attempts = run.attempts;
        let same_kind = run.same_kind;
        let component = self.component;
        metrics::counter!(m::RETRIES_TOTAL, m::COMPONENT_LABEL => component, m::CLASS_LABEL => "transient").increment(1);
        metrics::counter!(m::COMPONENT_ERRORS_TOTAL, m::COMPONENT_LABEL => component, m::KIND_LABEL => kind.clone()).increment(1);
        metrics::gauge!(m::COMPONENT_RETRYING, m::COMPONENT_LABEL => component).set(1.0);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics::gauge!(m::COMPONENT_LAST_ERROR_TS, m::COMPONENT_LABEL => component).set(now);
        self.readiness.set_retrying(
            component,
            Some(format!(
                "retrying for {} s ({attempts} attempts): {e}",
                retrying_for.as_secs()
            )),
        );
        if let Some(max) = self.max
            && retrying_for > max
        {
            tracing::error!(
                component,
                error = %e,
                attempts,
                retrying_for_s = retrying_for.as_secs(),
                "{what}: still failing after max_retry_duration_ms ({} ms), giving up",
                max.as_millis()
            );
            return Verdict::GiveUp;
        }
        let delay = self.backoff.next_delay();
        if same_kind % LOOKS_PERMANENT_AFTER == 0 {
            tracing::error!(
                component,
                error = %e,
                kind,
                attempts,
                retrying_for_s = retrying_for.as_secs(),
                hint = e.hint(),
                "{what}: {same_kind} failures in a row with the same cause; this looks permanent, check: {}",
                e.hint()
            );
        } else {
            tracing::warn!(
                component,
                error = %e,
                kind,
                attempts,
                retrying_for_s = retrying_for.as_secs(),
                retry_in_ms = delay.as_millis() as u64,
                "{what}, retrying"
            );
        }
        Verdict::RetryIn(delay)
    }

    /// The component works again: the run of failures (if any) is over.
    pub fn recovered(&mut self) {
        self.backoff.reset();
        if let Some(run) = self.run.take() {
            tracing::info!(
                component = self.component,
                attempts = run.attempts,
                retried_for_s = run.started.elapsed().as_secs(),
                "recovered"
            );
            metrics::gauge!(m::COMPONENT_RETRYING, m::COMPONENT_LABEL => self.component).set(0.0);
            self.readiness.set_retrying(self.component, None);
        }
    }

    /// Whether a run of failures is under way.
    pub fn is_retrying(&self) -> bool {
        self.run.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;

    #[derive(Debug)]
    struct Boom(&'static str);
    impl std::fmt::Display for Boom {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "boom {}", self.0)
        }
    }
    impl Classify for Boom {
        fn class(&self) -> ErrorClass {
            ErrorClass::Transient
        }
        fn kind(&self) -> String {
            self.0.into()
        }
    }

    #[test]
    fn a_retry_run_marks_the_component_not_ready_with_its_cause_until_it_recovers() {
        let readiness = Arc::new(Readiness::default());
        readiness
            .source_ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        readiness
            .sink_ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut r = RetryLoop::new(
            "source",
            Duration::from_millis(1),
            Duration::from_millis(4),
            0,
            readiness.clone(),
        );
        assert!(readiness.ready());
        assert_eq!(
            r.failed("x", &Boom("mysql_1040")),
            Verdict::RetryIn(Duration::from_millis(1))
        );
        assert!(!readiness.ready(), "retrying is not ready");
        let why = readiness.not_ready_reasons().join("\n");
        assert!(
            why.contains("source") && why.contains("boom mysql_1040"),
            "{why}"
        );
        assert_eq!(
            r.failed("x", &Boom("mysql_1040")),
            Verdict::RetryIn(Duration::from_millis(2))
        );
        assert!(
            readiness
                .not_ready_reasons()
                .join("")
                .contains("2 attempts")
        );
        r.recovered();
        assert!(readiness.ready() && !r.is_retrying());
        assert_eq!(
            r.failed("x", &Boom("mysql_1040")),
            Verdict::RetryIn(Duration::from_millis(1)),
            "a new run starts from the first delay"
        );
    }

    #[test]
    fn a_run_longer_than_the_bound_gives_up_and_an_unbounded_one_never_does() {
        let readiness = Arc::new(Readiness::default());
        let mut bounded = RetryLoop::new(
            "sink",
            Duration::from_millis(1),
            Duration::from_millis(1),
            1,
            readiness.clone(),
        );
        let mut unbounded = RetryLoop::new(
            "source",
            Duration::from_millis(1),
            Duration::from_millis(1),
            0,
            readiness,
        );
        assert!(matches!(
            bounded.failed("x", &Boom("a")),
            Verdict::RetryIn(_)
        ));
        assert!(matches!(
            unbounded.failed("x", &Boom("a")),
            Verdict::RetryIn(_)
        ));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(bounded.failed("x", &Boom("a")), Verdict::GiveUp);
        assert!(matches!(
            unbounded.failed("x", &Boom("a")),
            Verdict::RetryIn(_)
        ));
    }
}
