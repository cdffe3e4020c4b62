//! Kafka's limit for ecst's own records (issue 15): a bare librdkafka producer (the client ecst
//! uses, none of ecst's code) replays the records of a topic ecst wrote, keys, values and
//! headers as they are, into a new topic with ecst's producer settings (idempotent,
//! transactional, lz4, linger 5 ms, librdkafka's default 1 MB batches) and a transaction a
//! second (what ecst's group commit reaches while catching up: ten 100 ms intervals), as fast as
//! the brokers take them. The payload is exactly as compressible as ecst's, which Kafka's own
//! `ProducerPerformance` cannot do (its records are random letters, or text lines of a file).
//!
//! Prints one line: `replayed N records (B bytes) in S s = R records/s`.
//!
//! Usage: `cargo run --release --example kafka_limit -- <topic> [skip] [max records]` (the
//! records after the first `skip`), brokers from `ECST_KAFKA_BOOTSTRAP`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

type Record = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, Vec<u8>)>);

/// The committed records of partition 0 of `topic` after the first `skip`, up to `max`.
fn read_all(bootstrap: &str, topic: &str, skip: usize, max: usize) -> Result<Vec<Record>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "kafka-limit-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut skipped = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while out.len() < max && Instant::now() < deadline {
        match consumer.poll(Duration::from_secs(1)) {
            Some(Ok(_)) if skipped < skip => skipped += 1,
            Some(Ok(m)) => {
                let headers = m.headers().map_or_else(Vec::new, |h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                            )
                        })
                        .collect()
                });
                out.push((
                    m.key().map(<[u8]>::to_vec),
                    m.payload().map(<[u8]>::to_vec),
                    headers,
                ));
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => bail!("reading {topic}: {e}"),
            None => {}
        }
    }
    if out.is_empty() {
        bail!("no committed records in {topic}");
    }
    Ok(out)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let topic = args
        .next()
        .context("usage: kafka_limit <topic> [skip] [max records]")?;
    let skip: usize = args.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let max: usize = args
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    let bootstrap =
        std::env::var("ECST_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let records = read_all(&bootstrap, &topic, skip, max)?;
    let bytes: usize = records
        .iter()
        .map(|(k, v, h)| {
            k.as_ref().map_or(0, Vec::len)
                + v.as_ref().map_or(0, Vec::len)
                + h.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        })
        .sum();

    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let target = format!("kafka-limit-{stamp}");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    for r in admin
        .create_topics(
            &[NewTopic::new(&target, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }

    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("transactional.id", &target)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("message.max.bytes", "16777216")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.kbytes", "65536")
        .create()?;
    producer.init_transactions(Duration::from_secs(30))?;
    let started = Instant::now();
    producer.begin_transaction()?;
    let mut opened = Instant::now();
    for (key, value, headers) in &records {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record = BaseRecord::<Vec<u8>, Vec<u8>>::to(&target).headers(h);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    producer.poll(Duration::from_millis(5));
                    record = r;
                }
                Err((e, _)) => bail!("producing: {e}"),
            }
        }
        producer.poll(Duration::ZERO);
        if opened.elapsed() >= Duration::from_secs(1) {
            producer.commit_transaction(Duration::from_secs(60))?;
            producer.begin_transaction()?;
            opened = Instant::now();
        }
    }
    producer.commit_transaction(Duration::from_secs(60))?;
    let secs = started.elapsed().as_secs_f64();
    let _ = admin.delete_topics(&[&target], &AdminOptions::new()).await;
    println!(
        "replayed {} records ({bytes} bytes) in {secs:.2} s = {:.0} records/s",
        records.len(),
        records.len() as f64 / secs
    );
    Ok(())
}
