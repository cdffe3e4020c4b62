//! Which authentication plugin a refused MySQL login went through, for the message that stops
//! the source (the server's "Access denied" names the user, never the plugin).
//!
//! The driver does not say which plugin it was asked for, so after a refusal a probe asks the
//! server itself, without logging in: it reads the server's greeting, which names the server's
//! default plugin, and answers it with the user's name and an empty proof for that plugin. A
//! server whose account uses another plugin answers with an auth-switch request naming it
//! (the client-side name: `client_ed25519`, `caching_sha2_password`, `auth_gssapi_client`, …);
//! otherwise the account uses the default one. The probe sends no password and no proof of
//! one, so it cannot log in; it costs the server one more failed login.
//!
//! With `tls = "required"` nothing is sent in clear, not even the user's name: the probe reads
//! the greeting only and reports the server's default plugin as such. Whatever goes wrong in
//! the probe makes the message say that the plugin is not known, never a guess.

use std::time::Duration;

use mysql_common::constants::CapabilityFlags;
use mysql_common::io::ParseBuf;
use mysql_common::packets::HandshakePacket;
use mysql_common::proto::MySerialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{MysqlConfig, TlsMode};

/// What the probe learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plugin {
    /// The account's plugin (as the server asked the client for it).
    Account(String),
    /// Only the server's default plugin (the account's was not asked for: TLS required).
    ServerDefault(String),
    /// Nothing (why).
    Unknown(String),
}

impl std::fmt::Display for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Plugin::Account(p) => write!(f, "its authentication plugin is {p}"),
            Plugin::ServerDefault(p) => write!(
                f,
                "the server's default authentication plugin is {p} (the account's own is not asked for without TLS)"
            ),
            Plugin::Unknown(why) => write!(f, "its authentication plugin is not known ({why})"),
        }
    }
}

/// The plugin `cfg.user` logs in with at `cfg`'s server (see the module note).
pub async fn plugin_of(cfg: &MysqlConfig) -> Plugin {
    let timeout = Duration::from_millis(cfg.connect_timeout_ms.max(1_000));
    match tokio::time::timeout(timeout, probe(cfg)).await {
        Ok(Ok(p)) => p,
        Ok(Err(why)) => Plugin::Unknown(why),
        Err(_) => Plugin::Unknown("the server did not answer the probe in time".into()),
    }
}

async fn probe(cfg: &MysqlConfig) -> Result<Plugin, String> {
    let mut sock = TcpStream::connect((cfg.host.as_str(), cfg.port))
        .await
        .map_err(|e| e.to_string())?;
    let (_, greeting) = read_packet(&mut sock).await?;
    if greeting.first() == Some(&0xff) {
        return Err("the server refused the connection before authentication".into());
    }
    let hello: HandshakePacket<'_> = ParseBuf(&greeting)
        .parse(())
        .map_err(|e| format!("unreadable greeting: {e}"))?;
    let Some(default) = hello.auth_plugin() else {
        return Err("the server names no plugin".into());
    };
    let default = default.into_owned();
    let default_name = String::from_utf8_lossy(default.as_bytes()).into_owned();
    if cfg.tls == TlsMode::Required {
        return Ok(Plugin::ServerDefault(default_name));
    }
    let flags = CapabilityFlags::CLIENT_PROTOCOL_41
        | CapabilityFlags::CLIENT_SECURE_CONNECTION
        | CapabilityFlags::CLIENT_LONG_PASSWORD
        | CapabilityFlags::CLIENT_PLUGIN_AUTH;
    let response = mysql_common::packets::HandshakeResponse::new(
        Some(Vec::<u8>::new()),
        hello.server_version_parsed().unwrap_or((8, 0, 0)),
        Some(cfg.user.as_bytes()),
        None::<&[u8]>,
        Some(default),
        flags & hello.capabilities(),
        None,
        1 << 24,
    );
    let mut body = Vec::new();
    response.serialize(&mut body);
    write_packet(&mut sock, 1, &body).await?;
    let (_, reply) = read_packet(&mut sock).await?;
    match reply.first() {
        // An auth-switch request: the account's plugin, NUL-terminated.
        Some(0xfe) if reply.len() > 1 => {
            let name = reply[1..].split(|b| *b == 0).next().unwrap_or_default();
            Ok(Plugin::Account(String::from_utf8_lossy(name).into_owned()))
        }
        // The proof was checked (and refused, or more was asked for): the default plugin.
        Some(0xff | 0x00 | 0x01) => Ok(Plugin::Account(default_name)),
        _ => Err("an unexpected answer".into()),
    }
}

async fn read_packet(sock: &mut TcpStream) -> Result<(u8, Vec<u8>), String> {
    let mut head = [0u8; 4];
    sock.read_exact(&mut head)
        .await
        .map_err(|e| e.to_string())?;
    let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok((head[3], body))
}

async fn write_packet(sock: &mut TcpStream, seq: u8, body: &[u8]) -> Result<(), String> {
    let len = body.len();
    if len >= 1 << 24 {
        return Err("packet too large".into());
    }
    let mut out = Vec::with_capacity(len + 4);
    out.extend_from_slice(&[len as u8, (len >> 8) as u8, (len >> 16) as u8, seq]);
    out.extend_from_slice(body);
    sock.write_all(&out).await.map_err(|e| e.to_string())
}
