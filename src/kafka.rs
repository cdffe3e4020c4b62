//! Kafka plumbing shared by source and sink: client configs and topic creation.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

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
            KafkaClientError::Config(_) | KafkaClientError::Fatal { .. } => ErrorClass::Definite,
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

/// Creates `topics` if missing (an existing topic is fine; any other failure is returned).
pub async fn ensure_topics(
    cfg: &KafkaConfig,
    topics: &[TopicSpec],
) -> Result<(), KafkaClientError> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg)
        .create()
        .map_err(KafkaClientError::Config)?;
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
    let results = admin.create_topics(&new, &opts).await?;
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
