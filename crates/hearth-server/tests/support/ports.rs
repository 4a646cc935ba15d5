//! Ports for the servers a test must tell their port before they start (PostgreSQL,
//! Cog). A port picked free here and bound there a moment later can be taken
//! meanwhile (by another test's server binding port 0, which may be handed the same
//! one), so a start that fails because its port is in use is tried again on another.
//! A server that can bind port 0 and say which port it got (`hearth serve`, axum in
//! process) does that instead, and needs none of this. The one copy for the Rust
//! tests of both crates (crates/hearth includes it by path); the scripts have theirs
//! in scripts/lib/ports.sh and scripts/cog_diff/diff.py.
#![allow(dead_code)]

use std::future::Future;

/// How many picked ports one start tries before it gives up.
pub const ATTEMPTS: usize = 8;

/// A port nothing listens on now (none is held: the server binds it later).
pub fn pick() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// Whether a server's error output says its port was taken (Rust's and libc's
/// wording, PostgreSQL's, Python's).
pub fn in_use(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("address already in use") || t.contains("os error 98") || t.contains("eaddrinuse")
}

/// `start` on a picked port; again on another while its error (`Err`, the server's
/// output) says the port was in use; any other error at once.
pub fn with_free_port<T>(mut start: impl FnMut(u16) -> Result<T, String>) -> Result<T, String> {
    let mut last = String::new();
    for _ in 0..ATTEMPTS {
        match start(pick()) {
            Ok(t) => return Ok(t),
            Err(e) if in_use(&e) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(format!(
        "{ATTEMPTS} picked ports were taken before the server bound them; the last said: {last}"
    ))
}

/// `with_free_port` for a start that is awaited.
pub async fn with_free_port_async<T, F, Fut>(mut start: F) -> Result<T, String>
where
    F: FnMut(u16) -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let mut last = String::new();
    for _ in 0..ATTEMPTS {
        match start(pick()).await {
            Ok(t) => return Ok(t),
            Err(e) if in_use(&e) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(format!(
        "{ATTEMPTS} picked ports were taken before the server bound them; the last said: {last}"
    ))
}
