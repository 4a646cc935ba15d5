//! Startup as Cog reports it: the server listens before its models load, says
//! `STARTING` on `/health-check` meanwhile (Cog's routes and the `/v1` routes answer
//! 503), then `READY`, or `SETUP_FAILED` with the setup logs and the error, and keeps
//! answering so an orchestrator can read why (unless told to exit).
//!
//! One front router takes every request: while starting it goes to the startup
//! router (`routes::startup`, built from the same route table, so access rules hold);
//! once the models are loaded, to the real one. Connections opened during startup
//! see the real server as soon as it is up. The store opens (and this replica joins
//! it) while the models load, so a store that cannot be used fails setup at once.

use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::record::now_rfc3339;
use crate::{ServedModel, ServerConfig, ServerError};

/// How setup went, as `/health-check`'s `setup` block shows it.
#[derive(Debug, Clone)]
pub struct SetupReport {
    pub started_at: String,
    /// None while starting.
    pub completed_at: Option<String>,
    /// `starting`, `succeeded` or `failed`.
    pub status: &'static str,
    pub logs: String,
}

impl SetupReport {
    /// A setup that took no time (a server built from models loaded already).
    pub fn instant() -> Self {
        let now = now_rfc3339();
        Self {
            started_at: now.clone(),
            completed_at: Some(now),
            status: "succeeded",
            logs: String::new(),
        }
    }

    /// `/health-check`'s body with `status` (`READY`, `BUSY`, ...).
    pub fn health(&self, status: &str) -> Value {
        let mut setup = json!({"started_at": self.started_at, "status": self.status});
        if let Some(c) = &self.completed_at {
            setup["completed_at"] = json!(c);
            setup["logs"] = json!(self.logs);
        }
        json!({"status": status, "setup": setup, "version": version()})
    }
}

/// Which Cog API version hearth speaks, and hearth's own (no Python runs here, so
/// Cog's `python` and `python_sdk` have no value to report).
pub fn version() -> Value {
    json!({"coglet": crate::schema::COG_VERSION, "hearth": env!("CARGO_PKG_VERSION")})
}

/// Where the loader writes what it is doing: the setup logs.
#[derive(Clone, Default)]
pub struct SetupLog(Arc<Mutex<String>>);

impl SetupLog {
    pub fn line(&self, line: impl AsRef<str>) {
        tracing::info!("setup: {}", line.as_ref());
        if let Ok(mut l) = self.0.lock() {
            l.push_str(line.as_ref());
            l.push('\n');
        }
    }

    fn text(&self) -> String {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// The server while it starts: what the startup router reads.
pub struct Gate {
    pub cfg: ServerConfig,
    pub auth: crate::auth::Auth,
    started_at: String,
    log: SetupLog,
    /// Set when setup failed: the report to show.
    failed: Mutex<Option<SetupReport>>,
    /// The real router, once the models are loaded.
    app: OnceLock<Router>,
    /// Cancelled by `POST /shutdown` while starting.
    pub stop: CancellationToken,
}

impl Gate {
    fn new(cfg: ServerConfig) -> Self {
        Self {
            auth: crate::auth::Auth::new(&cfg.api_tokens),
            cfg,
            started_at: now_rfc3339(),
            log: SetupLog::default(),
            failed: Mutex::new(None),
            app: OnceLock::new(),
            stop: CancellationToken::new(),
        }
    }

    /// The report now: starting, or failed.
    pub fn report(&self) -> SetupReport {
        if let Some(f) = self.failed.lock().ok().and_then(|f| f.clone()) {
            return f;
        }
        SetupReport {
            started_at: self.started_at.clone(),
            completed_at: None,
            status: "starting",
            logs: self.log.text(),
        }
    }

    pub fn has_failed(&self) -> bool {
        self.failed.lock().map(|f| f.is_some()).unwrap_or(true)
    }

    fn finish(&self, error: Option<&str>) -> SetupReport {
        let mut logs = self.log.text();
        if let Some(e) = error {
            logs.push_str(e);
            logs.push('\n');
        }
        SetupReport {
            started_at: self.started_at.clone(),
            completed_at: Some(now_rfc3339()),
            status: if error.is_some() {
                "failed"
            } else {
                "succeeded"
            },
            logs,
        }
    }
}

/// Every request: to the real router once there is one, else the startup router.
async fn dispatch(State((gate, starting)): State<(Arc<Gate>, Router)>, req: Request) -> Response {
    let router = gate.app.get().cloned().unwrap_or(starting);
    match router.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
    .into_response()
}

/// Binds `cfg.addr`, then as `serve_after_setup`.
pub async fn serve_with_setup<F>(
    cfg: ServerConfig,
    exit_on_failure: bool,
    load: F,
) -> Result<(), ServerError>
where
    F: FnOnce(SetupLog) -> Result<Vec<ServedModel>, String> + Send + 'static,
{
    let addr = cfg.addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ServerError::Bind { addr, source: e })?;
    serve_after_setup(cfg, listener, exit_on_failure, load).await
}

/// Listens on `listener` at once and serves the startup state while `load` (on its
/// own thread) loads the models; then serves them as `serve_on` does. When setup
/// fails: with `exit_on_failure` the error is returned, else `/health-check` says
/// `SETUP_FAILED` until SIGTERM or `POST /shutdown`.
pub async fn serve_after_setup<F>(
    cfg: ServerConfig,
    listener: tokio::net::TcpListener,
    exit_on_failure: bool,
    load: F,
) -> Result<(), ServerError>
where
    F: FnOnce(SetupLog) -> Result<Vec<ServedModel>, String> + Send + 'static,
{
    cfg.check()?;
    crate::announce(&listener)?;
    let gate = Arc::new(Gate::new(cfg.clone()));
    let starting = crate::routes::startup::router(gate.clone());
    let front = Router::new()
        .fallback(dispatch)
        .with_state((gate.clone(), starting));
    let accept_stop = CancellationToken::new();
    let accept = crate::spawn_accept(listener, front, cfg.clone(), accept_stop.clone());
    // Loading can take minutes and cannot be interrupted: a thread of its own, which
    // a stop during setup leaves behind (the process is about to end).
    let (tx, rx) = tokio::sync::oneshot::channel();
    let log = gate.log.clone();
    let spawned = std::thread::Builder::new()
        .name("hearth-setup".into())
        .spawn(move || {
            let _ = tx.send(load(log));
        });
    // The store opens while the models load: one that cannot be used (a damaged or
    // locked file, an unreachable PostgreSQL) fails setup at once, not after minutes.
    let loaded = match spawned {
        Err(e) => Err(format!("cannot start the model loader: {e}")),
        Ok(_) => {
            let backing = tokio::select! {
                b = crate::open_backing(&cfg) => b.map_err(|e| e.to_string()),
                _ = crate::shutdown_signal() => return stop_accepting(accept, accept_stop).await,
                _ = gate.stop.cancelled() => return stop_accepting(accept, accept_stop).await,
            };
            match backing {
                Err(e) => Err(e),
                Ok(backing) => {
                    let models = tokio::select! {
                        r = rx => r.unwrap_or_else(|_| Err("the model loader stopped without an answer".into())),
                        _ = crate::shutdown_signal() => return retire_and_stop(backing, accept, accept_stop).await,
                        _ = gate.stop.cancelled() => return retire_and_stop(backing, accept, accept_stop).await,
                    };
                    match models {
                        Ok(models) => Ok((models, backing)),
                        Err(e) => {
                            retire(&backing).await;
                            Err(e)
                        }
                    }
                }
            }
        }
    };
    let built = match loaded {
        Ok((models, backing)) => {
            let report = gate.finish(None);
            crate::build_state_on(cfg, models, report, backing)
                .await
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e),
    };
    let state = match built {
        Ok(state) => state,
        Err(e) => {
            tracing::error!(error = %e, "setup failed");
            let report = gate.finish(Some(&e));
            if let Ok(mut f) = gate.failed.lock() {
                *f = Some(report);
            }
            if !exit_on_failure {
                eprintln!("hearth: setup failed (see /health-check): {e}");
                tokio::select! {
                    _ = crate::shutdown_signal() => {}
                    _ = gate.stop.cancelled() => {}
                }
            }
            stop_accepting(accept, accept_stop).await?;
            return if exit_on_failure {
                Err(ServerError::Setup(e))
            } else {
                Ok(())
            };
        }
    };
    let app = crate::routes::router(state.clone());
    let _ = gate.app.set(app);
    tracing::info!("setup done: serving");
    crate::serve_until_stopped(state, accept, accept_stop).await
}

/// Ends this replica's lease in the store (setup did not finish: it owns nothing).
async fn retire(backing: &crate::Backing) {
    if let Err(e) = backing.store.retire().await {
        tracing::warn!(error = %e, "could not end this replica's lease");
    }
}

async fn retire_and_stop(
    backing: crate::Backing,
    accept: tokio::task::JoinHandle<crate::http::Connections>,
    accept_stop: CancellationToken,
) -> Result<(), ServerError> {
    retire(&backing).await;
    stop_accepting(accept, accept_stop).await
}

/// Stops the accept loop and gives open connections a moment to finish.
async fn stop_accepting(
    accept: tokio::task::JoinHandle<crate::http::Connections>,
    accept_stop: CancellationToken,
) -> Result<(), ServerError> {
    accept_stop.cancel();
    if let Ok(connections) = accept.await {
        let _ = tokio::time::timeout(crate::CLOSE_GRACE, connections.shutdown()).await;
    }
    Ok(())
}
