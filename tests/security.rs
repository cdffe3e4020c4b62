//! TLS and authentication to the services, with secrets read from files.
//!
//! The stack's MariaDB user `ecst_tls` may only log in over TLS (`REQUIRE SSL`) and the broker
//! has a SASL/PLAIN listener beside the plaintext one (`dev/stack`), so these tests fail if ecst
//! silently connected without TLS or without authenticating.

use std::time::Duration;

use anyhow::Result;
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
    let e = endpoints();
    let stack = env(
        "ECST_STACK_DIR",
        concat!(env!("CARGO_MANIFEST_DIR"), "/.stack"),
    );
    let ca = env("ECST_MYSQL_CA_FILE", &format!("{stack}/mysql/tls/ca.pem"));
    let mysql_pw = secret_file("mysql", &env("ECST_MYSQL_TLS_PASSWORD", "ecst_tls"))?;
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
                "user = \"{}\"\n                tls = \"required\"\n                ca_file = \"{ca}\"",
                env("ECST_MYSQL_TLS_USER", "ecst_tls")
            ),
        )
        .replace(
            &format!("password = \"{}\"", e.mysql_password),
            &format!("password_file = \"{mysql_pw}\""),
        );
    Ok(toml)
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
    let run = start(cfg, Components::Both);
    wait_events(&tc.topic("users"), 4, T).await?;
    sql(format!(
        "UPDATE `{db}`.users SET email = 'neha.parate@hotmail.com' WHERE id = 1"
    ))
    .await?;
    let coll = mdb.collection::<bson::Document>("purchase_order");
    wait_for("neha's copies over TLS and SASL", T, || async {
        let n = coll
            .count_documents(bson::doc! { "user.email": "neha.parate@hotmail.com" })
            .await?;
        Ok((n == 2).then_some(()))
    })
    .await?;
    assert!(!run.is_finished());
    run.stop().await?;
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
        err.to_lowercase().contains("authentication"),
        "a definite error naming authentication: {err}"
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
