//! hearth's HTTP front: Replicate's API (`/v1/...`, SSE streams, webhooks,
//! `Prefer: wait`) and Cog's container API over the runtime's engines. It holds no
//! tensor code: it validates inputs, turns text into engine requests through the
//! model's tokenizer, and turns engine events into predictions.

pub mod error;
pub mod metrics;
pub mod models;
pub mod prediction;
pub mod routes;
pub mod schema;
pub mod store;
pub mod webhook;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

pub use models::{ModelCard, ModelRegistry, ServedModel, VersionInputs};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Accepted bearer tokens; empty means no authentication.
    pub api_tokens: Vec<String>,
    /// Base of the absolute URLs the server hands out; default `http://{Host}`.
    pub public_url: Option<String>,
    pub max_body_bytes: usize,
    /// How long SIGTERM waits for predictions in flight before cancelling them.
    pub shutdown_timeout: Duration,
}

pub struct AppState {
    pub cfg: ServerConfig,
    pub models: ModelRegistry,
    pub store: Arc<store::Store>,
    pub hub: Arc<prediction::Hub>,
    pub webhooks: Arc<webhook::Webhooks>,
    pub metrics: HashMap<String, Arc<metrics::Metrics>>,
    pub http_metrics: metrics::Metrics,
    pub shutdown: Notify,
    pub started_at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Config(String),
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(std::io::Error),
}

/// Opens the data dir and the store, marks interrupted predictions failed.
pub fn build_state(
    cfg: ServerConfig,
    models: Vec<ServedModel>,
) -> Result<Arc<AppState>, ServerError> {
    std::fs::create_dir_all(cfg.data_dir.join("files")).map_err(|e| ServerError::DataDir {
        path: cfg.data_dir.clone(),
        source: e,
    })?;
    let store = store::Store::open(&cfg.data_dir.join("predictions.sqlite3"))?;
    let interrupted = store.fail_interrupted(&prediction::now_rfc3339())?;
    if interrupted > 0 {
        tracing::warn!(
            interrupted,
            "predictions left in flight by the previous process were marked failed"
        );
    }
    let webhooks = webhook::Webhooks::open(&cfg.data_dir).map_err(|e| ServerError::DataDir {
        path: cfg.data_dir.clone(),
        source: e,
    })?;
    let metrics = models
        .iter()
        .map(|m| {
            (
                m.full_name(),
                Arc::new(metrics::Metrics::new(m.full_name())),
            )
        })
        .collect();
    let registry = ModelRegistry::new(models).map_err(ServerError::Config)?;
    if registry.default_model().is_none() {
        return Err(ServerError::Config("no model to serve".into()));
    }
    Ok(Arc::new(AppState {
        cfg,
        models: registry,
        store: Arc::new(store),
        hub: Arc::new(prediction::Hub::default()),
        webhooks: Arc::new(webhooks),
        metrics,
        http_metrics: metrics::Metrics::new(String::new()),
        shutdown: Notify::new(),
        started_at: prediction::now_rfc3339(),
    }))
}

/// Serves until SIGTERM, Ctrl-C or `POST /shutdown`; then stops accepting, gives
/// predictions in flight `shutdown_timeout` to finish, and cancels the rest.
pub async fn serve(state: Arc<AppState>) -> Result<(), ServerError> {
    let addr = state.cfg.addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ServerError::Bind { addr, source: e })?;
    serve_on(state, listener).await
}

/// As `serve`, on a listener the caller bound (tests bind port 0).
pub async fn serve_on(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
) -> Result<(), ServerError> {
    if state.cfg.api_tokens.is_empty() {
        tracing::warn!("no --api-token given: every request is accepted without authentication");
    }
    let local = listener.local_addr().map_err(ServerError::Serve)?;
    tracing::info!(%local, "listening");
    eprintln!("hearth listening on http://{local}");
    let app = routes::router(state.clone());
    let st = state.clone();
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = st.shutdown.notified() => {}
        }
        tracing::info!("shutting down: no new requests");
    })
    .await
    .map_err(ServerError::Serve)?;
    drain(&state).await;
    Ok(())
}

async fn drain(state: &AppState) {
    let deadline = tokio::time::Instant::now() + state.cfg.shutdown_timeout;
    while !state.hub.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = state.hub.all();
    if !left.is_empty() {
        tracing::warn!(
            n = left.len(),
            "cancelling predictions still running at shutdown"
        );
        for l in &left {
            l.request_cancel();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !state.hub.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
