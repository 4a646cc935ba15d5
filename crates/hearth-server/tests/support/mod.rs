//! The real server in-process, on a free port, with the demo model: what every HTTP
//! test starts from.
#![allow(dead_code)]

pub mod postgres;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hearth_runtime::{EngineConfig, ModelSpec};
use hearth_server::{AppState, ServedModel, ServerConfig};
use serde_json::{json, Value};

pub const TOKEN: &str = "test-token";

pub struct Server {
    pub base: String,
    pub client: reqwest::Client,
    pub state: Arc<AppState>,
    pub task: tokio::task::JoinHandle<Result<(), hearth_server::ServerError>>,
    pub data: TempDir,
}

pub struct TempDir(pub std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "hearth-{tag}-{}-{}",
            std::process::id(),
            hearth_server::record::new_id()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

pub fn engine_default() -> EngineConfig {
    EngineConfig {
        kv_cache_memory: Some(64 << 20),
        max_waiting: 64,
        ..Default::default()
    }
}

pub fn demo_model(engine: EngineConfig) -> ServedModel {
    let spec = ModelSpec::new("demo");
    let loaded = hearth_runtime::load(&spec, &engine).unwrap();
    ServedModel {
        owner: "hearth".into(),
        name: "demo".into(),
        aliases: vec!["meta/meta-llama-3-8b-instruct".into()],
        version: "a".repeat(64),
        version_aliases: vec!["b".repeat(64)],
        description: "demo".into(),
        defaults: hearth_server::schema::default_inputs(),
        engine: loaded.engine,
        created_at: hearth_server::record::now_rfc3339(),
    }
}

pub async fn start(max_body_bytes: usize) -> Server {
    start_custom(engine_default(), |c| c.max_body_bytes = max_body_bytes).await
}

pub async fn start_with(max_body_bytes: usize, engine: EngineConfig) -> Server {
    start_custom(engine, |c| c.max_body_bytes = max_body_bytes).await
}

/// A server with a token, private webhooks allowed (receivers run on loopback), and
/// whatever `tweak` changes.
pub async fn start_custom(engine: EngineConfig, tweak: impl FnOnce(&mut ServerConfig)) -> Server {
    start_in(TempDir::new("api"), engine, tweak).await
}

pub async fn start_in(
    data: TempDir,
    engine: EngineConfig,
    tweak: impl FnOnce(&mut ServerConfig),
) -> Server {
    let model = tokio::task::spawn_blocking(move || demo_model(engine))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let mut cfg = ServerConfig::new(addr, data.0.clone());
    cfg.api_tokens = vec![TOKEN.into()];
    cfg.shutdown_timeout = Duration::from_secs(2);
    cfg.webhook_allow_private = true;
    // HEARTH_TEST_STORE=postgres: the same suites on a fresh PostgreSQL database.
    if std::env::var("HEARTH_TEST_STORE").as_deref() == Ok("postgres") {
        let url = postgres::fresh_database()
            .await
            .expect("HEARTH_TEST_STORE=postgres needs PostgreSQL");
        cfg.store = Some(hearth_server::store::StoreSpec::Postgres(url));
    }
    tweak(&mut cfg);
    let state = hearth_server::build_state(cfg, vec![model]).await.unwrap();
    let task = tokio::spawn(hearth_server::serve_on(state.clone(), listener));
    Server {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        state,
        task,
        data,
    }
}

impl Server {
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
    }
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(TOKEN)
    }
    pub async fn create(&self, input: Value, prefer: Option<&str>) -> (u16, Value) {
        let mut r = self
            .post("/v1/models/hearth/demo/predictions")
            .json(&json!({"input": input}));
        if let Some(p) = prefer {
            r = r.header("Prefer", p);
        }
        let resp = r.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }
    pub async fn prediction(&self, id: &str) -> Value {
        self.get(&format!("/v1/predictions/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
    /// Polls until the prediction is terminal (20 s at most).
    pub async fn wait_terminal(&self, id: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let p = self.prediction(id).await;
            if ["succeeded", "failed", "canceled"].contains(&p["status"].as_str().unwrap_or("")) {
                return p;
            }
            assert!(std::time::Instant::now() < deadline, "not terminal: {p}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// A server (token `TOKEN`) serving the demo as `demo_as` (owner, name) and
/// `dummy:demo` (the same shape with a bare tokenizer: a base model) as `base_as`,
/// running until the test ends; its address.
pub async fn serve_demo_and_base(demo_as: (&str, &str), base_as: (&str, &str)) -> SocketAddr {
    let engine = engine_default();
    let (d, b) = (
        (demo_as.0.to_string(), demo_as.1.to_string()),
        (base_as.0.to_string(), base_as.1.to_string()),
    );
    let (demo, base) = tokio::task::spawn_blocking(move || {
        let mut demo = demo_model(engine.clone());
        (demo.owner, demo.name) = d;
        demo.aliases.clear();
        demo.version_aliases.clear();
        let loaded = hearth_runtime::load(&ModelSpec::new("dummy:demo"), &engine).unwrap();
        let base = ServedModel {
            owner: b.0,
            name: b.1,
            aliases: Vec::new(),
            version: "c".repeat(64),
            version_aliases: Vec::new(),
            description: "a base model".into(),
            defaults: hearth_server::schema::default_inputs(),
            engine: loaded.engine,
            created_at: hearth_server::record::now_rfc3339(),
        };
        (demo, base)
    })
    .await
    .unwrap();
    let data = TempDir::new("two-models");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = ServerConfig::new(addr, data.0.clone());
    cfg.api_tokens = vec![TOKEN.into()];
    let state = hearth_server::build_state(cfg, vec![demo, base])
        .await
        .unwrap();
    tokio::spawn(async move {
        let _data = data;
        hearth_server::serve_on(state, listener).await
    });
    addr
}

/// Several seconds on the demo (its context is 8,192 tokens): outlasts every wait the tests time.
pub fn long_job() -> Value {
    json!({"prompt": "a long job", "max_tokens": 8000, "ignore_eos": true, "temperature": 0})
}

/// Parses an SSE body into (event, id, data) triples; comments skipped.
pub fn parse_sse(body: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for block in body.split("\n\n") {
        let (mut ev, mut id, mut data) = (String::new(), String::new(), Vec::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                ev = v.trim().into();
            } else if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().into();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
            }
        }
        if !ev.is_empty() {
            out.push((ev, id, data.join("\n")));
        }
    }
    out
}

/// A webhook receiver on loopback recording (headers, body); answers with `status`
/// for the first `fail_first` calls, then 200.
pub struct Receiver {
    pub url: String,
    pub calls: Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, String)>>>,
}

pub async fn receiver(fail_first: usize, status: u16) -> Receiver {
    receiver_on(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        fail_first,
        status,
    )
    .await
}

pub async fn receiver_on(
    listener: tokio::net::TcpListener,
    fail_first: usize,
    status: u16,
) -> Receiver {
    use axum::routing::post;
    let calls: Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, String)>>> = Default::default();
    let sink = calls.clone();
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/hook",
        post(move |h: axum::http::HeaderMap, body: String| {
            let sink = sink.clone();
            let n = n.clone();
            async move {
                sink.lock().unwrap().push((h, body));
                if n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < fail_first {
                    axum::http::StatusCode::from_u16(status).unwrap()
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver { url, calls }
}

impl Receiver {
    pub fn bodies(&self) -> Vec<Value> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| serde_json::from_str(b).unwrap())
            .collect()
    }
    pub async fn wait_for(&self, n: usize, secs: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        while self.calls.lock().unwrap().len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "only {} webhook calls arrived, expected {n}",
                self.calls.lock().unwrap().len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A prediction record as the store keeps it, for store tests.
pub fn record(
    id: &str,
    created_at: &str,
    status: hearth_server::record::Status,
) -> hearth_server::record::Record {
    hearth_server::record::Record {
        prediction: hearth_server::record::Prediction {
            id: id.into(),
            model: "hearth/demo".into(),
            version: "a".repeat(64),
            input: json!({"prompt": "hi"}),
            logs: String::new(),
            output: None,
            error: None,
            status,
            created_at: created_at.into(),
            started_at: None,
            completed_at: None,
            deadline: None,
            data_removed: false,
            source: "api".into(),
            metrics: None,
            hearth: None,
        },
        base_url: "http://x".into(),
        stream_token: "t".into(),
        webhook: None,
        webhook_events_filter: vec![],
        created_unix: 0,
    }
}

/// Polls `base`'s prediction `id` until it has output (at most `secs`); the record.
pub async fn wait_for_output(client: &reqwest::Client, base: &str, id: &str, secs: u64) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let p: Value = client
            .get(format!("{base}/v1/predictions/{id}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if p["output"].as_array().is_some_and(|o| !o.is_empty()) {
            return p;
        }
        assert!(std::time::Instant::now() < deadline, "no output: {p}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
