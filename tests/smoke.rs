//! Foundation smoke tests: each real service round-trips through the crate ecst uses for it.
#![allow(deprecated)] // apache-avro's datum helpers: same bytes as the new builders

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bson::doc;
use futures::{StreamExt, TryStreamExt};
use mysql_async::prelude::Queryable;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Message};

use crate::common::{admin, endpoints, install_tls, mongo_db, registry, unique, unique_server_id};

#[tokio::test]
async fn mysql_rows_come_back_as_binlog_row_events_with_column_names() -> Result<()> {
    let db = unique("smoke");
    let mut c = admin().await?;
    c.query_drop(format!("CREATE DATABASE `{db}`")).await?;
    c.query_drop(format!(
        "CREATE TABLE `{db}`.t (id INT PRIMARY KEY, name VARCHAR(20))"
    ))
    .await?;
    let (file, pos): (String, u64) = {
        let row: mysql_async::Row = c
            .query_first("SHOW MASTER STATUS")
            .await?
            .context("binlog on")?;
        (row.get(0).context("file")?, row.get(1).context("pos")?)
    };
    c.query_drop(format!(
        "INSERT INTO `{db}`.t VALUES (1, 'Neha'), (2, 'Aravind')"
    ))
    .await?;
    let e = endpoints();
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(e.mysql_host)
        .tcp_port(e.mysql_port)
        .user(Some(e.mysql_user))
        .pass(Some(e.mysql_password))
        .prefer_socket(false);
    let repl = mysql_async::Conn::new(opts).await?;
    let mut stream = repl
        .get_binlog_stream(
            mysql_async::BinlogStreamRequest::new(unique_server_id())
                .with_filename(file.as_bytes())
                .with_pos(pos),
        )
        .await?;
    let mut names = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while names.len() < 2 {
        let ev = tokio::time::timeout_at(deadline, stream.next())
            .await
            .context("no rows event in time")?
            .context("stream ended")??;
        if let Ok(Some(mysql_common::binlog::events::EventData::RowsEvent(rows))) = ev.read_data() {
            let tme = stream.get_tme(rows.table_id()).context("table map")?;
            if tme.database_name() != db.as_str() {
                continue;
            }
            for row in rows.rows(tme) {
                let (_, after) = row?;
                let after = after.context("after image")?;
                let cols: Vec<String> = after
                    .columns_ref()
                    .iter()
                    .map(|c| c.name_str().into_owned())
                    .collect();
                assert_eq!(cols, vec!["id", "name"]);
                names.push(format!("{:?}", after.as_ref(1)));
            }
        }
    }
    assert!(
        names[0].contains("Neha") && names[1].contains("Aravind"),
        "{names:?}"
    );
    c.query_drop(format!("DROP DATABASE `{db}`")).await?;
    Ok(())
}

fn kafka_config() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", endpoints().kafka);
    c
}

#[tokio::test]
async fn kafka_produces_and_a_consumer_group_reads_back() -> Result<()> {
    let topic = unique("smoke-topic");
    let producer: ThreadedProducer<DefaultProducerContext> = kafka_config().create()?;
    for i in 0..3 {
        producer
            .send(BaseRecord::to(&topic).key("k").payload(&format!("m{i}")))
            .map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(20))?;
    let consumer: StreamConsumer = kafka_config()
        .set("group.id", unique("g"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .context("consume timed out")??;
        got.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
    }
    assert_eq!(got, vec!["m0", "m1", "m2"]);
    Ok(())
}

#[tokio::test]
async fn a_committed_kafka_transaction_is_visible_to_read_committed_and_an_aborted_one_is_not()
-> Result<()> {
    let topic = unique("smoke-tx");
    let producer: ThreadedProducer<DefaultProducerContext> = kafka_config()
        .set("transactional.id", unique("tx"))
        .create()?;
    let p = producer.clone();
    let topic2 = topic.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        p.init_transactions(Duration::from_secs(30))?;
        p.begin_transaction()?;
        p.send(BaseRecord::to(&topic2).key("k").payload("aborted"))
            .map_err(|(e, _)| e)?;
        p.abort_transaction(Duration::from_secs(30))?;
        p.begin_transaction()?;
        p.send(BaseRecord::to(&topic2).key("k").payload("committed"))
            .map_err(|(e, _)| e)?;
        p.commit_transaction(Duration::from_secs(30))?;
        Ok(())
    })
    .await??;
    let msgs = crate::common::read_topic(&topic, 1, Duration::from_secs(30)).await?;
    let payloads: Vec<String> = msgs
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(payloads, vec!["committed"]);
    Ok(())
}

#[tokio::test]
async fn the_registry_registers_encodes_decodes_by_id_and_refuses_an_incompatible_schema()
-> Result<()> {
    let reg = registry();
    let subject = format!("{}-value", unique("smoke-subject"));
    let v1 = r#"{"type":"record","name":"U","fields":[{"name":"id","type":"int"}]}"#;
    let id = reg.register(&subject, v1).await?;
    let schema = apache_avro::Schema::parse_str(v1)?;
    let datum = apache_avro::to_avro_datum(
        &schema,
        apache_avro::types::Value::Record(vec![("id".into(), apache_avro::types::Value::Int(7))]),
    )?;
    let mut framed = Vec::new();
    ecst::events::registry::frame_into(&mut framed, id, &datum);
    // Decode through a fresh client so the schema is fetched by id from the server.
    let fresh = registry();
    let (got_id, body) = ecst::events::registry::unframe(&framed)?;
    let fetched = fresh.schema(got_id).await?;
    #[allow(deprecated)]
    let value = apache_avro::from_avro_datum(&fetched, &mut &body[..], None)?;
    assert_eq!(
        value,
        apache_avro::types::Value::Record(vec![("id".into(), apache_avro::types::Value::Int(7))])
    );
    // A new required field without default breaks BACKWARD compatibility.
    let v2 = r#"{"type":"record","name":"U","fields":[{"name":"id","type":"int"},{"name":"x","type":"string"}]}"#;
    match reg.register(&subject, v2).await {
        Err(ecst::events::registry::RegistryError::Refused { .. }) => Ok(()),
        other => bail!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn mongodb_inserts_updates_many_on_a_dotted_path_and_finds() -> Result<()> {
    install_tls();
    let db = mongo_db(&unique("smoke")).await?;
    let coll = db.collection::<bson::Document>("purchase_order");
    coll.insert_many(vec![
        doc! { "user": { "id": 1, "email": "a@gmail.com" }, "price": 1 },
        doc! { "user": { "id": 1, "email": "a@gmail.com" }, "price": 2 },
        doc! { "user": { "id": 2, "email": "b@gmail.com" }, "price": 3 },
    ])
    .await?;
    let r = coll
        .update_many(
            doc! { "user.id": 1 },
            doc! { "$set": { "user.email": "a@hotmail.com" } },
        )
        .await?;
    assert_eq!(r.modified_count, 2);
    let docs: Vec<bson::Document> = coll.find(doc! {}).await?.try_collect().await?;
    let emails: Vec<&str> = docs
        .iter()
        .filter_map(|d| d.get_document("user").ok()?.get_str("email").ok())
        .collect();
    assert_eq!(emails.iter().filter(|e| **e == "a@hotmail.com").count(), 2);
    assert_eq!(emails.iter().filter(|e| **e == "b@gmail.com").count(), 1);
    db.drop().await?;
    Ok(())
}
