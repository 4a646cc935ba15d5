//! `hearth serve` killed with SIGKILL loses no finished prediction, and what was in
//! flight is failed (not left `processing`) when it comes back.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::procs::{spawn, temp, Proc};

/// A server in `dir` on a port of its own choosing (the restart too: they share the
/// data dir, not the port), its log `dir/LOG`.
async fn start(dir: &std::path::Path, log: &str) -> Proc {
    let args = [
        "--data-dir".to_string(),
        dir.join("d").display().to_string(),
    ];
    spawn(0, &args, &[("HEARTH_LOG", "warn")], &dir.join(log)).await
}

async fn get(base: &str, id: &str) -> Value {
    reqwest::get(format!("{base}/v1/predictions/{id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn kill_dash_nine_keeps_finished_predictions_and_fails_the_interrupted_ones() {
    let dir = temp("restart");
    let mut server = start(&dir, "first.log").await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/models/hearth/demo/predictions", server.base);
    let done: Value = client
        .post(&url)
        .header("Prefer", "wait")
        .json(&json!({"input": {"prompt": "keep me", "max_tokens": 6}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded");
    let running: Value = client
        .post(&url)
        .json(&json!({"input": {"prompt": "interrupt me", "max_tokens": 8000, "ignore_eos": true}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rid = running["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&server.base, &rid).await["status"] != "processing" {
        assert!(Instant::now() < deadline, "never started processing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.child.kill().unwrap(); // SIGKILL
    server.child.wait().unwrap();
    drop(server);

    let server = start(&dir, "second.log").await;
    let kept = get(&server.base, done["id"].as_str().unwrap()).await;
    assert_eq!(kept["status"], "succeeded");
    assert_eq!(kept["output"], done["output"]);
    assert_eq!(kept["metrics"], done["metrics"]);
    let failed = get(&server.base, &rid).await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"].as_str().unwrap().contains("stopped"),
        "{failed}"
    );
    assert!(
        failed["metrics"]["total_time"].as_f64().unwrap() > 0.0,
        "{failed}"
    );
    assert_eq!(failed["output"], json!([]), "{failed}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
