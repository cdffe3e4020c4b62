//! ecst: Event-Carried State Transfer by change data capture.
//!
//! The source half reads a MySQL/MariaDB binlog and writes Avro change events to Kafka (schemas in
//! a Confluent-compatible registry); the sink half applies them to copies embedded in MongoDB
//! documents. See README.md for the design.

pub mod app;
pub mod check;
pub mod config;
pub mod error;
pub mod events;
pub mod failpoint;
pub mod gtid;
pub mod inspect;
pub mod kafka;
pub mod metrics;
pub mod offsets;
pub mod positions;
pub mod presence;
pub mod reconcile;
pub mod retry;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod status;
pub mod top;
