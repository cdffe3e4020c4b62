//! The source half's errors, classed in one place ([`SourceError::class`]): what is retried
//! (transient) and what stops the source with a message naming the cause and the fix (definite).

use rdkafka::error::KafkaError;

use super::preflight;
use crate::error::{Classify, ErrorClass};
use crate::events::avro::AvroError;
use crate::events::registry::RegistryError;
use crate::kafka::KafkaClientError;
use crate::offsets::BinlogPosition;

/// Errors of the source half.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// MySQL protocol or connection error.
    #[error("mysql: {0}")]
    Mysql(#[from] mysql_async::Error),
    /// Connecting took longer than `mysql.connect_timeout_ms`.
    #[error("mysql: connect to {host}:{port} timed out")]
    ConnectTimeout {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// No event (not even a heartbeat) for too long.
    #[error("binlog stream silent for {silent_ms} ms (no heartbeat); reconnecting")]
    Stalled {
        /// Silence that triggered the watchdog.
        silent_ms: u64,
    },
    /// The server closed the stream.
    #[error("binlog stream ended by the server")]
    StreamEnded,
    /// An event failed its CRC32 check.
    #[error("binlog event at {file}:{pos} failed its CRC32 check")]
    Checksum {
        /// File.
        file: String,
        /// End position of the event.
        pos: u64,
    },
    /// A TABLE_MAP event could not be understood.
    #[error("table map of `{table}`: {detail}")]
    TableMap {
        /// Table.
        table: String,
        /// Detail.
        detail: String,
    },
    /// TABLE_MAP lacks column names: the server does not log full row metadata.
    #[error(
        "binlog for `{table}` has no column names: set binlog_row_metadata = FULL on the server"
    )]
    MissingRowMetadata {
        /// Table.
        table: String,
    },
    /// A column type ecst does not map.
    #[error("table `{table}` column `{column}`: unsupported type {detail}")]
    UnsupportedType {
        /// Table.
        table: String,
        /// Column.
        column: String,
        /// The type.
        detail: String,
    },
    /// A value that does not fit its column.
    #[error("column `{column}`: unexpected value {detail}")]
    ValueType {
        /// Column.
        column: String,
        /// Detail.
        detail: String,
    },
    /// A rows event could not be decoded.
    #[error("rows of `{table}`: {detail}")]
    RowDecode {
        /// Table.
        table: String,
        /// Detail.
        detail: String,
    },
    /// A row image without every column: the writing session did not log full rows.
    #[error(
        "the binlog row of `{table}` at {position} lacks columns {} in its {image} image: the writing session used binlog_row_image = MINIMAL or NOBLOB (preflight sees only the global setting), and a partial row is never published as a full one. Fix: make every writer log FULL images (remove the session override; SET GLOBAL binlog_row_image = FULL), then re-snapshot once (snapshot_mode = \"always\") to step past this event", .missing.join(", ")
    )]
    PartialRowImage {
        /// Table.
        table: String,
        /// `before` or `after`.
        image: &'static str,
        /// The absent columns.
        missing: Vec<String>,
        /// Where (its transaction's start).
        position: BinlogPosition,
    },
    /// A partial JSON update whose before image is partial: the value its diff applies to is
    /// not in the binlog.
    #[error(
        "a partial JSON update of `{table}` at {position} comes with a partial before image: the writing session used binlog_row_value_options = PARTIAL_JSON with binlog_row_image = MINIMAL or NOBLOB, so the JSON value the update applies to is not in the binlog and the full row cannot be known. Fix: binlog_row_image = FULL for every writer (ecst applies PARTIAL_JSON diffs to a full before image) or binlog_row_value_options = '', then re-snapshot once (snapshot_mode = \"always\")"
    )]
    PartialJson {
        /// Table.
        table: String,
        /// Where (its transaction's start).
        position: BinlogPosition,
    },
    /// Statement-format DML on a captured table: the binlog holds the statement, not the rows.
    #[error(
        "statement-format DML on `{table}` at {position}: a session wrote with binlog_format = STATEMENT or MIXED, so the binlog holds no rows for it and the change cannot be captured. Fix: binlog_format = ROW for every writer (remove the session override), then re-snapshot once (snapshot_mode = \"always\")"
    )]
    StatementDml {
        /// Table.
        table: String,
        /// Where.
        position: BinlogPosition,
    },
    /// A binlog event ecst does not decode (refused, never skipped).
    #[error("the binlog at {position} holds {what}, which ecst does not decode; fix: {fix}")]
    Unsupported {
        /// What the event is.
        what: String,
        /// How to get past it.
        fix: String,
        /// Where.
        position: BinlogPosition,
    },
    /// The commit of an XA transaction whose prepared part no binlog at hand holds.
    #[error(
        "the binlog at {position} holds the XA COMMIT of {xid}, but its XA PREPARE is in no binlog file at hand (it was prepared before {before}, in a file purged since or not given), so whether it changed captured tables cannot be known; fix: re-snapshot (snapshot_mode = \"always\" once) so the copies match the tables again"
    )]
    XaPrepareMissing {
        /// The transaction's serialized xid.
        xid: String,
        /// Where the search ended.
        before: BinlogPosition,
        /// The commit.
        position: BinlogPosition,
    },
    /// The stored position lies inside a transaction that was split across Kafka transactions,
    /// and the transaction found there is not that one.
    #[error(
        "the stored position is inside the source transaction {expected} that starts at {position} (it was split across Kafka transactions), but the binlog there holds {found}: its remaining rows cannot be told apart from the ones already published. Fix: re-snapshot (`ecst offsets reset --source resnapshot --yes` while the source is stopped, or snapshot_mode = \"always\" once)"
    )]
    SplitMismatch {
        /// Where the split transaction starts.
        position: BinlogPosition,
        /// The transaction stored (its GTID and rows).
        expected: String,
        /// What was found instead.
        found: String,
    },
    /// A compressed transaction (TRANSACTION_PAYLOAD) that cannot be read.
    #[error("the compressed transaction at {position} cannot be read: {detail}")]
    Payload {
        /// Where (the payload event's end).
        position: BinlogPosition,
        /// What failed.
        detail: String,
    },
    /// A MariaDB compressed event (`log_bin_compress`) that cannot be read.
    #[error(
        "the MariaDB compressed binlog event at {position} cannot be read: {detail}. Fix: SET GLOBAL log_bin_compress = OFF for the events to come, then re-snapshot (snapshot_mode = \"always\" once) to step past this one"
    )]
    Compressed {
        /// Where (the event's end).
        position: BinlogPosition,
        /// What is wrong with it.
        detail: String,
    },
    /// `source.message_key_columns` does not fit the table.
    #[error("source.message_key_columns of `{table}`: {detail}")]
    MessageKey {
        /// The table.
        table: String,
        /// What does not fit, and the fix.
        detail: String,
    },
    /// A configured table does not exist.
    #[error("table `{table}` does not exist or is not readable")]
    TableNotFound {
        /// Table.
        table: String,
    },
    /// MySQL's global read lock for the snapshot's position could not be taken in time.
    #[error(
        "snapshot: FLUSH TABLES WITH READ LOCK not granted within {seconds} s ({detail}); a long-running query or lock holds it. The snapshot retries; raise source.snapshot_lock_wait_s, or end the blocking query (SHOW PROCESSLIST)"
    )]
    SnapshotLock {
        /// The bound waited.
        seconds: u64,
        /// The server's answer.
        detail: String,
    },
    /// The server reported no binlog position (binary logging off?).
    #[error("the server reports no binlog position: is log_bin enabled?")]
    NoBinlogPosition,
    /// Preflight failures, all of them.
    #[error("preflight failed:\n{}", .0.iter().map(|c| format!("  - {}: {}", c.name, c.detail)).collect::<Vec<_>>().join("\n"))]
    Preflight(Vec<preflight::Check>),
    /// The stored position is gone and the snapshot mode does not allow a new snapshot.
    #[error(
        "stored position {position} was purged from the server; set source.snapshot_mode = \"when_needed\" to re-snapshot, or reset the offsets topic"
    )]
    Purged {
        /// The stored position.
        position: BinlogPosition,
    },
    /// The stored position was written by another server and the snapshot mode does not allow a
    /// new snapshot.
    #[error(
        "the stored position {position} was written by another server ({why}): a failover, a restore or mysql.host pointed elsewhere. Its byte offsets mean nothing on this server; set source.snapshot_mode = \"when_needed\" to re-snapshot in a new epoch (copies keep updating), or point mysql.host back"
    )]
    ForeignPosition {
        /// The stored position.
        position: BinlogPosition,
        /// Which identity differs.
        why: String,
    },
    /// The registry refused a new schema version.
    #[error(
        "schema change of `{table}` refused by the registry ({columns}); the source stopped before that change, nothing after it is lost. Under the registry's default BACKWARD compatibility a new NOT NULL column needs a constant DEFAULT (numbers, booleans, strings; not an expression or a temporal value). Fix: give the column such a default or make it NULL, or relax the subject's compatibility. Registry: {detail}"
    )]
    SchemaRefused {
        /// Table.
        table: String,
        /// Column-level summary of the change.
        columns: String,
        /// Registry message.
        detail: String,
    },
    /// MySQL refused the login of a user whose password is in the config (ERROR 1045 or 1698).
    #[error(
        "mysql refused the login of `{user}` (ERROR {code}: {detail}); {plugin}. Fix: check mysql.user and mysql.password against that account, and that its plugin is one ecst speaks (mysql_native_password, caching_sha2_password, ed25519, parsec, or mysql_clear_password over TLS)"
    )]
    AuthRefused {
        /// The user.
        user: String,
        /// The server's error code.
        code: u16,
        /// The server's message.
        detail: String,
        /// What is known of the plugin (`source::auth`).
        plugin: String,
    },
    /// MySQL refused the password read from `mysql.password_file` (ERROR 1045).
    #[error(
        "mysql refused the password of `{user}` read from `{file}` (ERROR 1045: {detail}); if it is being rotated, ecst retries, reading the file again each time, until the file holds the password the server takes. Fix: write the current password to the file"
    )]
    PasswordRefused {
        /// MySQL user.
        user: String,
        /// The password file.
        file: String,
        /// The server's message.
        detail: String,
    },
    /// A change whose Kafka record is larger than ecst produces (`kafka::MAX_MESSAGE_BYTES`).
    #[error(
        "a change on topic `{topic}` is {bytes} bytes as a Kafka record (key, before and after images), more than the {limit} bytes ecst produces; the source stopped before it, nothing after it is lost. Fix: keep values this large out of the captured table (store them elsewhere and keep a reference in the row), or remove the table from source.tables"
    )]
    RecordTooLarge {
        /// Topic of the change.
        topic: String,
        /// Record size (key + value).
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// Registry errors other than refusal.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// Avro encoding failed.
    #[error(transparent)]
    Avro(#[from] AvroError),
    /// Kafka errors.
    #[error(transparent)]
    Kafka(#[from] KafkaClientError),
    /// The stored offset could not be read.
    #[error("offsets topic `{topic}`: {detail}")]
    Offsets {
        /// Topic.
        topic: String,
        /// Detail.
        detail: String,
    },
    /// The signals topic (`ecst snapshot`) could not be read or written.
    #[error("signals topic `{topic}`: {detail}")]
    Signals {
        /// Topic.
        topic: String,
        /// Detail.
        detail: String,
    },
    /// An online snapshot was asked of a table the source does not capture.
    #[error(
        "`{table}` is not captured by this source (source.tables: {tables}): add it to source.tables (a table added there is snapshotted online at the next start)"
    )]
    NotCaptured {
        /// The table asked for.
        table: String,
        /// The captured tables.
        tables: String,
    },
    /// An online snapshot needs what this server cannot give.
    #[error(
        "online snapshot of `{table}`: {why}. Fix: re-snapshot the table at the next start instead (`ecst offsets reset --source resnapshot-table:{table} --yes` while the source is stopped)"
    )]
    OnlineUnsupported {
        /// The table.
        table: String,
        /// Why.
        why: String,
    },
    /// The online snapshot's watermark could not be written (`source::watermark`).
    #[error(
        "the online snapshot cannot write its watermark to `{table}` ({detail}). Fix: create the table (`{create};`) and grant ecst's user INSERT and UPDATE on it (on a read-only server, unset source.watermark_table)"
    )]
    WatermarkWrite {
        /// `source.watermark_table`.
        table: String,
        /// The server's error.
        detail: String,
        /// The statement that creates it.
        create: String,
    },
    /// The stream read past the binlog's end as it stood after a high watermark was written,
    /// and the watermark was not in it.
    #[error(
        "the online snapshot's watermark written to `{table}` never appeared in the binlog stream (read with nothing open up to {end}): the server does not log writes to that table. Fix: check binlog filters (binlog_do_db / binlog_ignore_db) and that the table is InnoDB, or choose a watermark table in a logged database"
    )]
    WatermarkUnseen {
        /// `source.watermark_table`.
        table: String,
        /// The binlog's end after the write.
        end: BinlogPosition,
    },
    /// A snapshot unit that cannot be checkpointed outgrew the transaction timeout.
    #[error(
        "the snapshot has kept one Kafka transaction open for {open_s} s, 3/4 of source.transaction_timeout_ms ({timeout_ms} ms), with no point to commit at: {tables} cannot be checkpointed (a table without a primary key, or on MySQL with locks a key with a text column, is read in one transaction), and past the timeout the broker would abort it and the snapshot would read it again, for ever. Fix: raise source.transaction_timeout_ms (up to the broker's transaction.max.timeout.ms), or give the table a primary key (read and checkpointed chunk by chunk), or on MySQL set source.watermark_table (text keys are then read online)"
    )]
    SnapshotUnitTooLong {
        /// The tables with changes in the transaction.
        tables: String,
        /// Seconds it has been open.
        open_s: u64,
        /// `source.transaction_timeout_ms`.
        timeout_ms: u64,
    },
    /// Watermarks need commits in binlog order (`source::watermark`).
    #[error(
        "source.watermark_table is set, but the server has binlog_order_commits = OFF: transactions may commit in another order than the binlog's, and a chunk placed by watermarks could then miss a change. Fix: SET GLOBAL binlog_order_commits = ON (the default), or unset source.watermark_table"
    )]
    CommitOrder,
    /// `source.snapshot_locking = "online"` cannot run here.
    #[error("source.snapshot_locking = \"online\": {why}")]
    OnlineLocking {
        /// Why, and the fix.
        why: String,
    },
    /// The reader task ended because the producer side went away (shutdown or error).
    #[error("internal channel closed")]
    ChannelClosed,
    /// A task panicked or was cancelled.
    #[error("source task failed: {0}")]
    Task(String),
}

impl From<KafkaError> for SourceError {
    fn from(e: KafkaError) -> Self {
        SourceError::Kafka(KafkaClientError::Broker(e))
    }
}

impl SourceError {
    /// Whether the message already says how to fix the cause (`ecst check` then adds no
    /// generic fix of its own).
    pub fn names_its_fix(&self) -> bool {
        self.to_string().to_lowercase().contains("fix:")
    }
}

impl Classify for SourceError {
    fn class(&self) -> ErrorClass {
        use SourceError as E;
        match self {
            E::Mysql(e) => match e {
                mysql_async::Error::Server(s)
                    if matches!(s.code, 1045 | 1044 | 1142 | 1227 | 1236 | 4052) =>
                {
                    ErrorClass::Definite
                }
                // A certificate the CA does not vouch for, a bad CA file: retrying cannot help.
                mysql_async::Error::Io(mysql_async::IoError::Tls(_)) => ErrorClass::Definite,
                mysql_async::Error::Io(mysql_async::IoError::Io(io))
                    if io
                        .get_ref()
                        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some()) =>
                {
                    ErrorClass::Definite
                }
                _ => ErrorClass::Transient,
            },
            E::ConnectTimeout { .. }
            | E::PasswordRefused { .. }
            | E::Stalled { .. }
            | E::StreamEnded
            | E::Checksum { .. }
            | E::ChannelClosed
            | E::SnapshotLock { .. }
            | E::Offsets { .. }
            | E::Signals { .. } => ErrorClass::Transient,
            E::Registry(e) => e.class(),
            E::Kafka(e) => e.class(),
            E::TableMap { .. }
            | E::MissingRowMetadata { .. }
            | E::UnsupportedType { .. }
            | E::ValueType { .. }
            | E::RowDecode { .. }
            | E::PartialRowImage { .. }
            | E::PartialJson { .. }
            | E::StatementDml { .. }
            | E::Unsupported { .. }
            | E::XaPrepareMissing { .. }
            | E::AuthRefused { .. }
            | E::SplitMismatch { .. }
            | E::Payload { .. }
            | E::Compressed { .. }
            | E::MessageKey { .. }
            | E::TableNotFound { .. }
            | E::NotCaptured { .. }
            | E::OnlineUnsupported { .. }
            | E::WatermarkWrite { .. }
            | E::WatermarkUnseen { .. }
            | E::OnlineLocking { .. }
            | E::CommitOrder
            | E::SnapshotUnitTooLong { .. }
            | E::NoBinlogPosition
            | E::Preflight(_)
            | E::Purged { .. }
            | E::ForeignPosition { .. }
            | E::SchemaRefused { .. }
            | E::RecordTooLarge { .. }
            | E::Avro(_)
            | E::Task(_) => ErrorClass::Definite,
        }
    }

    fn kind(&self) -> String {
        use SourceError as E;
        match self {
            E::Mysql(mysql_async::Error::Server(s)) => format!("mysql_{}", s.code),
            E::Mysql(mysql_async::Error::Io(_)) => "mysql_io".into(),
            E::Mysql(_) => "mysql".into(),
            E::ConnectTimeout { .. } => "mysql_connect_timeout".into(),
            E::PasswordRefused { .. } => "mysql_1045".into(),
            E::AuthRefused { code, .. } => format!("mysql_{code}"),
            E::Stalled { .. } => "binlog_stalled".into(),
            E::StreamEnded => "binlog_ended".into(),
            E::Checksum { .. } => "binlog_checksum".into(),
            E::SnapshotLock { .. } => "snapshot_lock".into(),
            E::Registry(_) => "registry".into(),
            E::Kafka(_) => "kafka".into(),
            E::Offsets { .. } => "offsets_topic".into(),
            E::Signals { .. } => "signals_topic".into(),
            E::ChannelClosed => "channel_closed".into(),
            E::RecordTooLarge { .. } => "record_too_large".into(),
            _ => "source".into(),
        }
    }

    fn hint(&self) -> &'static str {
        use SourceError as E;
        match self {
            E::PasswordRefused { .. } => {
                "mysql.password_file (it must hold the password MySQL takes now)"
            }
            E::Mysql(_) | E::ConnectTimeout { .. } | E::Stalled { .. } | E::StreamEnded => {
                "that MySQL at mysql.host:mysql.port is up and reachable, accepts the ecst user (grants, max_connections), and that no network device drops idle connections"
            }
            E::SnapshotLock { .. } => {
                "long-running queries or LOCK TABLES sessions on MySQL (SHOW PROCESSLIST)"
            }
            E::Registry(_) => "that the schema registry at schema_registry.url is up",
            E::Kafka(_) | E::Offsets { .. } | E::Signals { .. } => {
                "that the Kafka brokers in kafka.bootstrap_servers are up and the offsets topic is available"
            }
            _ => "the error above",
        }
    }
}
