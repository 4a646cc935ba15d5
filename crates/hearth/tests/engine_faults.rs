//! The engine's supervision through the real binary. The tests' `hearth` has the
//! fault-injection points (this package's dev-dependencies switch the feature on;
//! `cargo build --release` has none): a prompt with a marker makes the engine fault.
//! A faulty prediction fails with an internal-fault error whose log id is in the
//! server's log, and the next prediction succeeds; faults that keep coming make the
//! engine DEFUNCT: `/health` says so, new predictions get a 503, the prediction in
//! flight fails with its `completed` webhook sent and its row saved, and the process
//! exits non-zero.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::procs::{spawn, Proc};

/// How long the server answers DEFUNCT before it exits (`--defunct-hold`): what is
/// checked in that state must be asked within it, so it is far longer than the few
/// requests take even on a loaded machine (the default's 3 s is not).
const HOLD_S: u64 = 20;

async fn start(data: &std::path::Path, log: &std::path::Path) -> (Proc, String) {
    let args: Vec<String> = [
        "--max-num-seqs",
        "1",
        "--kv-cache-memory",
        "16MiB",
        "--webhook-allow-private",
        "--defunct-hold",
        &HOLD_S.to_string(),
        "--data-dir",
        &data.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let server = spawn(0, &args, &[], log).await;
    let base = server.base.clone();
    (server, base)
}

/// A prediction, waited for (`Prefer: wait`).
async fn predict(base: &str, prompt: &str) -> Value {
    reqwest::Client::new()
        .post(format!("{base}/v1/models/hearth/demo/predictions"))
        .header("Prefer", "wait")
        .json(&json!({"input": {"prompt": prompt, "max_tokens": 8, "temperature": 0}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The log id an internal-fault error names.
fn log_id(p: &Value) -> String {
    assert_eq!(p["status"], "failed", "{p}");
    let e = p["error"].as_str().unwrap_or_default();
    assert!(e.contains("internal fault"), "{e}");
    let id = e.split("log id ").nth(1).expect("a log id");
    id.chars().take_while(|c| c.is_ascii_hexdigit()).collect()
}

/// Terminal webhooks by prediction id.
type Seen = Arc<Mutex<HashMap<String, Vec<Value>>>>;

async fn receiver() -> (String, Seen) {
    let seen: Seen = Default::default();
    let sink = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let sink = sink.clone();
            async move {
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                let id = v["id"].as_str().unwrap_or("").to_string();
                sink.lock().unwrap().entry(id).or_default().push(v);
                "ok"
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulty_prediction_fails_alone_and_persistent_faults_exit_the_process() {
    let data = std::env::temp_dir().join(format!("hearth-faults-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).unwrap();
    let log = data.join("server.log");
    let (mut server, base) = start(&data.join("d"), &log).await;
    let client = reqwest::Client::new();

    // One fault: that prediction fails, the next one succeeds.
    let healthy = predict(&base, "The hearth is").await;
    assert_eq!(healthy["status"], "succeeded", "{healthy}");
    let first_fault = log_id(&predict(&base, "The hearth is hearth-fault:step-panic").await);
    let again = predict(&base, "The hearth is").await;
    assert_eq!(again["status"], "succeeded", "{again}");
    assert_eq!(again["output"], healthy["output"]);
    let h = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(h.status(), 200);

    // Faults that keep coming: the first fails its prediction, the second rebuilds,
    // the third makes the engine DEFUNCT, with a prediction in flight.
    log_id(&predict(&base, "hearth-fault:step-panic-forever").await);
    let rebuilt = predict(&base, "The hearth is").await;
    log_id(&rebuilt);
    assert!(
        rebuilt["error"].as_str().unwrap().contains("rebuilt"),
        "{rebuilt}"
    );
    let (hook, seen) = receiver().await;
    let last: Value = client
        .post(format!("{base}/v1/models/hearth/demo/predictions"))
        .json(
            &json!({"input": {"prompt": "The hearth is", "max_tokens": 8},
                      "webhook": hook, "webhook_events_filter": ["completed"]}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = last["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let failed = loop {
        let p: Value = client
            .get(format!("{base}/v1/predictions/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if p["status"] == "failed" {
            break p;
        }
        assert!(Instant::now() < deadline, "never failed: {p}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    log_id(&failed);
    assert!(
        failed["error"].as_str().unwrap().contains("DEFUNCT"),
        "{failed}"
    );

    // The engine was marked DEFUNCT before the prediction failed, and the server
    // answers for `HOLD_S` more before it exits.
    let h = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(h.status(), 503);
    let body: Value = h.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("DEFUNCT"),
        "{body}"
    );
    let hc: Value = client
        .get(format!("{base}/health-check"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(hc["status"], "DEFUNCT", "{hc}");
    let refused = client
        .post(format!("{base}/v1/models/hearth/demo/predictions"))
        .json(&json!({"input": {"prompt": "The hearth is"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("DEFUNCT"),
        "{body}"
    );

    let deadline = Instant::now() + Duration::from_secs(HOLD_S + 60);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "a DEFUNCT server did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "{status:?}");
    let hooks = seen.lock().unwrap().get(&id).cloned().unwrap_or_default();
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    assert_eq!(hooks[0]["status"], "failed");
    assert_eq!(hooks[0]["error"], failed["error"]);

    // The server's log has each fault's log id beside the panic message.
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains(&first_fault))
        .unwrap_or_else(|| panic!("log id {first_fault} not in the log:\n{text}"));
    assert!(line.contains("injected fault"), "{line}");
    assert!(text.contains("DEFUNCT"), "{text}");

    // The row was saved as it failed: a fresh process reads it back unchanged (a row
    // left in flight would be ended by the new process with another error).
    let (_server, base) = start(&data.join("d"), &data.join("server2.log")).await;
    let row: Value = client
        .get(format!("{base}/v1/predictions/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(row["status"], "failed", "{row}");
    assert_eq!(row["error"], failed["error"]);
    drop(_server);
    let _ = std::fs::remove_dir_all(&data);
}
