//! A DEFUNCT engine ends the process. hearth-runtime's supervisor makes an engine
//! DEFUNCT when it cannot recover from its faults (a CUDA error, a failed rebuild,
//! faults that keep coming) and fails everything it was running. The server then keeps
//! answering for `defunct_hold` (`--defunct-hold`, default `DEFUNCT_HOLD`; `/health`
//! 503 with DEFUNCT in its detail,
//! `/health-check` DEFUNCT, new predictions 503) so probes and load balancers see it,
//! shuts down as on SIGTERM (the failed predictions' rows and webhooks go out), and
//! `serve` returns `ServerError::EngineDefunct`: the process exits non-zero and its
//! supervisor (systemd, Kubernetes, Docker's restart policy) starts a fresh one.

use std::sync::Arc;
use std::time::Duration;

use crate::AppState;

/// How long a server with a DEFUNCT engine keeps answering before it shuts down,
/// unless `ServerConfig::defunct_hold` says otherwise: long enough for a load
/// balancer's health check every second or two to see it.
pub const DEFUNCT_HOLD: Duration = Duration::from_secs(3);

/// Waits for any engine to become DEFUNCT, then stops the server after the hold.
pub(crate) async fn stop_when_defunct(state: Arc<AppState>) {
    let waits: Vec<_> = state
        .models
        .all()
        .iter()
        .map(|m| {
            let (name, engine) = (m.full_name(), m.engine.clone());
            Box::pin(async move { format!("{name}: {}", engine.defunct().await) })
        })
        .collect();
    if waits.is_empty() {
        return;
    }
    let (reason, _, _) = futures_util::future::select_all(waits).await;
    let hold = state.cfg.defunct_hold;
    tracing::error!(%reason, hold_s = hold.as_secs_f64(), "an engine is DEFUNCT: shutting down so the process is restarted");
    tokio::time::sleep(hold).await;
    state.stop.cancel();
}

/// The first DEFUNCT engine's model and reason, if any.
pub fn defunct_reason(state: &AppState) -> Option<String> {
    state.models.all().iter().find_map(|m| {
        m.engine
            .defunct_reason()
            .map(|r| format!("{}: {r}", m.full_name()))
    })
}
