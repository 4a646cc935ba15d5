//! Hybrid serving with real processes: a front `hearth serve` routing models to an
//! upstream that is another `hearth serve` (the demo model), through a
//! fault-injecting proxy of our own (`support::fault_proxy`). Covers an `upstream`
//! route end to end (create, wait, stream, cancel, webhooks, the model document,
//! inputs checked against the upstream's cached schema with nothing sent, a relayed
//! 422 where there is none), throttled creates, a 5xx, creates whose answer is lost (resolved by
//! the upstream's list, or failed when two identical ones are in flight), `fallback`
//! with the local engine unable to take work and its circuit breaker, and a front
//! killed with SIGKILL during an upstream prediction that finishes after a restart.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::fault_proxy::FaultProxy;
use support::procs::{spawn, spawn_upstream, temp, Api, Proc};

const UP_TOKEN: &str = "upstream-secret-7f3a";
const FRONT_TOKEN: &str = "front-token";

/// The upstream: the demo model as acme/remote and as hearth/demo.
async fn upstream(dir: &Path) -> Proc {
    spawn_upstream(
        dir,
        &[
            "name = \"acme/remote\"\nmodel = \"demo\"\n[defaults]\nmax_tokens = 129\n",
            "name = \"hearth/demo\"\nmodel = \"demo\"\n",
        ],
        UP_TOKEN,
    )
    .await
}

async fn front(port: u16, data: &Path, upstream_url: &str, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "--data-dir".into(),
        data.join("front-data").display().to_string(),
        "--api-token".into(),
        FRONT_TOKEN.into(),
        "--webhook-allow-private".into(),
        "--upstream".into(),
        format!("up={upstream_url}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn(
        port,
        &args,
        &[("HEARTH_UPSTREAM_TOKEN_UP", UP_TOKEN)],
        &data.join("front.log"),
    )
    .await
}

/// A webhook receiver recording bodies.
async fn receiver() -> (String, Arc<Mutex<Vec<(axum::http::HeaderMap, Value)>>>) {
    use axum::routing::post;
    let calls: Arc<Mutex<Vec<(axum::http::HeaderMap, Value)>>> = Default::default();
    let sink = calls.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |h: axum::http::HeaderMap, body: String| {
            let sink = sink.clone();
            async move {
                sink.lock()
                    .unwrap()
                    .push((h, serde_json::from_str(&body).unwrap_or(Value::Null)));
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, calls)
}

fn input(tag: &str, max_tokens: u32) -> Value {
    // min_tokens: the demo's random weights answer some prompts with end-of-sequence at
    // once, and the checks below need output to compare.
    json!({"prompt": format!("{tag} {}", rand::random::<u64>()), "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0})
}

/// The upstream's predictions with this input.
async fn upstream_runs(up: &Api, input: &Value) -> Vec<Value> {
    let page = up.get("/v1/predictions").await;
    page["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["input"] == *input)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_route_serves_every_verb_and_survives_faults() {
    let dir = temp("e2e");
    let u = upstream(&dir).await;
    let proxy = FaultProxy::start(&u.base).await;
    let f = front(
        0,
        &dir,
        &proxy.url,
        &[
            "--route",
            "acme/remote=upstream:up",
            "--upstream-failures",
            "100",
        ],
    )
    .await;
    let api = Api::new(&f.base, FRONT_TOKEN);
    let up = Api::new(&u.base, UP_TOKEN);

    // Before hearth has the upstream's schema, the upstream's 422 reaches the caller
    // unchanged: the create went there.
    let bad = json!({"input": {"prompt": "x", "max_tokens": "many", "temperature": 9}});
    let sent = proxy.creates.load(std::sync::atomic::Ordering::SeqCst);
    let (code, body) = api.create("acme/remote", bad.clone(), None).await;
    assert_eq!(code, 422, "{body}");
    assert!(body.to_string().contains("max_tokens"), "{body}");
    assert_eq!(
        proxy.creates.load(std::sync::atomic::Ordering::SeqCst),
        sent + 1
    );

    // The model document comes from the upstream: the clients' run() finds its version.
    let doc = api.get("/v1/models/acme/remote").await;
    assert_eq!(doc["name"], "remote", "{doc}");
    let version = doc["latest_version"]["id"].as_str().unwrap().to_string();
    assert!(doc["latest_version"]["openapi_schema"].is_object());
    let v = api
        .get(&format!("/v1/models/acme/remote/versions/{version}"))
        .await;
    assert_eq!(v["id"], version.as_str());

    // Create and wait: hearth's id and URLs, the upstream's output and timings.
    let inp = input("wait", 12);
    let (code, p) = api
        .create("acme/remote", json!({"input": inp}), Some("wait=60"))
        .await;
    assert_eq!(code, 201, "{p}");
    assert_eq!(p["status"], "succeeded", "{p}");
    assert_eq!(p["hearth"]["side"], "upstream", "{p}");
    assert_eq!(p["hearth"]["upstream"], "up");
    let uid = p["hearth"]["upstream_id"].as_str().unwrap();
    assert_ne!(p["id"], uid);
    assert!(
        p["urls"]["get"].as_str().unwrap().starts_with(&f.base),
        "{p}"
    );
    let theirs = up.get(&format!("/v1/predictions/{uid}")).await;
    assert_eq!(p["output"], theirs["output"]);
    // Created by model name: the record names the version the upstream ran.
    assert_eq!(p["version"], theirs["version"], "{p}");
    assert_eq!(
        p["metrics"]["predict_time"],
        theirs["metrics"]["predict_time"]
    );
    assert_eq!(p["completed_at"], theirs["completed_at"]);
    assert!(!p["output"].as_array().unwrap().is_empty());
    let id = p["id"].as_str().unwrap();
    assert_eq!(
        api.get(&format!("/v1/predictions/{id}")).await["output"],
        p["output"]
    );
    let list = api.get("/v1/predictions").await;
    assert!(list["results"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == id));

    // A stream synthesized from polling: output deltas, then done last; a webhook
    // receiver gets hearth's own signed webhooks, completed last.
    let (hook, calls) = receiver().await;
    let inp = input("stream", 60);
    let (code, p) = api
        .create("acme/remote", json!({"input": inp, "webhook": hook}), None)
        .await;
    assert_eq!(code, 201, "{p}");
    let sse = api
        .http
        .get(p["urls"]["stream"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<(String, String)> = sse
        .split("\n\n")
        .filter_map(|b| {
            let ev = b
                .lines()
                .find_map(|l| l.strip_prefix("event:"))?
                .trim()
                .to_string();
            let data: Vec<&str> = b
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            Some((ev, data.join("\n")))
        })
        .collect();
    assert_eq!(events.last().unwrap().0, "done", "{sse}");
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|(e, _)| e == "output"),
        "{sse}"
    );
    let streamed: String = events
        .iter()
        .filter(|(e, _)| e == "output")
        .map(|(_, d)| d.as_str())
        .collect();
    let done = api.wait_terminal(p["id"].as_str().unwrap(), 60).await;
    let joined: String = done["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(streamed, joined);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = calls.lock().unwrap().clone();
        if got.last().is_some_and(|(_, b)| b["status"] == "succeeded") {
            assert_eq!(got.last().unwrap().1["id"], done["id"]);
            assert!(got.iter().all(|(h, _)| h.contains_key("webhook-signature")));
            assert!(
                got.iter().any(|(_, b)| b["status"] == "processing"),
                "a start webhook"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no completed webhook: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Cancel is forwarded: both sides end canceled.
    let long = json!({"prompt": format!("cancel {}", rand::random::<u64>()), "max_tokens": 8000, "ignore_eos": true});
    let (_, p) = api
        .create("acme/remote", json!({"input": long}), None)
        .await;
    let id = p["id"].as_str().unwrap();
    let running = api.wait_status(id, "processing", 60).await;
    let uid = running["hearth"]["upstream_id"]
        .as_str()
        .unwrap()
        .to_string();
    let c: Value = api
        .http
        .post(format!("{}/v1/predictions/{id}/cancel", f.base))
        .bearer_auth(FRONT_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let c = if c["status"] == "canceled" {
        c
    } else {
        api.wait_terminal(id, 60).await
    };
    assert_eq!(c["status"], "canceled", "{c}");
    assert_eq!(
        up.get(&format!("/v1/predictions/{uid}")).await["status"],
        "canceled"
    );

    // With the version's schema cached (the documents above), hearth checks the input
    // itself: a 422 naming each field and why, nothing sent upstream, nothing stored;
    // by model name (its latest version) and by version id alike.
    let sent = proxy.creates.load(std::sync::atomic::Ordering::SeqCst);
    let by_version = api
        .http
        .post(format!("{}/v1/predictions", f.base))
        .bearer_auth(FRONT_TOKEN)
        .json(&json!({"version": version, "input": bad["input"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(by_version.status().as_u16(), 422);
    let by_version: Value = by_version.json().await.unwrap();
    let (code, body) = api.create("acme/remote", bad.clone(), None).await;
    assert_eq!(code, 422, "{body}");
    for body in [&body, &by_version] {
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("input.max_tokens: expected integer, got string"),
            "{body}"
        );
        assert!(
            detail.contains("input.temperature: must be less than or equal to 5, got 9"),
            "{body}"
        );
        assert_eq!(body["title"], "Input validation failed", "{body}");
    }
    assert_eq!(
        proxy.creates.load(std::sync::atomic::Ordering::SeqCst),
        sent,
        "a create was sent upstream"
    );
    let listed = api.get("/v1/predictions").await;
    let stored = listed["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["input"] == bad["input"])
        .count();
    assert_eq!(stored, 1, "only the relayed one is stored: {listed}");
    // What the schema cannot say still reaches the upstream, whose 422 is relayed.
    let (code, body) = api
        .create(
            "acme/remote",
            json!({"input": {"prompt": "x", "json_schema": "{not json"}}),
            None,
        )
        .await;
    assert_eq!(code, 422, "{body}");
    assert!(body.to_string().contains("not valid JSON"), "{body}");
    assert_eq!(
        proxy.creates.load(std::sync::atomic::Ordering::SeqCst),
        sent + 1
    );

    // Two 429s with Retry-After: the create is sent again after the delay and runs once.
    let before = proxy.creates.load(std::sync::atomic::Ordering::SeqCst);
    proxy.set(|p| p.throttle_creates = 2);
    let inp = input("throttled", 8);
    let (code, p) = api.create("acme/remote", json!({"input": inp}), None).await;
    assert_eq!(code, 201, "{p}");
    let done = api.wait_terminal(p["id"].as_str().unwrap(), 60).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(
        done["logs"].as_str().unwrap().contains("throttled"),
        "{done}"
    );
    assert_eq!(
        proxy.creates.load(std::sync::atomic::Ordering::SeqCst) - before,
        3
    );
    assert_eq!(upstream_runs(&up, &inp).await.len(), 1);

    // A 5xx on create: failed, saying it was not sent again.
    proxy.set(|p| p.fail_creates = 1);
    let inp = input("fivexx", 8);
    let (_, p) = api.create("acme/remote", json!({"input": inp}), None).await;
    let done = api.wait_terminal(p["id"].as_str().unwrap(), 60).await;
    assert_eq!(done["status"], "failed", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(
        err.contains("503") && err.contains("not sent again"),
        "{err}"
    );
    assert!(upstream_runs(&up, &inp).await.is_empty());

    // The connection dies after the upstream took the create: found by its list,
    // adopted, never sent twice.
    proxy.set(|p| p.reset_after_creates = 1);
    let inp = input("reset", 8);
    let (code, p) = api.create("acme/remote", json!({"input": inp}), None).await;
    assert_eq!(code, 201, "{p}");
    let done = api.wait_terminal(p["id"].as_str().unwrap(), 60).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let runs = upstream_runs(&up, &inp).await;
    assert_eq!(runs.len(), 1, "ran once upstream");
    assert_eq!(done["hearth"]["upstream_id"], runs[0]["id"]);
    assert_eq!(done["output"], runs[0]["output"]);

    // Two identical inputs in flight, both answers lost: neither is guessed.
    proxy.set(|p| p.reset_after_creates = 2);
    let inp = input("twins", 8);
    let body = json!({"input": inp});
    let ((_, a), (_, b)) = tokio::join!(
        api.create("acme/remote", body.clone(), None),
        api.create("acme/remote", body.clone(), None)
    );
    for p in [a, b] {
        let done = api.wait_terminal(p["id"].as_str().unwrap(), 60).await;
        assert_eq!(done["status"], "failed", "{done}");
        let err = done["error"].as_str().unwrap();
        assert!(
            err.contains("2 predictions there have the same model and identical input"),
            "{err}"
        );
    }
    assert_eq!(upstream_runs(&up, &inp).await.len(), 2, "nothing resent");

    // The upstream token is never shown or logged by the front.
    let metrics = api.text("/metrics").await;
    assert!(
        metrics.contains("hearth_upstream_calls_total{upstream=\"up\",outcome=\"throttled\"} 2"),
        "{metrics}"
    );
    let health = api.text("/health").await;
    let log = std::fs::read_to_string(&f.log).unwrap();
    for text in [&metrics, &health, &log, &list.to_string()] {
        assert!(!text.contains(UP_TOKEN));
    }
    drop(f);
    drop(u);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_goes_upstream_when_local_cannot_take_work_until_the_breaker_opens() {
    let dir = temp("fallback");
    let u = upstream(&dir).await;
    let proxy = FaultProxy::start(&u.base).await;
    // No waiting room: every local create finds the engine's queue full.
    let f = front(
        0,
        &dir,
        &proxy.url,
        &[
            "--max-waiting",
            "0",
            "--route",
            "hearth/demo=fallback:up",
            "--upstream-failures",
            "2",
            "--upstream-cooldown",
            "600",
        ],
    )
    .await;
    let api = Api::new(&f.base, FRONT_TOKEN);
    let (code, p) = api
        .create(
            "hearth/demo",
            json!({"input": input("fallback", 8)}),
            Some("wait=60"),
        )
        .await;
    assert_eq!(code, 201, "{p}");
    assert_eq!(p["status"], "succeeded", "{p}");
    assert_eq!(p["hearth"]["side"], "upstream", "{p}");
    assert_eq!(p["hearth"]["reason"], "local create failed");
    assert_eq!(
        api.get("/health").await["upstreams"]["up"]["circuit"],
        "closed"
    );

    // The upstream fails twice: its circuit opens, and the route stays local (whose
    // queue is full: the caller gets the local 429, nothing is sent upstream).
    proxy.set(|p| p.fail_all = true);
    for _ in 0..2 {
        let (_, p) = api
            .create("hearth/demo", json!({"input": input("down", 8)}), None)
            .await;
        let done = api.wait_terminal(p["id"].as_str().unwrap(), 60).await;
        assert_eq!(done["status"], "failed", "{done}");
    }
    let health = api.get("/health").await;
    assert_eq!(health["upstreams"]["up"]["circuit"], "open", "{health}");
    let sent = proxy.creates.load(std::sync::atomic::Ordering::SeqCst);
    let (code, body) = api
        .create("hearth/demo", json!({"input": input("local", 8)}), None)
        .await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(
        proxy.creates.load(std::sync::atomic::Ordering::SeqCst),
        sent
    );
    let metrics = api.text("/metrics").await;
    assert!(
        metrics.contains("hearth_upstream_circuit_open{upstream=\"up\"} 1"),
        "{metrics}"
    );
    drop(f);
    drop(u);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_killed_mid_prediction_resumes_polling_after_restart() {
    let dir = temp("restart");
    let u = upstream(&dir).await;
    let route = ["--route", "acme/remote=upstream:up"];
    let mut f = front(0, &dir, &u.base, &route).await;
    let port = f.port();
    let api = Api::new(&f.base, FRONT_TOKEN);
    let (hook, calls) = receiver().await;
    let long = json!({"prompt": format!("restart {}", rand::random::<u64>()), "max_tokens": 3000, "ignore_eos": true});
    let (code, p) = api
        .create(
            "acme/remote",
            json!({"input": long, "webhook": hook, "webhook_events_filter": ["completed"]}),
            None,
        )
        .await;
    assert_eq!(code, 201, "{p}");
    let id = p["id"].as_str().unwrap().to_string();
    let running = api.wait_status(&id, "processing", 60).await;
    let uid = running["hearth"]["upstream_id"]
        .as_str()
        .unwrap()
        .to_string();
    f.child.kill().unwrap(); // SIGKILL
    f.child.wait().unwrap();
    drop(f);

    let _f = front(port, &dir, &u.base, &route).await;
    let done = api.wait_terminal(&id, 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["hearth"]["upstream_id"], uid.as_str());
    let up = Api::new(&u.base, UP_TOKEN);
    let theirs = up.get(&format!("/v1/predictions/{uid}")).await;
    assert_eq!(done["output"], theirs["output"]);
    assert_eq!(
        upstream_runs(&up, &long).await.len(),
        1,
        "not created again"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !calls
        .lock()
        .unwrap()
        .iter()
        .any(|(_, b)| b["id"] == id.as_str() && b["status"] == "succeeded")
    {
        assert!(
            Instant::now() < deadline,
            "no completed webhook after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(u);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A plain Cog container as the upstream (`cog+URL`): the upstream hearth's own Cog
/// API on the same port. The model's document comes from its `/openapi.json`; a
/// prediction keeps hearth's id there; output streams; a 422 is relayed; a cancel is
/// forwarded; a canary route reaches it too; and a front killed with SIGKILL during a
/// prediction attaches to it again after a restart (it ran once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cog_container_upstream_serves_every_verb_and_reattaches_after_a_restart() {
    let dir = temp("cog");
    let u = upstream(&dir).await;
    let token_file = dir.join("cog-token");
    std::fs::write(&token_file, format!("{UP_TOKEN}\n")).unwrap();
    let cog_up = format!("cogup=cog+{}", u.base);
    let token_arg = format!("cogup={}", token_file.display());
    let extra = [
        "--upstream",
        cog_up.as_str(),
        "--upstream-token-file",
        token_arg.as_str(),
        "--route",
        "acme/cogged=upstream:cogup",
        "--route",
        "hearth/demo=canary:cogup:100",
    ];
    let mut f = front(0, &dir, &u.base, &extra).await;
    let port = f.port();
    let api = Api::new(&f.base, FRONT_TOKEN);
    let up = Api::new(&u.base, UP_TOKEN);

    // The document and version come from the container's schema.
    let doc = api.get("/v1/models/acme/cogged").await;
    assert_eq!(doc["name"], "cogged", "{doc}");
    let version = doc["latest_version"]["id"].as_str().unwrap().to_string();
    assert_eq!(version.len(), 64);
    assert!(
        doc["latest_version"]["openapi_schema"]["components"]["schemas"]["Output"].is_object(),
        "{doc}"
    );
    let v = api
        .get(&format!("/v1/models/acme/cogged/versions/{version}"))
        .await;
    assert_eq!(v["id"], version.as_str());

    // Create and wait: the container runs it under hearth's id, once (short ones:
    // tests/upstream_robust.rs).
    let inp = input("cog", 200);
    let (code, p) = api
        .create("acme/cogged", json!({"input": inp}), Some("wait=60"))
        .await;
    assert_eq!(code, 201, "{p}");
    assert_eq!(p["status"], "succeeded", "{p}");
    assert_eq!(p["hearth"]["side"], "upstream", "{p}");
    assert_eq!(p["hearth"]["upstream"], "cogup");
    assert_eq!(p["version"], version.as_str(), "{p}");
    let id = p["id"].as_str().unwrap();
    assert_eq!(p["hearth"]["upstream_id"], id);
    let theirs = up.get(&format!("/v1/predictions/{id}")).await;
    assert_eq!(theirs["source"], "cog", "{theirs}");
    assert_eq!(p["output"], theirs["output"]);
    assert!(!p["output"].as_array().unwrap().is_empty());
    assert_eq!(upstream_runs(&up, &inp).await.len(), 1);

    // Streamed: output deltas then done, equal to the stored output.
    let (_, p) = api
        .create(
            "acme/cogged",
            json!({"input": input("cogstream", 40)}),
            None,
        )
        .await;
    let sse = api
        .http
        .get(p["urls"]["stream"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<(String, String)> = sse
        .split("\n\n")
        .filter_map(|b| {
            let ev = b.lines().find_map(|l| l.strip_prefix("event:"))?.trim();
            let data: Vec<&str> = b
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            Some((ev.to_string(), data.join("\n")))
        })
        .collect();
    assert_eq!(events.last().unwrap().0, "done", "{sse}");
    let streamed: String = events
        .iter()
        .filter(|(e, _)| e == "output")
        .map(|(_, d)| d.as_str())
        .collect();
    let done = api.wait_terminal(p["id"].as_str().unwrap(), 60).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let joined: String = done["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(streamed, joined, "{sse}");

    // The container's schema is hearth's to check: a wrong type is hearth's 422,
    // and the container never sees it.
    let bad = json!({"prompt": format!("cogbad {}", rand::random::<u64>()), "max_tokens": "many"});
    let (code, body) = api.create("acme/cogged", json!({"input": bad}), None).await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("input.max_tokens: expected integer, got string"),
        "{body}"
    );
    assert!(upstream_runs(&up, &bad).await.is_empty());
    // What the schema cannot say: the container's 422 reaches the caller unchanged.
    let (code, body) = api
        .create(
            "acme/cogged",
            json!({"input": {"prompt": "x", "json_schema": "{not json"}}),
            None,
        )
        .await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(
        body["detail"][0]["loc"],
        json!(["body", "input", "json_schema"]),
        "{body}"
    );

    // A canary at 100% sends the local model's creates there too.
    let (code, p) = api
        .create(
            "hearth/demo",
            json!({"input": input("cogcanary", 200)}),
            Some("wait=60"),
        )
        .await;
    assert_eq!(code, 201, "{p}");
    assert_eq!(p["status"], "succeeded", "{p}");
    assert_eq!(p["hearth"]["upstream"], "cogup", "{p}");

    // Cancel is forwarded.
    let long = json!({"prompt": format!("cogcancel {}", rand::random::<u64>()), "max_tokens": 8000, "ignore_eos": true});
    let (_, p) = api
        .create("acme/cogged", json!({"input": long}), None)
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    api.wait_status(&id, "processing", 60).await;
    api.http
        .post(format!("{}/v1/predictions/{id}/cancel", f.base))
        .bearer_auth(FRONT_TOKEN)
        .send()
        .await
        .unwrap();
    let c = api.wait_terminal(&id, 60).await;
    assert_eq!(c["status"], "canceled", "{c}");
    assert_eq!(up.wait_terminal(&id, 60).await["status"], "canceled");

    // SIGKILL mid-prediction: the container runs on; after the restart hearth attaches
    // to it again, and it completes once, with its completed webhook.
    let (hook, calls) = receiver().await;
    let long = json!({"prompt": format!("cogrestart {}", rand::random::<u64>()), "max_tokens": 3000, "ignore_eos": true});
    let (code, p) = api
        .create(
            "acme/cogged",
            json!({"input": long, "webhook": hook, "webhook_events_filter": ["completed"]}),
            None,
        )
        .await;
    assert_eq!(code, 201, "{p}");
    let id = p["id"].as_str().unwrap().to_string();
    api.wait_status(&id, "processing", 60).await;
    f.child.kill().unwrap();
    f.child.wait().unwrap();
    drop(f);
    let f = front(port, &dir, &u.base, &extra).await;
    let done = api.wait_terminal(&id, 180).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(
        done["logs"]
            .as_str()
            .unwrap()
            .contains("Resumed after a restart"),
        "{done}"
    );
    let theirs = up.get(&format!("/v1/predictions/{id}")).await;
    assert_eq!(done["output"], theirs["output"]);
    assert_eq!(upstream_runs(&up, &long).await.len(), 1, "ran once");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !calls
        .lock()
        .unwrap()
        .iter()
        .any(|(_, b)| b["id"] == id.as_str() && b["status"] == "succeeded")
    {
        assert!(
            Instant::now() < deadline,
            "no completed webhook after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(&f.log).unwrap();
    assert!(!log.contains(UP_TOKEN));
    drop(f);
    drop(u);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Upstreams and routes from the model cards alone: an upstream-only card (no
/// weights) routed to an upstream a card declares, its token from the card's
/// token file; never in the front's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_cards_declare_upstreams_and_routes() {
    let dir = temp("cards");
    let u = upstream(&dir).await;
    let cards = dir.join("front-cards");
    std::fs::create_dir_all(&cards).unwrap();
    std::fs::write(cards.join("token"), format!("{UP_TOKEN}\n")).unwrap();
    std::fs::write(
        cards.join("a.toml"),
        "name = \"hearth/demo\"\nmodel = \"demo\"\n",
    )
    .unwrap();
    std::fs::write(
        cards.join("b.toml"),
        format!(
            "name = \"acme/remote\"\nroute = \"upstream:carded\"\n[upstream.carded]\nurl = \"{}\"\ntoken_file = \"token\"\n",
            u.base
        ),
    )
    .unwrap();
    let args: Vec<String> = vec![
        "--models".into(),
        cards.display().to_string(),
        "--data-dir".into(),
        dir.join("front-data").display().to_string(),
        "--api-token".into(),
        FRONT_TOKEN.into(),
    ];
    let f = spawn(0, &args, &[], &dir.join("front.log")).await;
    let api = Api::new(&f.base, FRONT_TOKEN);
    let (code, p) = api
        .create(
            "acme/remote",
            json!({"input": input("carded", 8)}),
            Some("wait=60"),
        )
        .await;
    assert_eq!(code, 201, "{p}");
    assert_eq!(p["status"], "succeeded", "{p}");
    assert_eq!(p["hearth"]["upstream"], "carded", "{p}");
    let (code, p) = api
        .create(
            "hearth/demo",
            json!({"input": input("local", 4)}),
            Some("wait=60"),
        )
        .await;
    assert_eq!(code, 201, "{p}");
    assert!(
        p.get("hearth").is_none() || p["hearth"]["side"] != "upstream",
        "{p}"
    );
    let log = std::fs::read_to_string(&f.log).unwrap();
    assert!(!log.contains(UP_TOKEN));
    drop(f);
    drop(u);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A minimal Replicate-compatible upstream that answers every create with file
/// outputs it serves itself (a small PNG and a file over the front's mirror limit),
/// recording the inputs it was sent.
async fn file_upstream() -> (String, Arc<Mutex<Vec<Value>>>) {
    use axum::extract::State;
    use axum::routing::{get, post};
    let inputs: Arc<Mutex<Vec<Value>>> = Default::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let prediction = {
        let base = base.clone();
        move |id: &str| {
            json!({"id": id, "model": "acme/files", "version": "v", "status": "succeeded",
                "input": {}, "logs": "", "error": null,
                "output": [format!("{base}/out/pic.png"), format!("{base}/out/big.bin")],
                "created_at": "2026-01-01T00:00:00Z", "started_at": "2026-01-01T00:00:00Z",
                "completed_at": "2026-01-01T00:00:01Z", "metrics": {"predict_time": 1.0}})
        }
    };
    let p1 = prediction.clone();
    let app = axum::Router::new()
        .route(
            "/v1/models/acme/files/predictions",
            post(
                move |State(seen): State<Arc<Mutex<Vec<Value>>>>, body: axum::Json<Value>| {
                    let p = p1("up1");
                    async move {
                        seen.lock().unwrap().push(body.0["input"].clone());
                        (axum::http::StatusCode::CREATED, axum::Json(p))
                    }
                },
            ),
        )
        .route(
            "/v1/predictions/{id}",
            get(
                move |axum::extract::Path(id): axum::extract::Path<String>| {
                    let p = prediction(&id);
                    async move { axum::Json(p) }
                },
            ),
        )
        .route(
            "/out/pic.png",
            get(|| async {
                (
                    [("content-type", "image/png")],
                    b"\x89PNG-not-really".to_vec(),
                )
            }),
        )
        .route(
            "/out/big.bin",
            get(|| async {
                (
                    [("content-type", "application/octet-stream")],
                    vec![7u8; 300_000],
                )
            }),
        )
        .with_state(inputs.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, inputs)
}

/// File inputs reach the upstream inlined (a hearth file URL as a data URL; a data URL
/// as it is); with --mirror-upstream-files the upstream's file outputs are copied into
/// hearth's store (content type kept, over the size limit left as they are), and a
/// front whose guard refuses private addresses leaves them as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_inputs_are_inlined_and_file_outputs_mirrored() {
    let dir = temp("files");
    let (up_base, inputs) = file_upstream().await;
    let route = [
        "--route",
        "acme/files=upstream:up",
        "--mirror-upstream-files",
        "--mirror-upstream-max-bytes",
        "200KB",
    ];
    let f = front(0, &dir, &up_base, &route).await;
    let api = Api::new(&f.base, FRONT_TOKEN);
    let form = reqwest::multipart::Form::new().part(
        "content",
        reqwest::multipart::Part::bytes(b"hello pixels".to_vec())
            .file_name("in.png")
            .mime_str("image/png")
            .unwrap(),
    );
    let file: Value = api
        .http
        .post(format!("{}/v1/files", f.base))
        .bearer_auth(FRONT_TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let file_url = file["urls"]["get"].as_str().unwrap().to_string();
    let data_url = "data:text/plain;base64,aGk=";
    let (code, p) = api
        .create(
            "acme/files",
            json!({"input": {"image": file_url, "mask": data_url, "n": 2}}),
            Some("wait=60"),
        )
        .await;
    assert_eq!(code, 201, "{p}");
    assert_eq!(p["status"], "succeeded", "{p}");
    // The upstream got the file's bytes, not a URL only hearth can read.
    let sent = inputs.lock().unwrap()[0].clone();
    assert_eq!(
        sent["image"], "data:image/png;base64,aGVsbG8gcGl4ZWxz",
        "{sent}"
    );
    assert_eq!(sent["mask"], data_url);
    assert_eq!(sent["n"], 2);
    // hearth's record keeps what the caller sent.
    assert_eq!(p["input"]["image"], file_url.as_str());
    // The inline budget is per input, not per file: two URLs to one 5 MiB file are
    // refused at the second, and nothing reaches the upstream.
    let big = reqwest::multipart::Form::new().part(
        "content",
        reqwest::multipart::Part::bytes(vec![7u8; 5 << 20])
            .file_name("big.bin")
            .mime_str("application/octet-stream")
            .unwrap(),
    );
    let big: Value = api
        .http
        .post(format!("{}/v1/files", f.base))
        .bearer_auth(FRONT_TOKEN)
        .multipart(big)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let big_url = big["urls"]["get"].as_str().unwrap().to_string();
    let sent_before = inputs.lock().unwrap().len();
    let (code, body) = api
        .create(
            "acme/files",
            json!({"input": {"frames": [big_url, big_url], "n": 1}}),
            None,
        )
        .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("input.frames.1"),
        "{body}"
    );
    assert_eq!(inputs.lock().unwrap().len(), sent_before);
    // The small output is hearth's copy now; the big one kept its URL, saying why.
    let out = p["output"].as_array().unwrap();
    let copy = out[0].as_str().unwrap();
    assert!(copy.starts_with(&format!("{}/v1/files/", f.base)), "{p}");
    let resp = api
        .http
        .get(copy)
        .bearer_auth(FRONT_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "image/png");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), b"\x89PNG-not-really");
    assert_eq!(out[1], format!("{up_base}/out/big.bin"));
    assert!(
        p["logs"]
            .as_str()
            .unwrap()
            .contains("mirror-upstream-max-bytes"),
        "{p}"
    );
    drop(f);

    // The same with the guard on (no --webhook-allow-private): nothing private is fetched.
    let args: Vec<String> = [
        "--data-dir",
        &dir.join("front2").display().to_string(),
        "--api-token",
        FRONT_TOKEN,
        "--upstream",
        &format!("up={up_base}"),
        "--route",
        "acme/files=upstream:up",
        "--mirror-upstream-files",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let f = spawn(0, &args, &[], &dir.join("front2.log")).await;
    let api = Api::new(&f.base, FRONT_TOKEN);
    let (_, p) = api
        .create("acme/files", json!({"input": {"n": 1}}), Some("wait=60"))
        .await;
    assert_eq!(p["status"], "succeeded", "{p}");
    assert_eq!(p["output"][0], format!("{up_base}/out/pic.png"), "{p}");
    assert!(p["logs"].as_str().unwrap().contains("non-public"), "{p}");
    drop(f);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_route_serves_callers_locally_and_its_comparison_adds_up() {
    use hearth_server::upstream::route::canary_goes_upstream;
    use hearth_server::upstream::stats::text_similarity;
    use std::sync::atomic::Ordering;

    const N: usize = 240;
    const MAX_CONCURRENT: usize = 4;
    let dir = temp("shadow");
    let u = upstream(&dir).await;
    let proxy = FaultProxy::start(&u.base).await;
    let f = front(
        0,
        &dir,
        &proxy.url,
        &[
            "--route",
            "hearth/demo=shadow:up:50",
            "--shadow-max-concurrent",
            &MAX_CONCURRENT.to_string(),
            "--shadow-max-per-minute",
            "100000",
        ],
    )
    .await;
    let api = Arc::new(Api::new(&f.base, FRONT_TOKEN));
    let up = Api::new(&u.base, UP_TOKEN);

    // The comparison is for the token holder only.
    for token in [None, Some("wrong")] {
        let mut r = api.http.get(format!("{}/v1/hearth/compare", f.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        assert_eq!(r.send().await.unwrap().status(), 401);
    }

    // A few hundred creates from 12 callers, each with a webhook for its end.
    let (hook, calls) = receiver().await;
    let tag = format!("shadow{}", rand::random::<u32>());
    let mut tasks = Vec::new();
    for w in 0..12 {
        let (api, hook, tag) = (api.clone(), hook.clone(), tag.clone());
        tasks.push(tokio::spawn(async move {
            let mut ended = Vec::new();
            for i in (w..N).step_by(12) {
                let mut inp = input(&format!("{tag} {i}"), 3);
                inp["prompt"] = json!(format!("{tag} {i} {}", rand::random::<u32>()));
                let (code, p) = api
                    .create(
                        "hearth/demo",
                        json!({"input": inp, "webhook": hook, "webhook_events_filter": ["completed"]}),
                        Some("wait=60"),
                    )
                    .await;
                assert_eq!(code, 201, "{p}");
                ended.push(api.wait_terminal(p["id"].as_str().unwrap(), 120).await);
            }
            ended
        }));
    }
    let mut ended = Vec::new();
    for t in tasks {
        ended.extend(t.await.unwrap());
    }
    assert_eq!(ended.len(), N);
    // Callers see their local prediction only.
    for p in &ended {
        assert_eq!(p["status"], "succeeded", "{p}");
        assert_eq!(p["hearth"]["side"], "local", "{p}");
        assert_eq!(p["hearth"]["reason"], "shadow", "{p}");
        assert!(p["hearth"].get("upstream_id").is_none(), "{p}");
        assert!(!p["output"].as_array().unwrap().is_empty(), "{p}");
    }
    let shadowed = ended
        .iter()
        .filter(|p| canary_goes_upstream(p["id"].as_str().unwrap(), 50))
        .count();
    assert!(shadowed > N / 4 && shadowed < 3 * N / 4, "{shadowed}");

    let m = api.settled_compare("hearth/demo", N, 180).await;
    let local = &m["sides"]["local"];
    let shadow_side = &m["sides"]["upstream"];
    let sh = &m["shadow"];
    let n = |v: &Value| v.as_u64().unwrap() as usize;
    // Every create counted once on the primary side; the shadowed share is exactly
    // the copies sent plus those skipped; every copy sent ended on the shadow side.
    assert_eq!(n(&local["count"]), N, "{m}");
    assert_eq!(n(&local["succeeded"]), N, "{m}");
    assert_eq!(n(&sh["eligible"]), shadowed, "{m}");
    assert_eq!(n(&sh["copies"]) + n(&sh["skipped_total"]), shadowed, "{m}");
    assert_eq!(n(&shadow_side["count"]), n(&sh["copies"]), "{m}");
    assert_eq!(n(&sh["agreement"]["pairs"]), n(&sh["copies"]), "{m}");
    // The cap was reached (copies take at least a poll interval; callers come faster)
    // and the skipped ones are counted as such.
    assert!(n(&sh["skipped"]["concurrency"]) > 0, "{m}");
    assert_eq!(
        n(&sh["skipped_total"]),
        n(&sh["skipped"]["concurrency"]),
        "{m}"
    );
    assert!(n(&sh["copies"]) > 0, "{m}");
    // The upstream got exactly the copies, with the callers' inputs, never more than
    // the cap at once (a copy holds its place from before its create to its end).
    let creates = proxy.creates.load(Ordering::SeqCst);
    assert_eq!(creates, n(&sh["copies"]), "{m}");
    let mut theirs = Vec::new();
    let mut url = "/v1/predictions".to_string();
    loop {
        let page = up.get(&url).await;
        theirs.extend(
            page["results"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| {
                    p["input"]["prompt"]
                        .as_str()
                        .is_some_and(|s| s.starts_with(&tag))
                })
                .cloned(),
        );
        match page["next"].as_str() {
            Some(next) => url = next.trim_start_matches(&u.base).to_string(),
            None => break,
        }
    }
    assert_eq!(theirs.len(), creates, "upstream runs vs copies");
    let inputs: Vec<&Value> = ended.iter().map(|p| &p["input"]).collect();
    assert!(theirs.iter().all(|t| inputs.contains(&&t["input"])));
    // hearth writes every timestamp as RFC 3339 UTC with microseconds: as text they
    // sort as times (an end before a start at the same instant).
    let t = |s: &Value| s.as_str().unwrap().to_string();
    let mut edges: Vec<(String, i32)> = theirs
        .iter()
        .flat_map(|p| [(t(&p["created_at"]), 1), (t(&p["completed_at"]), -1)])
        .collect();
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    assert!(most as usize <= MAX_CONCURRENT, "{most} copies ran at once");

    // Agreement: the listed pairs are the right ones (ours and theirs by id).
    let pairs = sh["recent_pairs"].as_array().unwrap();
    assert!(!pairs.is_empty(), "{m}");
    for pair in pairs {
        let ours = api
            .get(&format!("/v1/predictions/{}", pair["id"].as_str().unwrap()))
            .await;
        let uid = pair["upstream_id"].as_str().unwrap();
        let other = up.get(&format!("/v1/predictions/{uid}")).await;
        assert_eq!(other["input"], ours["input"], "{pair}");
        let text = |p: &Value| -> String {
            p["output"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap())
                .collect()
        };
        let (a, b) = (text(&ours), text(&other));
        assert_eq!(pair["exact"], a == b, "{pair}");
        let sim = pair["similarity"].as_f64().unwrap();
        assert!((sim - text_similarity(&a, &b)).abs() < 1e-9, "{pair}");
        // A copy is not a caller's prediction: the front does not know its id.
        let r = api
            .http
            .get(format!("{}/v1/predictions/{uid}", f.base))
            .bearer_auth(FRONT_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{pair}");
    }
    let ag = &sh["agreement"];
    assert_eq!(n(&ag["compared"]), n(&ag["pairs"]), "{m}");
    assert_eq!(n(&ag["text"]["pairs"]), n(&ag["compared"]), "{m}");
    assert!(n(&ag["exact"]) <= n(&ag["compared"]));
    assert!(local["latency_seconds"]["p50"].as_f64().unwrap() > 0.0);
    assert!(shadow_side["latency_seconds"]["p99"].as_f64().unwrap() > 0.0);
    assert!(local["output_tokens_per_second"]["p50"].as_f64().unwrap() > 0.0);

    // Only the callers' predictions are listed, and each caller's webhook came once,
    // for its own prediction.
    let listed = api.listed_with_tag(&tag).await;
    assert_eq!(listed.len(), N);
    assert!(listed.iter().all(|p| p["hearth"]["side"] == "local"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while calls.lock().unwrap().len() < N {
        assert!(Instant::now() < deadline, "webhooks missing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hooks = calls.lock().unwrap().clone();
    assert_eq!(hooks.len(), N);
    let mut ids: Vec<&str> = hooks
        .iter()
        .map(|(_, b)| b["id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    let mut want: Vec<&str> = ended.iter().map(|p| p["id"].as_str().unwrap()).collect();
    want.sort();
    assert_eq!(ids, want);

    // The same figures in /metrics (no token there) and from `hearth compare`.
    let metrics = api.text("/metrics").await;
    assert!(
        metrics.contains(&format!(
            "hearth_compare_predictions_total{{model=\"hearth/demo\",side=\"local\",outcome=\"succeeded\"}} {N}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "hearth_compare_shadow_copies_total{{model=\"hearth/demo\",result=\"sent\"}} {creates}"
    )));
    assert!(!metrics.contains(UP_TOKEN) && !metrics.contains(FRONT_TOKEN));
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["compare", "--url", &f.base])
        .env("HEARTH_API_TOKEN", FRONT_TOKEN)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("hearth/demo  (route shadow:up:50)"), "{text}");
    assert!(
        text.contains(&format!(
            "{shadowed} eligible = {creates} sent + {} skipped",
            shadowed - creates
        )),
        "{text}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["compare", "--url", &f.base])
        .env_remove("HEARTH_API_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    drop(f);

    // A per-minute cap: at 100% and 5 a minute, the 6th copy of a minute is skipped.
    let f = front(
        0,
        &dir,
        &proxy.url,
        &[
            "--route",
            "hearth/demo=shadow:up:100",
            "--shadow-max-per-minute",
            "5",
            "--shadow-max-concurrent",
            "100",
        ],
    )
    .await;
    let api = Api::new(&f.base, FRONT_TOKEN);
    let started = Instant::now();
    for i in 0..20 {
        let (code, p) = api
            .create(
                "hearth/demo",
                json!({"input": input(&format!("minute {i}"), 3)}),
                Some("wait=60"),
            )
            .await;
        assert_eq!(code, 201, "{p}");
        api.wait_terminal(p["id"].as_str().unwrap(), 120).await;
    }
    let minutes = started.elapsed().as_secs() / 60 + 1;
    let m = api.settled_compare("hearth/demo", 20, 180).await;
    let sh = &m["shadow"];
    assert_eq!(n(&sh["eligible"]), 20, "{m}");
    assert_eq!(n(&sh["copies"]) + n(&sh["skipped"]["rate"]), 20, "{m}");
    assert!(n(&sh["copies"]) as u64 <= 5 * minutes, "{m}");
    assert!(n(&sh["copies"]) >= 1, "{m}");
    drop(f);

    // A canary route is compared too: each create counted once, on the side that ran it.
    let f = front(
        0,
        &dir,
        &proxy.url,
        &["--route", "hearth/demo=canary:up:50"],
    )
    .await;
    let api = Api::new(&f.base, FRONT_TOKEN);
    let mut went_up = 0;
    for i in 0..16 {
        let (code, p) = api
            .create(
                "hearth/demo",
                json!({"input": input(&format!("canary {i}"), 3)}),
                Some("wait=60"),
            )
            .await;
        assert_eq!(code, 201, "{p}");
        let p = api.wait_terminal(p["id"].as_str().unwrap(), 120).await;
        went_up += usize::from(p["hearth"]["side"] == "upstream");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let m = loop {
        let c = api.get("/v1/hearth/compare").await;
        let m = c["models"][0].clone();
        let ended = n(&m["sides"]["local"]["count"]) + n(&m["sides"]["upstream"]["count"]);
        if ended == 16 || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(m["route"], "canary:up:50", "{m}");
    assert_eq!(n(&m["sides"]["upstream"]["count"]), went_up, "{m}");
    assert_eq!(n(&m["sides"]["local"]["count"]), 16 - went_up, "{m}");
    assert!(m.get("shadow").is_none(), "{m}");
    drop(f);
    drop(u);
    let _ = std::fs::remove_dir_all(&dir);
}
