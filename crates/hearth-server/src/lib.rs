//! hearth's HTTP front: Replicate's API (`/v1/...`, SSE streams, webhooks,
//! `Prefer: wait`) and Cog's container API over the runtime's engines. It holds no
//! tensor code: it validates inputs, turns text into engine requests through the
//! model's tokenizer, and turns engine events into predictions.

pub mod auth;
pub mod client_quota;
pub mod cog_shape;
pub mod config;
pub mod constraint_input;
pub mod engine_watch;
pub mod error;
pub mod go_duration;
pub mod http;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod ops_history;
pub mod ops_sides;
pub mod prediction;
pub mod record;
pub mod replicas;
pub mod routes;
pub mod schema;
pub mod service;
pub mod startup;
pub mod store;
pub mod upstream;
pub mod webhook;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use config::ServerConfig;
pub use models::{ModelCard, ModelRegistry, ServedModel, VersionInputs};

pub struct AppState {
    pub cfg: ServerConfig,
    pub auth: auth::Auth,
    pub models: ModelRegistry,
    pub store: store::SharedStore,
    pub hub: Arc<prediction::Hub>,
    pub webhooks: Arc<webhook::Webhooks>,
    pub metrics: HashMap<String, Arc<metrics::Metrics>>,
    pub http_metrics: metrics::Metrics,
    /// Cancelled to shut down (a signal or Cog's `POST /shutdown`).
    pub stop: CancellationToken,
    draining: AtomicBool,
    pub started_at: String,
    /// How setup went: `/health-check`'s `setup` block.
    pub setup: startup::SetupReport,
    /// Cog's prediction slots (`--cog-max-concurrency`).
    pub cog_slots: Arc<tokio::sync::Semaphore>,
    /// Work queued or running per client (`--max-queued-per-client`).
    pub quotas: Arc<client_quota::Quotas>,
    /// The last minutes of each model's gauges and rates, for the console.
    pub ops: ops_history::OpsHistory,
    /// Upstreams and model routes.
    pub upstream: Arc<upstream::Hybrid>,
    /// Upstream predictions an earlier process left in flight, resumed once serving.
    resume: std::sync::Mutex<Vec<replicas::Resumable>>,
}

impl AppState {
    /// Shutting down: no new predictions.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn model_metrics(&self, name: &str) -> Arc<metrics::Metrics> {
        self.metrics
            .get(name)
            .cloned()
            .unwrap_or_else(|| Arc::new(metrics::Metrics::new(name.to_string())))
    }
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
    #[error(transparent)]
    Webhooks(#[from] webhook::OpenError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(std::io::Error),
    #[error("setup failed: {0}")]
    Setup(String),
    #[error("an engine is DEFUNCT ({0}); exiting so that the process is restarted")]
    EngineDefunct(String),
}

fn create_private_dir(path: &std::path::Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(path)
}

/// Opens the data dir and the store, registers this replica, and ends what stopped
/// replicas left in flight (with SQLite: everything an earlier process left).
pub async fn build_state(
    cfg: ServerConfig,
    models: Vec<ServedModel>,
) -> Result<Arc<AppState>, ServerError> {
    build_state_after_setup(cfg, models, startup::SetupReport::instant()).await
}

/// As `build_state`, for models whose setup `setup` reports.
pub async fn build_state_after_setup(
    cfg: ServerConfig,
    models: Vec<ServedModel>,
    setup: startup::SetupReport,
) -> Result<Arc<AppState>, ServerError> {
    let backing = open_backing(&cfg).await?;
    build_state_on(cfg, models, setup, backing).await
}

/// What a server keeps outside memory: the store (this replica registered in it) and
/// the webhooks queued there. Opened before the models load (`startup`), so a store
/// that cannot be used says so at once.
pub struct Backing {
    pub store: store::SharedStore,
    pub webhooks: Arc<webhook::Webhooks>,
    /// Upstream predictions left in flight, to resume rather than end.
    pub resume: Vec<replicas::Resumable>,
}

/// Opens the data dir and the store, registers this replica, opens the webhook
/// signer from the store's secret, and ends what stopped replicas left in flight.
pub async fn open_backing(cfg: &ServerConfig) -> Result<Backing, ServerError> {
    cfg.check()?;
    let data_err = |e| ServerError::DataDir {
        path: cfg.data_dir.clone(),
        source: e,
    };
    create_private_dir(&cfg.data_dir).map_err(data_err)?;
    create_private_dir(&cfg.data_dir.join("files")).map_err(data_err)?;
    let spec = cfg
        .store
        .clone()
        .unwrap_or_else(|| store::StoreSpec::Sqlite(cfg.data_dir.join("predictions.sqlite3")));
    let store = store::open(&spec, &cfg.data_dir).await?;
    let swept = routes::files::sweep_temp_files(&cfg.data_dir.join("files"), store.is_shared());
    if swept > 0 {
        tracing::info!(swept, "removed uploads a stopped process left unfinished");
    }
    let opened = async {
        store.heartbeat(cfg.replica_lease).await?;
        let webhooks =
            Arc::new(webhook::Webhooks::open(store.clone(), cfg.webhook_allow_private).await?);
        let orphans = replicas::end_orphans(&store, &webhooks).await?;
        if orphans.ended > 0 {
            tracing::warn!(
                ended = orphans.ended,
                "predictions left in flight by a stopped process were marked failed"
            );
        }
        Ok::<_, ServerError>((webhooks, orphans.resume))
    }
    .await;
    match opened {
        Ok((webhooks, resume)) => {
            tracing::info!(store = %store.describe(), replica = %store.replica_id(), "store open");
            Ok(Backing {
                store,
                webhooks,
                resume,
            })
        }
        Err(e) => {
            let _ = store.retire().await;
            Err(e)
        }
    }
}

/// The server over models and an open store. On an error the store's lease ends.
pub async fn build_state_on(
    cfg: ServerConfig,
    models: Vec<ServedModel>,
    setup: startup::SetupReport,
    backing: Backing,
) -> Result<Arc<AppState>, ServerError> {
    let Backing {
        store,
        webhooks,
        resume,
    } = backing;
    let built = async {
        // The lease may have run out while the models loaded: this replica owns
        // predictions from the next request on.
        store.heartbeat(cfg.replica_lease).await?;
        let registry = ModelRegistry::new(models).map_err(ServerError::Config)?;
        if registry.default_model().is_none() {
            return Err(ServerError::Config("no model to serve".into()));
        }
        for r in &cfg.routes {
            let served = crate::models::split_name(&r.model)
                .ok()
                .and_then(|(o, n)| registry.by_name(&o, &n));
            if let Some(what) = r.route.needs_local_model().filter(|_| served.is_none()) {
                return Err(ServerError::Config(format!(
                    "--route {}={}: that route {what}, and no model called {} is served here (give its weights with --model or a model card)",
                    r.model,
                    r.route.describe(),
                    r.model
                )));
            }
        }
        let hybrid = upstream::Hybrid::new(
            &cfg.upstreams,
            &cfg.routes,
            cfg.upstream_breaker,
            upstream::budget::ByteBudget::new(cfg.upstream_memory_budget),
        )
        .map_err(ServerError::Config)?
        .with_shadow_limits(cfg.shadow_limits);
        Ok((registry, hybrid))
    }
    .await;
    let (registry, hybrid) = match built {
        Ok(r) => r,
        Err(e) => {
            let _ = store.retire().await;
            return Err(e);
        }
    };
    let mut metrics: HashMap<String, Arc<metrics::Metrics>> = registry
        .all()
        .iter()
        .map(|m| {
            (
                m.full_name(),
                Arc::new(metrics::Metrics::new(m.full_name())),
            )
        })
        .collect();
    // Models that run upstream only keep their figures too (the console's operations
    // view); `/metrics` lists the models served here, as before.
    for (model, route) in hybrid.routes() {
        if route.upstream().is_some() && !metrics.contains_key(model) {
            metrics.insert(
                model.clone(),
                Arc::new(metrics::Metrics::new(model.clone())),
            );
        }
    }
    let cfg_slots = cfg.cog_max_concurrency;
    let cfg_quota = cfg.max_queued_per_client;
    let hub = Arc::new(prediction::Hub::default());
    webhooks.render_from(hub.clone());
    Ok(Arc::new(AppState {
        auth: auth::Auth::new(&cfg.api_tokens),
        cfg,
        models: registry,
        store,
        hub,
        webhooks,
        metrics,
        http_metrics: metrics::Metrics::new(String::new()),
        stop: CancellationToken::new(),
        draining: AtomicBool::new(false),
        started_at: record::now_rfc3339(),
        setup,
        cog_slots: Arc::new(tokio::sync::Semaphore::new(cfg_slots)),
        quotas: client_quota::Quotas::new(cfg_quota),
        ops: ops_history::OpsHistory::default(),
        upstream: Arc::new(hybrid),
        resume: std::sync::Mutex::new(resume),
    }))
}

/// After cancelling what is left at shutdown, how long its runners get to finish.
const CANCEL_GRACE: Duration = Duration::from_secs(3);
/// At shutdown, how long connections get to finish their responses once every
/// prediction has ended, and webhooks to go out.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Serves until SIGTERM, Ctrl-C or `POST /shutdown`; then stops accepting, gives
/// predictions in flight `shutdown_timeout` to finish, cancels the rest, ends their
/// streams, sends the webhooks that are due, and returns within the timeout plus a
/// few seconds, whatever clients still hold open.
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
    announce(&listener)?;
    let accept_stop = CancellationToken::new();
    let accept = spawn_accept(
        listener,
        routes::router(state.clone()),
        state.cfg.clone(),
        accept_stop.clone(),
    );
    serve_until_stopped(state, accept, accept_stop).await
}

pub(crate) fn announce(listener: &tokio::net::TcpListener) -> Result<(), ServerError> {
    let local = listener.local_addr().map_err(ServerError::Serve)?;
    tracing::info!(%local, "listening");
    eprintln!("hearth listening on http://{local}");
    Ok(())
}

/// The accept loop as a task, until `stop`: its answer shuts the open connections.
pub(crate) fn spawn_accept(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    cfg: ServerConfig,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<crate::http::Connections> {
    tokio::spawn(async move { http::accept_until(listener, app, &cfg, stop).await })
}

/// Runs the server whose connections `accept` takes until `state.stop`, then shuts
/// down as `serve` says.
pub(crate) async fn serve_until_stopped(
    state: Arc<AppState>,
    accept: tokio::task::JoinHandle<crate::http::Connections>,
    accept_stop: CancellationToken,
) -> Result<(), ServerError> {
    if state.auth.is_open() {
        tracing::warn!("no --api-token given: every request is accepted without authentication");
    }
    let webhook_stop = CancellationToken::new();
    let dispatcher = tokio::spawn(webhook::dispatcher::run(
        state.webhooks.clone(),
        webhook_stop.clone(),
        CLOSE_GRACE,
    ));
    let saver = tokio::spawn(save_unsaved_periodically(state.clone()));
    let replica_stop = CancellationToken::new();
    let left: Vec<replicas::Resumable> = state
        .resume
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    for r in left {
        upstream::create::resume(&state, r.record, r.link).await;
    }
    let replica = tokio::spawn(replicas::run(state.clone(), replica_stop.clone()));
    let watch = tokio::spawn(engine_watch::stop_when_defunct(state.clone()));
    tokio::spawn(ops_history::run(state.clone()));
    let signals = {
        let stop = state.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown_signal() => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        })
    };
    state.stop.cancelled().await;
    accept_stop.cancel();
    let connections = accept
        .await
        .map_err(|e| ServerError::Serve(std::io::Error::other(e)))?;
    tracing::info!("shutting down: no new connections or predictions");
    state.draining.store(true, Ordering::SeqCst);
    drain(&state).await;
    if tokio::time::timeout(CLOSE_GRACE, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("closing connections still open at shutdown");
    }
    webhook_stop.cancel();
    let _ = tokio::time::timeout(CLOSE_GRACE + Duration::from_secs(1), dispatcher).await;
    saver.abort();
    signals.abort();
    watch.abort();
    replica_stop.cancel();
    let _ = replica.await;
    let left = state.hub.save_unsaved(&state.store).await;
    if left > 0 {
        tracing::error!(left, "finished predictions could not be saved at shutdown");
    }
    // Nothing of ours is in flight now: our lease can end (leftovers, if any, become
    // other replicas' to end).
    if let Err(e) = state.store.retire().await {
        tracing::warn!(error = %e, "could not end this replica's lease");
    }
    match engine_watch::defunct_reason(&state) {
        Some(reason) => Err(ServerError::EngineDefunct(reason)),
        None => Ok(()),
    }
}

async fn save_unsaved_periodically(state: Arc<AppState>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        state.hub.save_unsaved(&state.store).await;
    }
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
            // Kept in the store first, whatever its runner is waiting on: one still
            // running upstream at exit is resumed by the next start with this cancel.
            if let Some(id) = l.read(|r| r.prediction.id.clone()) {
                if let Err(e) = state.store.request_cancel(&id).await {
                    tracing::warn!(prediction = %id, error = %e, "could not store a cancel at shutdown");
                }
            }
            l.request_cancel();
        }
        let deadline = tokio::time::Instant::now() + CANCEL_GRACE;
        while !state.hub.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // An upstream may take longer to confirm a cancel than this grace (its runner
        // waits up to 30 s): such a prediction stays in the store as it was, with its
        // cancel recorded there before it was forwarded, and the next start sends the
        // cancel again and follows it to the end the upstream reports.
        let waiting = state
            .hub
            .all()
            .iter()
            .filter(|l| {
                l.read(|r| {
                    r.prediction
                        .hearth
                        .as_ref()
                        .is_some_and(|h| h["side"] == "upstream")
                })
                .unwrap_or(false)
            })
            .count();
        if waiting > 0 {
            tracing::warn!(
                n = waiting,
                "predictions whose upstream has not confirmed their cancel are left to the next start, their cancel recorded"
            );
        }
    }
    // Shadow copies cancel themselves upstream at the stop (a copy left running there
    // bills for nothing): their cancels get the same grace before the process ends.
    let deadline = tokio::time::Instant::now() + CANCEL_GRACE;
    while state.upstream.shadows.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn shutdown_signal() {
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
