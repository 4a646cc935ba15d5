//! `hearth serve` killed with SIGKILL loses no finished prediction, and what was in
//! flight is failed (not left `processing`) when it comes back.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start(port: u16, data: &std::path::Path) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["serve", "--port", &port.to_string(), "--data-dir"])
        .arg(data)
        .env("HEARTH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The server listens at once and says READY once its model is loaded.
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/health-check")).await {
            if r.json::<Value>()
                .await
                .is_ok_and(|h| h["status"] == "READY")
            {
                return server;
            }
        }
        assert!(Instant::now() < deadline, "server did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get(port: u16, id: &str) -> Value {
    reqwest::get(format!("http://127.0.0.1:{port}/v1/predictions/{id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn kill_dash_nine_keeps_finished_predictions_and_fails_the_interrupted_ones() {
    let data = std::env::temp_dir().join(format!("hearth-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let port = free_port();
    let mut server = start(port, &data).await;
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/models/hearth/demo/predictions");
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
    while get(port, &rid).await["status"] != "processing" {
        assert!(Instant::now() < deadline, "never started processing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.0.kill().unwrap(); // SIGKILL
    server.0.wait().unwrap();
    drop(server);

    let _server = start(port, &data).await;
    let kept = get(port, done["id"].as_str().unwrap()).await;
    assert_eq!(kept["status"], "succeeded");
    assert_eq!(kept["output"], done["output"]);
    assert_eq!(kept["metrics"], done["metrics"]);
    let failed = get(port, &rid).await;
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
    let _ = std::fs::remove_dir_all(&data);
}
