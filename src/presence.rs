//! Whether a component runs, as Kafka sees it: a running source keeps one member in the
//! consumer group `<name>-source-running` (subscribed to its offsets topic, reading nothing),
//! and a running sink is a member of its own group. `ecst offsets reset` refuses while either
//! group has a member, wherever ecst runs.
//!
//! Correctness: membership ends when the process leaves the group (a clean stop) or when the
//! broker's session timeout passes after a kill (librdkafka's default, 45 s): a reset right after
//! a kill -9 is refused until then, which errs on the safe side. The member polls every 500 ms,
//! far inside `max.poll.interval.ms`, and reads nothing (it never commits), so it costs one idle
//! connection. A member that lost the group and has not rejoined within `REJOIN_DEADLINE` is
//! replaced by a new client.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;

use crate::config::Config;
use crate::kafka::{GroupWatch, REJOIN_DEADLINE, client_config};
use crate::shutdown::ShutdownRx;

/// The group a running source is a member of.
pub fn source_group(cfg: &Config) -> String {
    format!("{}-source-running", cfg.name)
}

/// The membership of a running source: it lasts until this is dropped (or shutdown).
pub struct Presence(crate::shutdown::ShutdownTx);

impl Drop for Presence {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

/// Keeps a member in the source's presence group (on a blocking thread) until the returned
/// [`Presence`] is dropped or shutdown is asked.
pub fn announce_source(cfg: &Config, shutdown: ShutdownRx) -> Presence {
    let (done_tx, done) = crate::shutdown::channel();
    let mut cc = client_config(&cfg.kafka);
    cc.set("group.id", source_group(cfg))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "latest")
        .set("client.id", format!("{}-source", cfg.name));
    let topic = cfg.offsets_topic();
    tokio::task::spawn_blocking(move || {
        let stopped = || shutdown.is_triggered() || done.is_triggered();
        // A member that lost the group and did not rejoin (see `kafka::REJOIN_DEADLINE`) is
        // replaced by a new client, so that a running source stays visible.
        while !stopped() {
            let consumer: BaseConsumer<GroupWatch> = match cc
                .create_with_context(GroupWatch::default())
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot announce the running source in Kafka: `ecst offsets reset` will not see it");
                    return;
                }
            };
            if let Err(e) = consumer.subscribe(&[topic.as_str()]) {
                tracing::warn!(error = %e, "cannot announce the running source in Kafka: `ecst offsets reset` will not see it");
                return;
            }
            while !stopped() && consumer.context().out_for(Instant::now()) < REJOIN_DEADLINE {
                // Polling keeps the membership; the messages are not needed.
                let _ = consumer.poll(Duration::from_millis(500));
            }
            if !stopped() {
                tracing::warn!(
                    "the running source's presence member has not rejoined its group: recreating it"
                );
            }
            consumer.unsubscribe();
        }
    });
    Presence(done_tx)
}

/// The members of `group` (their client ids and hosts); empty when nothing runs in it.
pub fn members(cfg: &Config, group: &str) -> Result<Vec<String>, KafkaError> {
    let mut cc = client_config(&cfg.kafka);
    cc.set("group.id", format!("{group}-inspector"));
    let c: BaseConsumer = cc.create()?;
    let list = c.fetch_group_list(Some(group), Duration::from_secs(10))?;
    Ok(list
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .flat_map(|g| g.members())
        .map(|m| format!("{} on {}", m.client_id(), m.client_host()))
        .collect())
}
