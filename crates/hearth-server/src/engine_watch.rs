//! A DEFUNCT engine ends the process. hearth-runtime's supervisor makes an engine
//! DEFUNCT when it cannot recover from its faults (a CUDA error, a failed rebuild,
//! faults that keep coming) and fails everything it was running. The server then keeps
//! answering for `DEFUNCT_HOLD` (`/health` 503 with DEFUNCT in its detail,
//! `/health-check` DEFUNCT, new predictions 503) so probes and load balancers see it,
//! shuts down as on SIGTERM (the failed predictions' rows and webhooks go out), and
//! `serve` returns `ServerError::EngineDefunct`: the process exits non-zero and its
//! supervisor (systemd, Kubernetes, Docker's restart policy) starts a fresh one.

use std::sync::Arc;
use std::time::Duration;

use crate::AppState;

/// How long a server with a DEFUNCT engine keeps answering before it shuts down.
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
    tracing::error!(%reason, hold_s = DEFUNCT_HOLD.as_secs(), "an engine is DEFUNCT: shutting down so the process is restarted");
    tokio::time::sleep(DEFUNCT_HOLD).await;
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
