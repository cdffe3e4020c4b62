//! Integration tests on the real stack (`dev/stack up`). One binary, modules per behaviour.

mod common;
mod ops;
mod security;
mod sink;
mod smoke;
mod source;
