//! TLS and authentication to the services, with secrets read from files.
//!
//! The stack's MariaDB user `ecst_tls` may only log in over TLS (`REQUIRE SSL`) and the broker
//! has a SASL/PLAIN listener beside the plaintext one (`dev/stack`), so these tests fail if ecst
//! silently connected without TLS or without authenticating. The MongoDB ones go to `mongo-tls`,
//! a FerretDB that listens with TLS only there and asks for SCRAM-SHA-256, on its own backend
//! database: a copy updated there was written over TLS, as the authenticated user.

use std::time::Duration;

use anyhow::{Context, Result};
use ecst::app::Components;

use crate::common::*;

const T: Duration = Duration::from_secs(90);

fn env(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

fn secret_file(name: &str, value: &str) -> Result<String> {
    let path = std::env::temp_dir().join(format!("{}-{name}", unique("secret")));
    std::fs::write(&path, format!("{value}\n"))?;
    Ok(path.display().to_string())
}

/// `tc`'s TOML with MySQL over TLS as the TLS-only user and Kafka over SASL/PLAIN, both
/// passwords read from files, and `kafka_password` as the SASL password.
fn secured_toml(tc: &TestConfig, with_source: bool, kafka_password: &str) -> Result<String> {
    secured_toml_as(
        tc,
        with_source,
        kafka_password,
        &env("ECST_MYSQL_TLS_USER", "ecst_tls"),
        &env("ECST_MYSQL_TLS_PASSWORD", "ecst_tls"),
    )
}

/// As [`secured_toml`], as MySQL user `mysql_user` with `mysql_password`.
fn secured_toml_as(
    tc: &TestConfig,
    with_source: bool,
    kafka_password: &str,
    mysql_user: &str,
    mysql_password: &str,
) -> Result<String> {
    let e = endpoints();
    let stack = env(
        "ECST_STACK_DIR",
        concat!(env!("CARGO_MANIFEST_DIR"), "/.stack"),
    );
    let ca = env("ECST_MYSQL_CA_FILE", &format!("{stack}/mysql/tls/ca.pem"));
    let mysql_pw = secret_file("mysql", mysql_password)?;
    let kafka_pw = secret_file("kafka", kafka_password)?;
    let toml = tc
        .toml(with_source)
        .replace(
            &format!("bootstrap_servers = \"{}\"", e.kafka),
            &format!(
                r#"bootstrap_servers = "{sasl}"
            properties = {{ "security.protocol" = "SASL_PLAINTEXT", "sasl.mechanism" = "PLAIN", "sasl.username" = "{user}" }}
            secret_files = {{ "sasl.password" = "{kafka_pw}" }}"#,
                sasl = env("ECST_KAFKA_SASL_BOOTSTRAP", "127.0.0.1:19094"),
                user = env("ECST_KAFKA_SASL_USER", "ecst"),
            ),
        )
        .replace(
            &format!("user = \"{}\"", e.mysql_user),
            &format!(
                "user = \"{mysql_user}\"\n                tls = \"required\"\n                ca_file = \"{ca}\""
            ),
        )
        .replace(
            &format!("password = \"{}\"", e.mysql_password),
            &format!("password_file = \"{mysql_pw}\""),
        );
    Ok(toml)
}

/// Runs source and sink from `cfg` on `tc`'s seed scenario (two orders per user in `mdb`):
/// the seed's change of Neha's email reaches both of her copies, and the run is still going.
async fn nehas_change_reaches_both_copies(
    cfg: ecst::config::Config,
    tc: &TestConfig,
    mdb: &mongodb::Database,
    what: &str,
) -> Result<()> {
    let run = start(cfg, Components::Both);
    wait_events(&tc.topic("users"), 4, T).await?;
    sql(format!(
        "UPDATE `{}`.users SET email = 'neha.parate@hotmail.com' WHERE id = 1",
        tc.db
    ))
    .await?;
    let coll = mdb.collection::<bson::Document>("purchase_order");
    wait_for(what, T, || async {
        let n = coll
            .count_documents(bson::doc! { "user.email": "neha.parate@hotmail.com" })
            .await?;
        Ok((n == 2).then_some(()))
    })
    .await?;
    assert!(!run.is_finished(), "{what}: the run goes on");
    run.stop().await
}

/// Starts a source from `toml` and returns the error it stops with (empty if none).
async fn source_error(toml: &str) -> Result<String> {
    let cfg = ecst::config::Config::from_toml_str(toml, Vec::new())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let run = start(cfg, Components::Source);
    Ok(tokio::time::timeout(T, run.join_error())
        .await?
        .unwrap_or_default())
}

#[tokio::test]
async fn source_and_sink_run_over_mysql_tls_and_kafka_sasl_with_passwords_from_files() -> Result<()>
{
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 2).await?;
    let toml = secured_toml(&tc, true, &env("ECST_KAFKA_SASL_PASSWORD", "ecst-sasl"))?;
    let cfg = ecst::config::Config::from_toml_str(&toml, Vec::new())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let shown = cfg.redacted();
    assert!(!shown.contains("ecst-sasl") && !shown.contains("\"ecst_tls\"\n"));
    nehas_change_reaches_both_copies(cfg, &tc, &mdb, "neha's copies over TLS and SASL").await?;
    Ok(())
}

#[tokio::test]
async fn a_wrong_kafka_sasl_password_stops_the_source_with_an_authentication_error() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let toml = secured_toml(&tc, true, "not-the-password")?;
    let err = source_error(&toml).await?;
    assert!(
        err.to_lowercase().contains("authentication")
            && err.contains("after a password rotation, restart ecst"),
        "a definite error naming authentication, and the rotation model: {err}"
    );
    Ok(())
}

#[tokio::test]
async fn a_mysql_certificate_from_an_unknown_ca_is_refused_definitely() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    // A CA that did not sign the server's certificate.
    let dir = std::env::temp_dir().join(unique("ca"));
    std::fs::create_dir_all(&dir)?;
    let ca = dir.join("ca.pem");
    let key = dir.join("ca-key.pem");
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=not the stack's CA", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&ca)
        .stderr(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "openssl made a CA");
    let stack_ca = env(
        "ECST_MYSQL_CA_FILE",
        concat!(env!("CARGO_MANIFEST_DIR"), "/.stack/mysql/tls/ca.pem"),
    );
    let toml = secured_toml(&tc, true, &env("ECST_KAFKA_SASL_PASSWORD", "ecst-sasl"))?
        .replace(&stack_ca, &ca.display().to_string());
    let err = source_error(&toml).await?;
    assert!(
        err.to_lowercase().contains("certificate"),
        "a definite error naming the certificate: {err}"
    );
    Ok(())
}

/// `toml` pointed at the stack's registry behind nginx's basic auth, with `password` in a file.
fn through_registry_auth(toml: &str, password: &str) -> Result<String> {
    let e = endpoints();
    let url = std::env::var("ECST_REGISTRY_AUTH_URL").map_err(|_| {
        anyhow::anyhow!(
            "ECST_REGISTRY_AUTH_URL unset: `dev/stack up registry-auth` (dev/test starts it)"
        )
    })?;
    let file = secret_file("registry", password)?;
    Ok(toml.replace(
        &format!("url = \"{}\"", e.registry),
        &format!(
            "url = \"{url}\"\n            username = \"{}\"\n            password_file = \"{file}\"",
            env("ECST_REGISTRY_AUTH_USER", "ecst")
        ),
    ))
}

#[tokio::test]
async fn source_and_sink_work_through_a_registry_that_requires_basic_auth_with_the_password_from_a_file()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 2).await?;
    let toml = through_registry_auth(
        &tc.toml(true),
        &env("ECST_REGISTRY_AUTH_PASSWORD", "ecst-registry-pw"),
    )?;
    assert!(
        !toml.contains(&endpoints().registry),
        "no way around the proxy: {toml}"
    );
    let cfg = ecst::config::Config::from_toml_str(&toml, Vec::new())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    nehas_change_reaches_both_copies(
        cfg,
        &tc,
        &mdb,
        "neha's copies through the authenticated registry",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_wrong_registry_password_stops_source_and_sink_naming_the_registry_and_dead_letters_nothing()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let wrong = through_registry_auth(&tc.toml(true), "not-the-password")?;
    let err = source_error(&wrong).await?;
    assert!(
        err.contains("schema registry refused the credentials")
            && err.contains("password_file")
            && err.contains("after a password rotation, restart ecst"),
        "a definite error naming the registry and the fix: {err}"
    );
    // The events exist (a source with the right password), and a sink with the wrong one
    // stops on the first of them instead of dead-lettering it as undecodable.
    let good = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    good.stop().await?;
    let sink_cfg = ecst::config::Config::from_toml_str(
        &through_registry_auth(&tc.toml(false), "not-the-password")?,
        Vec::new(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let sink = start(sink_cfg, Components::Sink);
    let err = tokio::time::timeout(T, sink.join_error())
        .await?
        .unwrap_or_default();
    assert!(
        err.contains("schema registry refused the credentials"),
        "the sink stops naming the registry: {err}"
    );
    assert_eq!(dead_letters(&tc).await?, 0, "nothing dead-lettered");
    Ok(())
}

/// The URI of the stack's `mongo-tls` (FerretDB over TLS with SCRAM-SHA-256), with `password`.
fn mongo_tls_uri(password: &str) -> String {
    let stack = env(
        "ECST_STACK_DIR",
        concat!(env!("CARGO_MANIFEST_DIR"), "/.stack"),
    );
    let good = env("ECST_MONGO_TLS_PASSWORD", "ecst-mongo-pw");
    env(
        "ECST_MONGO_TLS_URI",
        &format!(
            "mongodb://ecst:{good}@127.0.0.1:27119/?tls=true&tlsCAFile={stack}/mysql/tls/ca.pem&authSource=ecst_auth&authMechanism=SCRAM-SHA-256"
        ),
    )
    .replace(&format!(":{good}@"), &format!(":{password}@"))
}

/// `toml` with its MongoDB URI replaced by `uri_file` holding `uri`.
fn through_mongo_tls(toml: &str, uri: &str) -> Result<String> {
    let old = format!("uri = \"{}\"", endpoints().mongo);
    anyhow::ensure!(toml.contains(&old), "no MongoDB URI to replace in {toml}");
    let file = secret_file("mongo-uri", uri)?;
    Ok(toml.replace(&old, &format!("uri_file = \"{file}\"")))
}

/// Database `name` on `mongo-tls`, as the test's own authenticated TLS client.
async fn mongo_tls_db(name: &str) -> Result<mongodb::Database> {
    install_tls();
    let good = env("ECST_MONGO_TLS_PASSWORD", "ecst-mongo-pw");
    let client = mongodb::Client::with_uri_str(mongo_tls_uri(&good))
        .await
        .map_err(|e| anyhow::anyhow!("mongo-tls (is it up? dev/stack up mongo-tls): {e}"))?;
    Ok(client.database(name))
}

#[tokio::test]
async fn the_sink_updates_the_copies_over_mongodb_tls_with_scram_credentials_from_uri_file()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_tls_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 2).await?;
    let password = env("ECST_MONGO_TLS_PASSWORD", "ecst-mongo-pw");
    let uri = mongo_tls_uri(&password);
    assert!(uri.contains("tls=true") && uri.contains(&format!(":{password}@")));
    let toml = through_mongo_tls(&tc.toml(true), &uri)?;
    let cfg = ecst::config::Config::from_toml_str(&toml, Vec::new())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(!cfg.redacted().contains(&password));
    nehas_change_reaches_both_copies(cfg, &tc, &mdb, "neha's copies over MongoDB TLS and SCRAM")
        .await?;
    // The plain, unauthenticated MongoDB of the stack got none of it: the sink wrote over TLS.
    let plain = mongo_db(&tc.mongo_db).await?;
    assert_eq!(
        plain
            .collection::<bson::Document>("purchase_order")
            .count_documents(bson::doc! {})
            .await?,
        0
    );
    Ok(())
}

/// How many dead letters `tc`'s sink wrote (none when it never made its topic).
async fn dead_letters(tc: &TestConfig) -> Result<usize> {
    match read_topic(&format!("{}.dlq", tc.name), 1, Duration::from_secs(3)).await {
        Ok(dlq) => Ok(dlq.len()),
        Err(e) if e.to_string().contains("does not exist") => Ok(0),
        Err(e) => Err(e),
    }
}

/// Starts a sink from `toml` (its events exist) and returns the error it stops with.
async fn sink_error(toml: &str) -> Result<String> {
    let cfg = ecst::config::Config::from_toml_str(toml, Vec::new())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let sink = start(cfg, Components::Sink);
    Ok(tokio::time::timeout(T, sink.join_error())
        .await?
        .unwrap_or_default())
}

#[tokio::test]
async fn a_wrong_mongodb_password_stops_the_sink_naming_mongodb_and_dead_letters_nothing()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let good = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    good.stop().await?;
    let toml = through_mongo_tls(&tc.toml(false), &mongo_tls_uri("not-the-password"))?;
    let err = sink_error(&toml).await?;
    assert!(
        err.contains("mongodb refused the credentials")
            && err.contains("uri_file")
            && err.contains("after a password rotation, restart ecst"),
        "a definite error naming MongoDB and the fix: {err}"
    );
    assert!(!err.contains("not-the-password"), "{err}");
    assert_eq!(dead_letters(&tc).await?, 0, "nothing dead-lettered");
    Ok(())
}

#[tokio::test]
async fn a_mongodb_certificate_from_an_unknown_ca_stops_the_sink_naming_mongodb() -> Result<()> {
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let good = start(tc.config(true)?, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    good.stop().await?;
    // Without tlsCAFile the driver trusts the system's roots, which do not know the stack's CA.
    let password = env("ECST_MONGO_TLS_PASSWORD", "ecst-mongo-pw");
    let uri = mongo_tls_uri(&password);
    let without_ca = uri
        .split('&')
        .filter(|p| !p.starts_with("tlsCAFile="))
        .collect::<Vec<_>>()
        .join("&");
    assert!(without_ca.contains("tls=true") && !without_ca.contains("tlsCAFile"));
    let err = sink_error(&through_mongo_tls(&tc.toml(false), &without_ca)?).await?;
    assert!(
        err.contains("mongodb's TLS connection cannot be trusted")
            && err.contains("UnknownIssuer")
            && err.contains("tlsCAFile"),
        "a definite error naming MongoDB, the certificate and the fix: {err}"
    );
    assert_eq!(dead_letters(&tc).await?, 0, "nothing dead-lettered");
    Ok(())
}

#[tokio::test]
async fn no_secret_appears_in_logs_print_config_check_metrics_the_status_page_or_dead_letters()
-> Result<()> {
    use rdkafka::Message;
    use rdkafka::message::Headers;
    use rdkafka::producer::Producer;
    use tokio::process::Command;
    let _shared = STACK_LOCK.read().await;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_tls_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 1).await?;
    // A MySQL user of this test whose password is found nowhere else (the stack's users have
    // their names as passwords, which a log may name rightly).
    let user = unique("sec");
    let mysql_pw = format!("pw-{}", unique("m"));
    sql(format!(
        "CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{mysql_pw}'"
    ))
    .await?;
    sql(format!(
        "GRANT REPLICATION SLAVE, REPLICATION CLIENT, BINLOG MONITOR, SELECT, RELOAD, LOCK TABLES, SHOW VIEW ON *.* TO '{user}'@'127.0.0.1'"
    ))
    .await?;
    let sasl_pw = env("ECST_KAFKA_SASL_PASSWORD", "ecst-sasl");
    let registry_pw = env("ECST_REGISTRY_AUTH_PASSWORD", "ecst-registry-pw");
    let mongo_pw = env("ECST_MONGO_TLS_PASSWORD", "ecst-mongo-pw");
    let port = free_port()?;
    let toml = through_mongo_tls(
        &through_registry_auth(
            &secured_toml_as(&tc, true, &sasl_pw, &user, &mysql_pw)?,
            &registry_pw,
        )?,
        &mongo_tls_uri(&mongo_pw),
    )?
    .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""));
    let cfg = std::env::temp_dir().join(format!("{}.toml", unique("secrets")));
    std::fs::write(&cfg, &toml)?;
    let cfg_arg = cfg.to_string_lossy().to_string();
    let cli = |args: &'static [&'static str]| {
        let cfg_arg = cfg_arg.clone();
        async move {
            let out = Command::new(ecst_bin())
                .args(["--config", &cfg_arg])
                .args(args)
                .env("RUST_LOG", "debug")
                .output()
                .await?;
            Ok::<_, anyhow::Error>(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let mut seen: Vec<(&str, String)> = vec![
        ("print-config", cli(&["print-config"]).await?),
        ("check", cli(&["check"]).await?),
    ];
    // Every line at debug level, of a run that used all four secrets.
    let mut run = spawn_captured(&cfg, "run", &[], "debug")?;
    wait_events(&tc.topic("users"), 4, T).await?;
    // A poison message: its dead letter carries the error in its headers.
    let producer: rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", endpoints().kafka)
            .create()?;
    producer
        .send(
            rdkafka::producer::BaseRecord::to(&tc.topic("users"))
                .key(&b"junk"[..])
                .payload(&b"not avro"[..]),
        )
        .map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(20))?;
    let dlq = read_topic(&format!("{}.dlq", tc.name), 1, T).await?;
    anyhow::ensure!(dlq.len() == 1, "one dead letter, {} read", dlq.len());
    let mut headers = String::new();
    for m in &dlq {
        if let Some(h) = m.headers() {
            for hd in h.iter() {
                headers.push_str(&format!(
                    "{}={}\n",
                    hd.key,
                    String::from_utf8_lossy(hd.value.unwrap_or_default())
                ));
            }
        }
    }
    assert!(
        headers.contains("ecst.dlq.error"),
        "the dead letter has its context: {headers}"
    );
    sql(format!(
        "UPDATE `{db}`.users SET email = 'secret.test@x' WHERE id = 1"
    ))
    .await?;
    wait_for("the change applied", T, || async {
        let n = mdb
            .collection::<bson::Document>("purchase_order")
            .count_documents(bson::doc! { "user.email": "secret.test@x" })
            .await?;
        Ok((n == 1).then_some(()))
    })
    .await?;
    seen.push(("/metrics", http_get(port, "/metrics").await?));
    seen.push(("/", http_get(port, "/").await?));
    seen.push(("/ready", http_get(port, "/ready").await?));
    seen.push(("dead-letter headers", headers));
    run.child.kill().await?;
    seen.push(("offsets show", cli(&["offsets", "show"]).await?));
    seen.push(("the run's log", run.output()));
    sql(format!("DROP USER '{user}'@'127.0.0.1'")).await?;
    // Not vacuous: each text is there, and says what it is about.
    let text = |name: &str| {
        seen.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t.as_str())
            .unwrap_or("")
    };
    assert!(
        text("print-config").contains(&user),
        "{}",
        text("print-config")
    );
    assert!(text("check").contains("PASS"), "{}", text("check"));
    assert!(text("the run's log").lines().count() > 20 && text("the run's log").contains("DEBUG"));
    assert!(text("/metrics").contains("ecst_sink_applied_total"));
    for (what, t) in &seen {
        for (name, secret) in [
            ("mysql", &mysql_pw),
            ("kafka", &sasl_pw),
            ("registry", &registry_pw),
            ("mongodb", &mongo_pw),
        ] {
            assert!(
                !t.contains(secret.as_str()),
                "the {name} password is in {what}:\n{t}"
            );
        }
    }
    Ok(())
}

/// Sets the password of Kafka user `ecst` on the broker's ROTATE listener. SASL/PLAIN users
/// live in the listener's static JAAS, which Kafka does not reconfigure at run time, so a
/// rotation is what it is in production: the config changed (here through the file dev/stack
/// builds that JAAS from), then a broker restart.
async fn rotate_kafka_password(password: &str) -> Result<()> {
    let stack_dir = env(
        "ECST_STACK_DIR",
        concat!(env!("CARGO_MANIFEST_DIR"), "/.stack"),
    );
    std::fs::write(
        format!("{stack_dir}/kafka/rotate-password"),
        format!("{password}\n"),
    )?;
    stack(&["restart", "kafka"]).await
}

#[tokio::test]
async fn a_kafka_password_rotated_on_the_broker_stops_ecst_saying_to_restart_and_the_restart_with_the_new_file_loses_nothing()
-> Result<()> {
    let _exclusive = STACK_LOCK.write().await;
    let old_pw = format!("pw-{}", unique("k"));
    let new_pw = format!("pw-{}", unique("k"));
    rotate_kafka_password(&old_pw).await?;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users", "product"]).with_seed_mappings();
    let mdb = mongo_db(&tc.mongo_db).await?;
    seed_orders(&mdb, 2).await?;
    let file = secret_file("kafka-rotate", &old_pw)?;
    let toml = tc.toml(true).replace(
        &format!("bootstrap_servers = \"{}\"", endpoints().kafka),
        &format!(
            r#"bootstrap_servers = "{rotate}"
            properties = {{ "security.protocol" = "SASL_PLAINTEXT", "sasl.mechanism" = "PLAIN", "sasl.username" = "{user}" }}
            secret_files = {{ "sasl.password" = "{file}" }}"#,
            rotate = env("ECST_KAFKA_ROTATE_BOOTSTRAP", "127.0.0.1:19097"),
            user = env("ECST_KAFKA_SASL_USER", "ecst"),
        ),
    );
    let parse = || {
        ecst::config::Config::from_toml_str(&toml, Vec::new()).map_err(|e| anyhow::anyhow!("{e}"))
    };
    let coll = mdb.collection::<bson::Document>("purchase_order");
    let copies_say = |email: &'static str| {
        let coll = coll.clone();
        async move {
            wait_for(
                &format!("both of neha's copies to say {email}"),
                T,
                || async {
                    let n = coll
                        .count_documents(bson::doc! { "user.email": email })
                        .await?;
                    Ok((n == 2).then_some(()))
                },
            )
            .await
        }
    };
    let run = start(parse()?, Components::Both);
    wait_events(&tc.topic("users"), 4, T).await?;
    set_email(&db, 1, "before.rotation@x").await?;
    copies_say("before.rotation@x").await?;
    // The brokers take the new password; ecst still has the old one, and its connections are
    // gone with the restart.
    rotate_kafka_password(&new_pw).await?;
    set_email(&db, 1, "during.rotation@x").await?;
    let err = tokio::time::timeout(Duration::from_secs(180), run.join_error())
        .await
        .context("ecst stops instead of retrying a refused password for ever")?
        .unwrap_or_default();
    assert!(
        err.contains("kafka refused the credentials")
            && err.contains("after a password rotation, restart ecst"),
        "a definite stop naming Kafka's refusal and the restart: {err}"
    );
    // The file updated and ecst restarted: the change made meanwhile arrives, once.
    std::fs::write(&file, format!("{new_pw}\n"))?;
    let run = start(parse()?, Components::Both);
    copies_say("during.rotation@x").await?;
    set_email(&db, 1, "after.rotation@x").await?;
    copies_say("after.rotation@x").await?;
    run.stop().await?;
    let evs = wait_events(&tc.topic("users"), 7, T).await?;
    for email in ["before.rotation@x", "during.rotation@x", "after.rotation@x"] {
        let n = evs
            .iter()
            .filter(|e| e.after.as_ref().and_then(|a| a.get_str("email").ok()) == Some(email))
            .count();
        assert_eq!(n, 1, "the change to {email} is in Kafka exactly once");
    }
    Ok(())
}

async fn set_email(db: &str, id: i32, email: &str) -> Result<()> {
    sql(format!(
        "UPDATE `{db}`.users SET email = '{email}' WHERE id = {id}"
    ))
    .await
}

#[tokio::test]
async fn a_mysql_password_rotated_while_streaming_is_read_again_from_its_file_and_no_change_is_lost_or_repeated()
-> Result<()> {
    use mysql_async::prelude::Queryable;
    use std::sync::atomic::{AtomicBool, Ordering};
    let _shared = STACK_LOCK.read().await;
    let db = crate::ops::counter_table().await?;
    let tc = TestConfig::new(&db, &["counter"]);
    // A user of this test's own, so that rotating its password touches no other test.
    let user = unique("rot");
    let grants = "REPLICATION SLAVE, REPLICATION CLIENT, BINLOG MONITOR, SELECT, RELOAD, LOCK TABLES, SHOW VIEW";
    for host in ["127.0.0.1", "localhost"] {
        sql(format!(
            "CREATE USER '{user}'@'{host}' IDENTIFIED BY 'first-pw'"
        ))
        .await?;
        sql(format!("GRANT {grants} ON *.* TO '{user}'@'{host}'")).await?;
    }
    let pw_file = std::env::temp_dir().join(format!("{user}.pw"));
    std::fs::write(&pw_file, "first-pw\n")?;
    let e = endpoints();
    let toml = tc
        .toml(true)
        .replace(
            &format!("user = \"{}\"", e.mysql_user),
            &format!("user = \"{user}\""),
        )
        .replace(
            &format!("password = \"{}\"", e.mysql_password),
            &format!("password_file = \"{}\"", pw_file.display()),
        );
    anyhow::ensure!(toml.contains("password_file"), "{toml}");
    let cfg = std::env::temp_dir().join(format!("{}.toml", tc.name));
    std::fs::write(&cfg, toml)?;
    let mut run = spawn_captured(&cfg, "source", &[], "info")?;
    wait_events(&tc.topic("counter"), 100, T).await?;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(crate::faults::write_until(db.clone(), stop.clone()));
    wait_events(&tc.topic("counter"), 400, T).await?;
    // The rotation: the server takes the new password, and ecst's sessions end (as a
    // restart or a network blip would end them); the file still holds the old one.
    for host in ["127.0.0.1", "localhost"] {
        sql(format!(
            "ALTER USER '{user}'@'{host}' IDENTIFIED BY 'second-pw'"
        ))
        .await?;
    }
    let mut c = admin().await?;
    let ids: Vec<u64> = c
        .query(format!(
            "SELECT id FROM information_schema.processlist WHERE user = '{user}'"
        ))
        .await?;
    for id in ids {
        let _ = c.query_drop(format!("KILL CONNECTION {id}")).await;
    }
    run.wait_for_output("mysql refused the password", T).await?;
    std::fs::write(&pw_file, "second-pw\n")?;
    run.wait_for_output("recovered", T).await?;
    let at = crate::faults::committed_updates(&db).await?;
    wait_events(&tc.topic("counter"), 100 + at + 100, T).await?;
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    assert!(
        !run.output().contains("first-pw") && !run.output().contains("second-pw"),
        "no password in the log"
    );
    crate::faults::exactly_once_and_still_running(&mut run, &tc, &db, "rotation").await?;
    for host in ["127.0.0.1", "localhost"] {
        sql(format!("DROP USER '{user}'@'{host}'")).await?;
    }
    Ok(())
}

/// A MySQL user of the test's own with the source's grants, identified by `identified` (the
/// `IDENTIFIED …` clause); returns its name.
async fn mysql_user_identified(prefix: &str, identified: &str) -> Result<String> {
    let user = unique(prefix);
    // (BINLOG MONITOR is MariaDB's; MySQL's REPLICATION CLIENT covers it.)
    let monitor = if server_is_mariadb().await? {
        "BINLOG MONITOR, "
    } else {
        ""
    };
    for host in ["127.0.0.1", "localhost", "%"] {
        sql(format!("CREATE USER '{user}'@'{host}' {identified}")).await?;
        sql(format!(
            "GRANT REPLICATION SLAVE, REPLICATION CLIENT, {monitor}SELECT, RELOAD, LOCK TABLES, SHOW VIEW ON *.* TO '{user}'@'{host}'"
        ))
        .await?;
    }
    Ok(user)
}

/// `tc`'s TOML as MySQL user `user` with `password`.
fn toml_as(tc: &TestConfig, user: &str, password: &str) -> String {
    let e = endpoints();
    tc.toml(true)
        .replace(
            &format!("user = \"{}\"", e.mysql_user),
            &format!("user = \"{user}\""),
        )
        .replace(
            &format!("password = \"{}\"", e.mysql_password),
            &format!("password = \"{password}\""),
        )
}

#[tokio::test]
async fn a_user_of_the_servers_other_auth_plugin_streams_and_a_refused_password_names_the_user_and_the_plugin()
-> Result<()> {
    let _shared = STACK_LOCK.read().await;
    // The plugin other than the classic one: MariaDB's ed25519 (the driver crashed on it), or
    // MySQL 8's default caching_sha2_password (in the compat workflow).
    let (plugin, identified) = if server_is_mariadb().await? {
        let installed: Vec<String> = {
            use mysql_async::prelude::Queryable;
            admin()
                .await?
                .query("SELECT plugin_name FROM information_schema.plugins WHERE plugin_name = 'ed25519'")
                .await?
        };
        if installed.is_empty() {
            sql("INSTALL SONAME 'auth_ed25519'").await?;
        }
        (
            "ed25519",
            "IDENTIFIED VIA ed25519 USING PASSWORD('right-pw')",
        )
    } else {
        (
            "caching_sha2_password",
            "IDENTIFIED WITH caching_sha2_password BY 'right-pw'",
        )
    };
    let user = mysql_user_identified("plug", identified).await?;
    let db = seed_database().await?;
    let tc = TestConfig::new(&db, &["users"]);
    let cfg = ecst::config::Config::from_toml_str(&toml_as(&tc, &user, "right-pw"), Vec::new())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Every login with the right password is taken: the driver's ed25519 proof was refused for
    // about 1 login in 150 (a definite stop of the source), so 500 logins failed about 97 % of
    // the time.
    let mysql = cfg
        .mysql
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no [mysql]"))?;
    for _ in 0..500 {
        ecst::source::connect(&mysql).await?.disconnect().await?;
    }
    let run = start(cfg, Components::Source);
    wait_events(&tc.topic("users"), 4, T).await?;
    run.stop().await?;

    let err = source_error(&toml_as(&tc, &user, "wrong-pw")).await?;
    assert!(
        err.contains(&user) && err.contains(plugin) && err.contains("1045"),
        "a definite stop naming the user, its plugin and the server's error: {err}"
    );
    // `ecst check` says the same once, with one fix (it appended a generic second one).
    let refused = ecst::config::Config::from_toml_str(&toml_as(&tc, &user, "wrong-pw"), Vec::new())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let lines = ecst::check::run_checks(&refused).await;
    let line = lines
        .iter()
        .find(|c| c.name == "mysql connection")
        .ok_or_else(|| anyhow::anyhow!("no mysql connection line: {lines:?}"))?;
    assert!(
        !line.ok
            && line.detail.contains(plugin)
            && line.detail.to_lowercase().matches("fix:").count() == 1,
        "one failing line naming the plugin, with one fix: {line:?}"
    );
    let classic = mysql_user_identified("native", "IDENTIFIED BY 'right-pw'").await?;
    let err = source_error(&toml_as(&tc, &classic, "wrong-pw")).await?;
    assert!(
        err.contains(&classic)
            && (err.contains("mysql_native_password") || err.contains("caching_sha2_password")),
        "{err}"
    );
    Ok(())
}
