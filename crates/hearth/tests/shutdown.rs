//! SIGTERM on `hearth serve` with clients holding connections open: running and
//! queued predictions are canceled after `--shutdown-timeout`, their SSE streams end
//! with `done`, a Cog sync request gets its answer, and the process exits after the
//! drain, on its own bounds, even with an idle connection open.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::procs::{spawn, temp};

const TOKEN: &str = "shutdown-token";

fn long_job() -> Value {
    // Several seconds on the demo (its context is 8,192 tokens), far past the waits timed here.
    json!({"prompt": "a long job", "max_tokens": 8000, "ignore_eos": true, "temperature": 0})
}

#[tokio::test]
async fn sigterm_ends_streams_and_sync_requests_and_exits_within_the_timeout() {
    let dir = temp("shutdown");
    let args: Vec<String> = [
        "--api-token",
        TOKEN,
        "--shutdown-timeout",
        "2",
        "--max-num-seqs",
        "1",
        "--kv-cache-memory",
        "64MiB",
        // The server never closes the idle connection below by itself: one that
        // waited for it to close would never exit.
        "--header-read-timeout",
        "3600",
        "--idle-timeout",
        "3600",
        "--data-dir",
        &dir.join("d").display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let mut server = spawn(0, &args, &[("HEARTH_LOG", "warn")], &dir.join("serve.log")).await;
    let (base, port) = (server.base.clone(), server.port());
    let client = reqwest::Client::new();
    let create = || async {
        client
            .post(format!("{base}/v1/models/hearth/demo/predictions"))
            .bearer_auth(TOKEN)
            .json(&json!({"input": long_job()}))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let running = create().await;
    let queued = create().await;
    // Each stream's headers are in before the SIGTERM (the server holds the stream
    // open); its body is read to the end meanwhile.
    let open = |p: &Value| {
        let url = p["urls"]["stream"].as_str().unwrap().to_string();
        let c = client.clone();
        async move {
            let resp = c.get(url).send().await.unwrap();
            assert_eq!(resp.status().as_u16(), 200);
            resp
        }
    };
    let (running_resp, queued_resp) = (open(&running).await, open(&queued).await);
    let read = |resp: reqwest::Response| tokio::spawn(async move { resp.text().await.unwrap() });
    let (stream_running, stream_queued) = (read(running_resp), read(queued_resp));
    // Accepted before the Cog request's own connection (a fresh one, accepted after it).
    let _idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let cog_sync = {
        let c = reqwest::Client::new();
        let url = format!("{base}/predictions");
        tokio::spawn(async move {
            let r = c
                .post(url)
                .bearer_auth(TOKEN)
                .json(&json!({"input": long_job()}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    // The Cog request is in the engine's queue (behind the two others) before the
    // SIGTERM: a fixed pause let a loaded machine send the signal first.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = client
            .get(format!("{base}/metrics"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let gauge = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{name}{{")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(-1.0)
        };
        if gauge("vllm:num_requests_running") == 1.0 && gauge("vllm:num_requests_waiting") == 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the three requests never reached the engine: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let t = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // Its own bounds end it (2 s of drain, then a few seconds each to cancel and to
    // close). What is checked is that it exits at all with the idle connection open
    // (one it waited for would hold it past any bound) and that the jobs were
    // canceled rather than waited for (their streams, below), not how fast: a loaded
    // machine may take longer.
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "still running 120 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = t.elapsed();
    assert!(status.success(), "{status:?}");
    // It waited for the drain (a lower bound: a loaded machine only adds to it).
    assert!(
        took >= Duration::from_secs(2),
        "did not wait for the drain: {took:?}"
    );
    for (name, reader) in [("running", stream_running), ("queued", stream_queued)] {
        let body = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .unwrap_or_else(|_| panic!("{name} stream still open"))
            .unwrap();
        assert!(
            body.contains("event: done") && body.contains(r#"{"reason":"canceled"}"#),
            "{name} stream: {}",
            &body[body.len().saturating_sub(300)..]
        );
    }
    let (code, body) = tokio::time::timeout(Duration::from_secs(5), cog_sync)
        .await
        .expect("the Cog sync request got an answer")
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(body["status"], "canceled", "{body}");
    // As Cog answers a canceled sync request: without its output.
    assert!(body.get("output").is_none(), "{body}");
    assert!(body["metrics"].is_object(), "{body}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
