//! Integration tests on the real stack (`dev/stack up`). One binary, modules per behaviour.

// Tests may unwrap and panic (the library may not: see Cargo.toml [lints]).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
mod continuity;
mod failures;
pub(crate) mod faults;
mod inspect;
mod online;
mod ops;
mod scale_out;
mod security;
mod sink;
mod smoke;
mod soak;
mod source;
mod views;
