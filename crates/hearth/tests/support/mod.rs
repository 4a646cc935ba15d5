//! What the binary's process tests share.
#![allow(dead_code)]

pub mod fault_proxy;
#[path = "../../../hearth-server/tests/support/ports.rs"]
pub mod ports;
pub mod procs;
