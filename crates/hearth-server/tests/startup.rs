//! The server listens before its models load: `/health-check` says STARTING, then
//! READY with the setup logs and times, or SETUP_FAILED with the error (or the server
//! exits, when told to); meanwhile Cog's routes answer as Cog does and the /v1 and
//! OpenAI routes 503 with Retry-After, tokens still required. The store opens while
//! the models load: one that cannot be used fails setup at once, and what an earlier
//! process left in flight is ended before the server serves. (HEARTH_TEST_STORE=
//! postgres runs the cases that do not name a store on a fresh PostgreSQL database.)

mod support;

use std::sync::mpsc;
use std::time::Duration;

use hearth_server::record::{now_rfc3339, Status};
use hearth_server::startup::{serve_after_setup, SetupLog};
use hearth_server::store::{SqliteStore, Store, StoreSpec};
use hearth_server::{ServerConfig, ServerError};
use serde_json::{json, Value};
use support::{demo_model, engine_default, record, TempDir, TOKEN};

struct Starting {
    base: String,
    client: reqwest::Client,
    /// Ends the setup: Ok loads the demo model, Err fails with that error.
    release: mpsc::Sender<Result<(), String>>,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
    _data: TempDir,
}

async fn start(exit_on_failure: bool) -> Starting {
    let store = if std::env::var("HEARTH_TEST_STORE").as_deref() == Ok("postgres") {
        let url = support::postgres::fresh_database()
            .await
            .expect("HEARTH_TEST_STORE=postgres needs PostgreSQL");
        Some(StoreSpec::Postgres(url))
    } else {
        None
    };
    start_in(TempDir::new("startup"), store, exit_on_failure).await
}

async fn start_in(data: TempDir, store: Option<StoreSpec>, exit_on_failure: bool) -> Starting {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = ServerConfig::new(addr, data.0.clone());
    cfg.api_tokens = vec![TOKEN.into()];
    cfg.shutdown_timeout = Duration::from_secs(1);
    cfg.store = store;
    let (release, wait) = mpsc::channel::<Result<(), String>>();
    let load = move |log: SetupLog| {
        log.line("loading the test model");
        wait.recv()
            .map_err(|_| "the test went away".to_string())?
            .map(|()| vec![demo_model(engine_default())])
    };
    let task = tokio::spawn(serve_after_setup(cfg, listener, exit_on_failure, load));
    Starting {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        release,
        task,
        _data: data,
    }
}

impl Starting {
    async fn call(&self, method: reqwest::Method, path: &str, token: bool) -> reqwest::Response {
        let mut r = self.client.request(method, format!("{}{path}", self.base));
        if token {
            r = r.bearer_auth(TOKEN);
        }
        r.header("content-type", "application/json")
            .body(r#"{"input": {"max_tokens": 2}}"#)
            .send()
            .await
            .unwrap()
    }
    async fn health(&self) -> Value {
        self.call(reqwest::Method::GET, "/health-check", false)
            .await
            .json()
            .await
            .unwrap()
    }
    async fn wait_status(&self, want: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let h = self.health().await;
            if h["status"] == want {
                return h;
            }
            assert!(std::time::Instant::now() < deadline, "still {h}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn starting_answers_like_cog_then_ready_with_the_setup_logs() {
    use reqwest::Method;
    let s = start(false).await;
    let h = s.health().await;
    assert_eq!(h["status"], "STARTING");
    assert_eq!(h["setup"]["status"], "starting");
    assert!(h["setup"]["started_at"].is_string());
    assert!(h["setup"].get("completed_at").is_none(), "{h}");
    assert_eq!(h["version"]["coglet"], "0.23.1");
    // The probe endpoint says it with the status code, without a token.
    assert_eq!(
        s.call(Method::GET, "/health", false)
            .await
            .status()
            .as_u16(),
        503
    );
    // Cog's routes, as Cog answers before setup has finished.
    for (m, p) in [
        (Method::POST, "/predictions"),
        (Method::PUT, "/predictions/early"),
    ] {
        let r = s.call(m, p, true).await;
        assert_eq!(r.status().as_u16(), 503, "{p}");
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["status"], "failed");
        assert!(
            b["error"]
                .as_str()
                .unwrap()
                .starts_with("Setup has not finished yet"),
            "{b}"
        );
    }
    let r = s.call(Method::GET, "/openapi.json", false).await;
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "OpenAPI schema not available"})
    );
    assert_eq!(s.call(Method::GET, "/", true).await.status().as_u16(), 200);
    // Replicate's and OpenAI's: 503 with Retry-After, in their own error shapes.
    for p in [
        "/v1/predictions",
        "/v1/models/hearth/demo/predictions",
        "/v1/chat/completions",
    ] {
        let m = if p == "/v1/predictions" {
            Method::GET
        } else {
            Method::POST
        };
        let r = s.call(m.clone(), p, true).await;
        assert_eq!(r.status().as_u16(), 503, "{p}");
        assert_eq!(r.headers()["retry-after"], "5", "{p}");
        let b: Value = r.json().await.unwrap();
        assert!(
            b["detail"].is_string() || b["error"]["message"].is_string(),
            "{p}: {b}"
        );
        // The token is still required while starting.
        assert_eq!(s.call(m, p, false).await.status().as_u16(), 401, "{p}");
    }
    s.release.send(Ok(())).unwrap();
    let h = s.wait_status("READY").await;
    assert_eq!(
        s.call(Method::GET, "/health", false)
            .await
            .status()
            .as_u16(),
        200
    );
    assert_eq!(h["setup"]["status"], "succeeded");
    assert!(h["setup"]["completed_at"].is_string());
    assert!(
        h["setup"]["logs"]
            .as_str()
            .unwrap()
            .contains("loading the test model"),
        "{h}"
    );
    // The same client (its pooled connection opened during setup) now reaches the model.
    let r = s.call(Method::POST, "/predictions", true).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "succeeded");
    assert_eq!(
        s.call(Method::GET, "/openapi.json", false)
            .await
            .status()
            .as_u16(),
        200
    );
    let r = s
        .call(Method::POST, "/v1/models/hearth/demo/predictions", true)
        .await;
    assert_eq!(r.status().as_u16(), 201);
    assert_eq!(
        s.call(Method::POST, "/shutdown", true)
            .await
            .status()
            .as_u16(),
        200
    );
    let ended = tokio::time::timeout(Duration::from_secs(15), s.task).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
}

#[tokio::test]
async fn a_failed_setup_is_reported_until_stopped() {
    use reqwest::Method;
    let s = start(false).await;
    s.release
        .send(Err("the weights are corrupt".into()))
        .unwrap();
    let h = s.wait_status("SETUP_FAILED").await;
    assert_eq!(h["setup"]["status"], "failed");
    assert!(h["setup"]["completed_at"].is_string());
    let logs = h["setup"]["logs"].as_str().unwrap();
    assert!(
        logs.contains("loading the test model") && logs.contains("the weights are corrupt"),
        "{logs}"
    );
    let r = s.call(Method::POST, "/predictions", true).await;
    assert_eq!(r.status().as_u16(), 503);
    // Retrying will not help: no Retry-After.
    let r = s.call(Method::GET, "/v1/predictions", true).await;
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().get("retry-after").is_none());
    assert!(!s.task.is_finished());
    assert_eq!(
        s.call(Method::POST, "/shutdown", true)
            .await
            .status()
            .as_u16(),
        200
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), s.task).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
}

#[tokio::test]
async fn exit_on_setup_failure_returns_the_error() {
    let s = start(true).await;
    assert_eq!(s.health().await["status"], "STARTING");
    s.release.send(Err("no such model".into())).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), s.task)
        .await
        .unwrap()
        .unwrap();
    match ended {
        Err(ServerError::Setup(e)) => assert!(e.contains("no such model"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn shutdown_while_starting_stops_at_once() {
    let s = start(false).await;
    assert_eq!(
        s.call(reqwest::Method::POST, "/shutdown", false)
            .await
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        s.call(reqwest::Method::POST, "/shutdown", true)
            .await
            .status()
            .as_u16(),
        200
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), s.task).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    drop(s.release);
}

#[tokio::test]
async fn a_store_in_use_fails_setup_at_once_while_the_models_load() {
    let data = TempDir::new("startup-locked");
    let path = data.0.join("predictions.sqlite3");
    let holder = SqliteStore::open(&path, &data.0).await.unwrap();
    let s = start_in(data, Some(StoreSpec::Sqlite(path)), false).await;
    // The loader is still waiting for its release: the store alone failed setup.
    let h = s.wait_status("SETUP_FAILED").await;
    let logs = h["setup"]["logs"].as_str().unwrap();
    assert!(logs.contains("in use by another hearth process"), "{logs}");
    assert_eq!(
        s.call(reqwest::Method::GET, "/health", false)
            .await
            .status()
            .as_u16(),
        503
    );
    assert_eq!(
        s.call(reqwest::Method::POST, "/shutdown", true)
            .await
            .status()
            .as_u16(),
        200
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), s.task).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    drop(s.release);
    holder.retire().await.unwrap();
}

#[tokio::test]
async fn what_an_earlier_process_left_in_flight_is_ended_before_serving() {
    let data = TempDir::new("startup-orphan");
    let path = data.0.join("predictions.sqlite3");
    let earlier = SqliteStore::open(&path, &data.0).await.unwrap();
    earlier.heartbeat(Duration::from_secs(60)).await.unwrap();
    let mut left = record("left-running", &now_rfc3339(), Status::Processing);
    left.prediction.output = Some(vec!["half".into()]);
    earlier.insert(&left).await.unwrap();
    drop(earlier); // as a crash would: no clean stop
    let s = start_in(data, Some(StoreSpec::Sqlite(path)), false).await;
    s.release.send(Ok(())).unwrap();
    s.wait_status("READY").await;
    let r = s
        .call(reqwest::Method::GET, "/v1/predictions/left-running", true)
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["status"], "failed", "{p}");
    assert!(
        p["error"].as_str().unwrap().contains("server stopped"),
        "{p}"
    );
    assert_eq!(p["output"], json!(["half"]));
    // The list reads the same store.
    let listed: Value = s
        .call(reqwest::Method::GET, "/v1/predictions", true)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["results"][0]["id"], "left-running", "{listed}");
    assert_eq!(
        s.call(reqwest::Method::POST, "/shutdown", true)
            .await
            .status()
            .as_u16(),
        200
    );
    let ended = tokio::time::timeout(Duration::from_secs(15), s.task).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
}
