//! How many predictions (and OpenAI generations) one client may have queued or running
//! at once (`--max-queued-per-client`), so no one client fills the engine's queue. A
//! client is the API token it sent (its digest), or its address on a server without
//! tokens (or before authentication decides). Past the cap a create is a 429 with
//! `Retry-After` naming the limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::http::ClientAddr;
use crate::AppState;

/// Whom a request counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Client(String);

impl Client {
    pub fn of(state: &AppState, headers: &HeaderMap, addr: Option<&ClientAddr>) -> Self {
        if !state.auth.is_open() {
            if let Some(token) = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("Token "))
                })
            {
                let d = Sha256::digest(token.trim().as_bytes());
                let hex: String = d[..8].iter().map(|b| format!("{b:02x}")).collect();
                return Client(format!("token:{hex}"));
            }
        }
        match addr {
            // An IPv6 /64 is one client, as for the connection cap.
            Some(a) => Client(format!("addr:{}", crate::http::client_of(a.0.ip()))),
            None => Client("addr:unknown".into()),
        }
    }
}

impl FromRequestParts<Arc<AppState>> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        Ok(Client::of(
            state,
            &parts.headers,
            parts.extensions.get::<ClientAddr>(),
        ))
    }
}

/// A client at its cap: the message, for each API's 429 (with `Retry-After: 1`).
#[derive(Debug)]
pub struct Exceeded(pub String);

impl From<Exceeded> for ApiError {
    fn from(e: Exceeded) -> Self {
        ApiError::Problem {
            status: StatusCode::TOO_MANY_REQUESTS,
            title: "Too many requests",
            detail: e.0,
            retry_after: Some(1),
            fields: Vec::new(),
        }
    }
}

/// Every client's count of work queued or running.
pub struct Quotas {
    cap: usize,
    counts: Mutex<HashMap<Client, usize>>,
}

/// One unit of a client's quota, given back when dropped (the work ended).
pub struct Slot {
    quotas: Arc<Quotas>,
    client: Client,
}

impl Quotas {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `client`, or why not (a 429 that names the limit).
    pub fn take(self: &Arc<Self>, client: &Client) -> Result<Slot, Exceeded> {
        let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(client.clone()).or_insert(0);
        if *n >= self.cap {
            return Err(Exceeded(format!(
                "this client already has {} predictions queued or running, the most one \
                 client may have (--max-queued-per-client {}); retry when one ends",
                *n, self.cap
            )));
        }
        *n += 1;
        Ok(Slot {
            quotas: self.clone(),
            client: client.clone(),
        })
    }

    /// Work queued or running for `client`.
    pub fn count(&self, client: &Client) -> usize {
        self.counts
            .lock()
            .map(|m| m.get(client).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.quotas.counts.lock() {
            if let Some(n) = m.get_mut(&self.client) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.client);
                }
            }
        }
    }
}
