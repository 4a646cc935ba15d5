//! What the binary's process tests share.
#![allow(dead_code)]

pub mod fault_proxy;
pub mod procs;
