//! Kafka plumbing shared by source and sink: client configs and topic creation.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};

use crate::config::KafkaConfig;
use crate::error::{Classify, ErrorClass};

/// Largest message ecst produces or accepts (a 20 MB row with before and after images fits).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Kafka errors of either half.
#[derive(Debug, thiserror::Error)]
pub enum KafkaClientError {
    /// A client could not be created (bad property).
    #[error("kafka client configuration: {0}")]
    Config(#[source] KafkaError),
    /// Topic creation failed.
    #[error("cannot create topic `{topic}`: {source}")]
    CreateTopic {
        /// Topic.
        topic: String,
        /// Cause.
        #[source]
        source: KafkaError,
    },
    /// Any other broker error.
    #[error("kafka: {0}")]
    Broker(#[from] KafkaError),
    /// The broker refused the credentials (SASL or TLS client authentication).
    #[error(
        "kafka refused the credentials: {reason}; fix: check kafka.properties (sasl.*, ssl.*) and kafka.secret_files (read at start: after a password rotation, restart ecst with the file updated)"
    )]
    Auth {
        /// librdkafka's account of the failure.
        reason: String,
    },
    /// A transaction was not acknowledged within the commit deadline: the broker, or the
    /// network path to it, is down or stalled without closing the connection.
    #[error(
        "kafka did not acknowledge the transaction within {after_s} s ({unacknowledged} records unacknowledged): the broker or the network path to it is down or stalled; the transaction is abandoned and re-sent from the last committed position"
    )]
    CommitTimedOut {
        /// Seconds waited.
        after_s: u64,
        /// Records still without an acknowledgement.
        unacknowledged: i32,
    },
    /// A consumer stayed out of its group past [`REJOIN_DEADLINE`]; it is recreated.
    #[error(
        "the kafka consumer has been out of its group for {after_s} s without rejoining (after a broker outage or hang): it is recreated"
    )]
    OutOfGroup {
        /// Seconds out of the group.
        after_s: u64,
    },
    /// The client hit a fatal error (e.g. its transactional id was fenced by a newer instance);
    /// `reason` is librdkafka's account of the first fatal error.
    #[error("kafka producer stopped by a fatal error: {reason}")]
    Fatal {
        /// librdkafka's description of the underlying error.
        reason: String,
    },
}

impl Classify for KafkaClientError {
    fn class(&self) -> ErrorClass {
        match self {
            KafkaClientError::Config(_)
            | KafkaClientError::Fatal { .. }
            | KafkaClientError::Auth { .. } => ErrorClass::Definite,
            KafkaClientError::CommitTimedOut { .. } | KafkaClientError::OutOfGroup { .. } => {
                ErrorClass::Transient
            }
            KafkaClientError::CreateTopic { source, .. } | KafkaClientError::Broker(source) => {
                kafka_error_class(source)
            }
        }
    }
}

/// Classes an rdkafka error: fatal producer states (fencing), authorization and bad
/// configuration are definite, the rest transient.
pub fn kafka_error_class(e: &KafkaError) -> ErrorClass {
    use RDKafkaErrorCode as C;
    if let KafkaError::Transaction(t) = e
        && t.is_fatal()
    {
        return ErrorClass::Definite;
    }
    let code = e.rdkafka_error_code();
    match code {
        Some(
            C::ProducerFenced
            | C::Fatal
            | C::InvalidProducerEpoch
            | C::Fenced
            | C::TopicAuthorizationFailed
            | C::GroupAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::SaslAuthenticationFailed
            | C::InvalidConfig
            | C::MessageSizeTooLarge,
        ) => ErrorClass::Definite,
        _ => ErrorClass::Transient,
    }
}

/// A base client config with bootstrap servers and the passthrough properties.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// A consumer's config that reads committed records from the start and commits nothing: the
/// offsets reader, the signals reader and reconcile (`group`: its group id, never joined for
/// partitions; it only names the client).
pub fn committed_reader_config(cfg: &KafkaConfig, group: String) -> ClientConfig {
    let mut c = client_config(cfg);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest");
    c
}

/// A topic ecst creates when missing.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    /// Name.
    pub name: String,
    /// Partitions.
    pub partitions: i32,
    /// Topic configs (`cleanup.policy`, `max.message.bytes`, ...).
    pub config: Vec<(&'static str, String)>,
}

/// Remembers an authentication failure that librdkafka reports only on its error channel:
/// with bad credentials a request just times out, which would look like a transient outage.
#[derive(Default)]
pub struct AuthWatch {
    failure: std::sync::Mutex<Option<String>>,
}

impl AuthWatch {
    /// The authentication failure seen so far, if any.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}

impl AuthWatch {
    /// Records `error` if it is an authentication failure.
    fn saw(&self, error: &KafkaError, reason: &str) {
        let auth = matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed)
        );
        if auth && let Ok(mut f) = self.failure.lock() {
            *f = Some(reason.to_string());
        }
        tracing::debug!(error = %error, reason, "kafka client error");
    }
}

impl ClientContext for AuthWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        self.saw(&error, reason);
    }
}

impl ProducerContext for AuthWatch {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// How long a consumer may stay out of its group before it is recreated. librdkafka normally
/// rejoins by itself within a session timeout; after a broker that hung past the session
/// timeout it was seen to stay out for good (its group stuck in `query-coord`, "no broker
/// available for coordinator query"), so that the sink consumed nothing, silently. A new
/// client joins at once.
pub const REJOIN_DEADLINE: Duration = Duration::from_secs(60);

/// A consumer context that follows the group membership: it is lost when librdkafka revokes
/// the assignment as lost (the session timed out, the member was fenced) and regained with the
/// next assignment (even an empty one). It also remembers an authentication failure (a
/// password rotated on the brokers while the consumer runs: its next connection is refused),
/// which would otherwise look like a group that cannot be rejoined.
///
/// A new consumer counts as out of its group from its creation until its first assignment: the
/// consumer made to replace one that never rejoined was seen never to join either (its
/// coordinator query stuck the same way), and without this it would wait for ever, silently.
pub struct GroupWatch {
    lost_since: std::sync::Mutex<Option<std::time::Instant>>,
    auth: AuthWatch,
    /// Revocations so far; each revoked partition keeps the number of its latest one.
    revocations: std::sync::atomic::AtomicU64,
    revoked: std::sync::Mutex<std::collections::HashMap<(String, i32), u64>>,
}

impl Default for GroupWatch {
    fn default() -> Self {
        GroupWatch {
            lost_since: std::sync::Mutex::new(Some(std::time::Instant::now())),
            auth: AuthWatch::default(),
            revocations: std::sync::atomic::AtomicU64::new(0),
            revoked: std::sync::Mutex::default(),
        }
    }
}

impl GroupWatch {
    fn lost(&self, now: std::time::Instant) {
        if let Ok(mut l) = self.lost_since.lock() {
            l.get_or_insert(now);
        }
    }

    fn regained(&self) {
        if let Ok(mut l) = self.lost_since.lock() {
            *l = None;
        }
    }

    /// The number of revocations so far: a message received now is older than any revocation
    /// numbered above it.
    pub fn revocation_mark(&self) -> u64 {
        self.revocations.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn revoke<'a>(&self, partitions: impl Iterator<Item = (&'a str, i32)>) {
        let n = self
            .revocations
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        if let Ok(mut r) = self.revoked.lock() {
            for (t, p) in partitions {
                r.insert((t.to_string(), p), n);
            }
        }
    }

    /// The partitions revoked since the last call, each with the number of its revocation
    /// (messages of it received under a lower mark came before it).
    pub fn take_revoked(&self) -> std::collections::HashMap<(String, i32), u64> {
        self.revoked
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }

    /// The authentication failure seen so far, if any.
    pub fn auth_failure(&self) -> Option<String> {
        self.auth.failure()
    }

    /// How long the consumer has been out of its group, as of `now` (zero while a member).
    pub fn out_for(&self, now: std::time::Instant) -> Duration {
        self.lost_since
            .lock()
            .ok()
            .and_then(|l| *l)
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

impl ClientContext for GroupWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        self.auth.saw(&error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for GroupWatch {
    fn pre_rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        use rdkafka::consumer::Consumer;
        // The lost flag is cleared once the revoke is handled: it is read before.
        if let rdkafka::consumer::Rebalance::Revoke(tpl) = rebalance {
            if consumer.assignment_lost() {
                tracing::warn!(
                    "kafka consumer lost its group membership (session timed out); rejoining"
                );
                self.lost(std::time::Instant::now());
            }
            self.revoke(tpl.elements().iter().map(|e| (e.topic(), e.partition())));
        }
    }

    fn post_rebalance(
        &self,
        _: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        if matches!(rebalance, rdkafka::consumer::Rebalance::Assign(_)) {
            self.regained();
        }
    }
}

/// Creates `topics` if missing (an existing topic is fine; any other failure is returned).
/// This is each component's first request, so it is also where bad credentials are caught.
pub async fn ensure_topics(
    cfg: &KafkaConfig,
    topics: &[TopicSpec],
) -> Result<(), KafkaClientError> {
    let admin: AdminClient<_> = client_config(cfg)
        .create()
        .map_err(KafkaClientError::Config)?;
    // The admin client never serves its error events; an idle producer with the same settings
    // does, and it connects (and authenticates) as soon as it is created.
    let probe: BaseProducer<AuthWatch> = client_config(cfg)
        .create_with_context(AuthWatch::default())
        .map_err(KafkaClientError::Config)?;
    let watch = async {
        loop {
            probe.poll(Duration::ZERO);
            if let Some(reason) = probe.context().failure() {
                return reason;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|spec| {
            let mut t = NewTopic::new(&spec.name, spec.partitions, TopicReplication::Fixed(-1));
            for (k, v) in &spec.config {
                t = t.set(k, v);
            }
            t
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = tokio::select! {
        r = admin.create_topics(&new, &opts) => r?,
        reason = watch => return Err(KafkaClientError::Auth { reason }),
    };
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaClientError::CreateTopic {
                    topic,
                    source: KafkaError::AdminOp(code),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_new_consumer_is_out_of_its_group_until_its_first_assignment() {
        let w = GroupWatch::default();
        let created = Instant::now();
        assert!(
            w.out_for(created + Duration::from_secs(61)) >= Duration::from_secs(60),
            "a consumer that never joins is recreated like one that never rejoins"
        );
        w.regained();
        assert_eq!(w.out_for(created + Duration::from_secs(61)), Duration::ZERO);
    }

    #[test]
    fn a_consumer_is_out_of_its_group_from_the_first_loss_until_an_assignment() {
        let t0 = Instant::now();
        let w = GroupWatch::default();
        w.regained(); // joined
        assert_eq!(w.out_for(t0), Duration::ZERO, "a member until a loss");
        w.lost(t0 + Duration::from_secs(10));
        w.lost(t0 + Duration::from_secs(40));
        assert_eq!(
            w.out_for(t0 + Duration::from_secs(70)),
            Duration::from_secs(60),
            "counted from the first loss"
        );
        w.regained();
        assert_eq!(w.out_for(t0 + Duration::from_secs(200)), Duration::ZERO);
    }
}
