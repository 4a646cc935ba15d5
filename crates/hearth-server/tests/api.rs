//! The real server, on a free port, with the demo model, driven over HTTP.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_runtime::EngineConfig;
use serde_json::{json, Value};
use support::{long_job, parse_sse, start, start_with, TOKEN};

#[tokio::test]
async fn wait_get_list_and_metrics_of_a_finished_prediction() {
    let s = start(1 << 20).await;
    let (status, p) = s
        .create(
            json!({"prompt": "Hello", "max_tokens": 12, "seed": 3}),
            Some("wait"),
        )
        .await;
    assert_eq!(status, 201, "{p}");
    assert_eq!(p["status"], "succeeded", "{p}");
    for k in ["id", "model", "version"] {
        assert!(p[k].is_string(), "{k} in {p}");
    }
    assert_eq!(p["model"], "hearth/demo");
    let m = &p["metrics"];
    for k in [
        "predict_time",
        "total_time",
        "input_token_count",
        "output_token_count",
        "time_to_first_token",
        "tokens_per_second",
    ] {
        assert!(m[k].is_number(), "metrics.{k} in {p}");
    }
    assert!(m["output_token_count"].as_u64().unwrap() >= 1);
    assert!(p["output"].is_array());
    assert!(p["logs"].as_str().unwrap().contains("Generated"));
    for (k, v) in p["urls"].as_object().unwrap() {
        assert!(v.as_str().unwrap().starts_with(&s.base), "urls.{k} = {v}");
    }
    let id = p["id"].as_str().unwrap();
    let got: Value = s
        .get(&format!("/v1/predictions/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["output"], p["output"]);
    let list: Value = s
        .get("/v1/predictions")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["results"][0]["id"], id);
    let metrics = s
        .client
        .get(format!("{}/metrics", s.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:generation_tokens",
        "hearth:http_requests",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test]
async fn pagination_follows_absolute_next_urls_newest_first() {
    let s = start(1 << 20).await;
    let mut ids = Vec::new();
    for i in 0..101 {
        let (st, p) = s
            .create(
                json!({"prompt": format!("p{i}"), "max_tokens": 1}),
                Some("wait"),
            )
            .await;
        assert_eq!(st, 201);
        ids.push(p["id"].as_str().unwrap().to_string());
    }
    let first: Value = s
        .get("/v1/predictions")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["results"].as_array().unwrap().len(), 100);
    assert_eq!(first["results"][0]["id"], ids[100].as_str());
    let next = first["next"].as_str().expect("a next page");
    assert!(
        next.starts_with(&format!("{}/v1/predictions?cursor=", s.base)),
        "{next}"
    );
    let second: Value = s
        .client
        .get(next)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(second["results"].as_array().unwrap().len(), 1);
    assert_eq!(second["results"][0]["id"], ids[0].as_str());
    assert!(second["next"].is_null());
    let after = s
        .get("/v1/predictions?created_after=2999-01-01T00:00:00Z")
        .send()
        .await
        .unwrap();
    let after: Value = after.json().await.unwrap();
    assert_eq!(after["results"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn prefer_wait_times_out_as_starting_and_cancel_returns_the_whole_prediction() {
    let s = start(1 << 20).await;
    let t = Instant::now();
    let (status, p) = s.create(long_job(), Some("wait=1")).await;
    let took = t.elapsed();
    assert_eq!(status, 201);
    assert_eq!(p["status"], "starting", "{p}");
    // Answered once the 1 s wait ran out, not at the job's end (which "starting" rules
    // out too) nor at the longest wait (60 s): the upper bound is that, not a speed
    // (0.5 s, then 5 s past the wait were too little for a loaded 2-core machine).
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(30),
        "answered after {took:?}"
    );
    let id = p["id"].as_str().unwrap();
    // Cancel with no body and no content type, as the Python client sends it.
    let c = s
        .post(&format!("/v1/predictions/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(c.status().as_u16(), 200);
    let c: Value = c.json().await.unwrap();
    assert_eq!(c["status"], "canceled", "{c}");
    assert_eq!(c["id"], id);
    assert!(c["urls"]["get"].is_string());
    let bad = s.create(json!({"prompt": "x"}), Some("wait=soon")).await;
    assert_eq!(bad.0, 400);
    // Over 60 is clamped, not refused: clients pass the app's number through.
    let r = s
        .post("/v1/models/hearth/demo/predictions")
        .header("Prefer", "wait=120")
        .json(&json!({"input": {"prompt": "x", "max_tokens": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    assert_eq!(r.headers()["preference-applied"], "wait=60");
    assert!(r.json::<Value>().await.unwrap()["status"].as_str().unwrap() != "starting");
}

#[tokio::test]
async fn bad_input_is_a_422_naming_the_field_and_unknowns_are_404s() {
    let s = start(1 << 20).await;
    let (st, e) = s
        .create(json!({"prompt": "x", "max_tokens": "lots"}), None)
        .await;
    assert_eq!(st, 422);
    assert!(e["detail"].as_str().unwrap().contains("max_tokens"), "{e}");
    assert_eq!(e["status"], 422);
    let (st, e) = s
        .create(json!({"prompt": "x", "max_tokens": 100000}), None)
        .await;
    assert_eq!(st, 422, "{e}");
    assert!(e["detail"].as_str().unwrap().contains("context"), "{e}");
    let r = s
        .post("/v1/models/nobody/nothing/predictions")
        .json(&json!({"input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = s
        .post("/v1/predictions")
        .json(&json!({"version": "c".repeat(64), "input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(
        s.get("/v1/predictions/nope")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    // A hosted name and version mapped onto the local model.
    let r = s
        .post("/v1/predictions")
        .json(&json!({"version": "b".repeat(64), "input": {"prompt": "x", "max_tokens": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let r = s
        .post("/v1/models/meta/meta-llama-3-8b-instruct/predictions")
        .json(&json!({"input": {"max_tokens": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    // Malformed JSON and wrong shapes are problems with a detail, never a panic.
    let r = s
        .post("/v1/models/hearth/demo/predictions")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.json::<Value>().await.unwrap()["detail"]
        .as_str()
        .unwrap()
        .contains("malformed JSON"));
    let r = s
        .post("/v1/models/hearth/demo/predictions")
        .json(&json!({"input": [1]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let r = s
        .post("/v1/models/hearth/demo/predictions")
        .json(&json!({"input": {}, "webhook": "ftp://x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
}

#[tokio::test]
async fn auth_oversize_bodies_and_garbage_on_the_socket() {
    let s = start(4096).await;
    let r = s
        .client
        .get(format!("{}/v1/predictions", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["detail"],
        "You did not pass a valid authentication token"
    );
    let r = s
        .client
        .get(format!("{}/v1/account", s.base))
        .header("Authorization", format!("Token {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = s
        .client
        .get(format!("{}/v1/account", s.base))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let big = json!({"input": {"prompt": "x".repeat(10_000)}});
    let r = s
        .post("/v1/models/hearth/demo/predictions")
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    assert!(r.json::<Value>().await.unwrap()["detail"].is_string());
    // Garbage bytes: the connection is refused politely and the server lives on.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(s.base.trim_start_matches("http://"))
        .await
        .unwrap();
    sock.write_all(b"\x00\xff\x13garbage\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), sock.read_to_end(&mut buf)).await;
    let r = s.get("/v1/account").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn sse_stream_has_ids_replays_after_the_end_and_resumes_from_last_event_id() {
    let s = start(1 << 20).await;
    let (_, p) = s
        .create(
            json!({"prompt": "stream me", "max_tokens": 40, "ignore_eos": true, "temperature": 0}),
            None,
        )
        .await;
    let url = p["urls"]["stream"].as_str().unwrap().to_string();
    // No Authorization header: the JS client sends none here.
    let r = s
        .client
        .get(&url)
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = parse_sse(&r.text().await.unwrap());
    let (last, rest) = events.split_last().unwrap();
    assert_eq!(last.0, "done");
    assert_eq!(last.2, "{}");
    assert!(events
        .iter()
        .all(|e| !e.1.is_empty() && ["output", "done"].contains(&e.0.as_str())));
    let streamed: String = rest.iter().map(|e| e.2.as_str()).collect();
    let id = p["id"].as_str().unwrap();
    let done: Value = s
        .get(&format!("/v1/predictions/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let joined: String = done["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(streamed, joined);
    // After the end: replay, and resume after an id.
    let again = parse_sse(
        &s.client
            .get(&url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(again, events);
    let resumed = parse_sse(
        &s.client
            .get(&url)
            .header("Last-Event-ID", &events[2].1)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(resumed, events[3..].to_vec());
    let wrong = url.rsplit_once('/').unwrap().0.to_string() + "/0000";
    assert_eq!(
        s.client.get(&wrong).send().await.unwrap().status().as_u16(),
        404
    );
}

#[tokio::test]
async fn webhooks_are_filtered_signed_and_carry_the_prediction() {
    use axum::routing::post;
    let s = start(1 << 20).await;
    let got: Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, String)>>> = Default::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |h: axum::http::HeaderMap, body: String| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push((h, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let secret: Value = s
        .get("/v1/webhooks/default/secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = secret["key"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    let r = s
        .post("/v1/models/hearth/demo/predictions")
        .json(&json!({"input": {"prompt": "hook", "max_tokens": 5}, "webhook": hook, "webhook_events_filter": ["completed"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no webhook arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = got.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "only `completed` was asked for");
    let (h, body) = &calls[0];
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["status"], "succeeded");
    let signer = hearth_server::webhook::Webhooks::with_secret(secret).unwrap();
    let id = h["webhook-id"].to_str().unwrap();
    let ts: i64 = h["webhook-timestamp"].to_str().unwrap().parse().unwrap();
    assert_eq!(
        h["webhook-signature"].to_str().unwrap(),
        signer.sign(id, ts, body)
    );
}

#[tokio::test]
async fn cog_container_api_runs_sync_async_and_reports_validation_errors() {
    let s = start(1 << 20).await;
    let idx: Value = s
        .client
        .get(&s.base)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(idx["predictions_url"], "/predictions");
    let h: Value = s
        .client
        .get(format!("{}/health-check", s.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "READY");
    let schema: Value = s
        .client
        .get(format!("{}/openapi.json", s.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        schema["components"]["schemas"]["Output"]["x-cog-array-type"],
        "iterator"
    );
    let r = s
        .client
        .post(format!("{}/predictions", s.base))
        .bearer_auth(TOKEN)
        .json(&json!({"input": {"prompt": "cog", "max_tokens": 4}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "succeeded");
    let r = s
        .client
        .post(format!("{}/predictions", s.base))
        .bearer_auth(TOKEN)
        .header("Prefer", "respond-async")
        .json(&json!({"input": long_job()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s
        .client
        .put(format!("{}/predictions/{id}", s.base))
        .bearer_auth(TOKEN)
        .json(&json!({"input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        202,
        "an id in flight answers with its state, as Cog does"
    );
    assert_eq!(r.json::<Value>().await.unwrap()["id"], id.as_str());
    let r = s
        .client
        .post(format!("{}/predictions/{id}/cancel", s.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = s
        .client
        .post(format!("{}/predictions/nope/cancel", s.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = s
        .client
        .post(format!("{}/predictions", s.base))
        .bearer_auth(TOKEN)
        .json(&json!({"input": {"max_tokens": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        e["detail"][0]["loc"],
        json!(["body", "input", "max_tokens"])
    );
}

#[tokio::test]
async fn versions_carry_an_iterator_output_schema_with_the_inputs() {
    let s = start(1 << 20).await;
    let v: Value = s
        .get(&format!(
            "/v1/models/hearth/demo/versions/{}",
            "b".repeat(64)
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schemas = &v["openapi_schema"]["components"]["schemas"];
    assert_eq!(schemas["Output"]["type"], "array");
    assert_eq!(schemas["Output"]["x-cog-array-type"], "iterator");
    assert_eq!(schemas["Input"]["properties"]["prompt"]["x-order"], 0);
    let m: Value = s
        .get("/v1/models/hearth/demo")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["latest_version"]["id"], "a".repeat(64));
    let list: Value = s
        .get("/v1/models/hearth/demo/versions")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["results"].as_array().unwrap().len(), 1);
    let hw: Value = s
        .get("/v1/hardware")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(hw.is_array());
}

#[tokio::test]
async fn a_full_queue_is_a_429_with_retry_after() {
    let s = start_with(
        1 << 20,
        EngineConfig {
            kv_cache_memory: Some(64 << 20),
            max_num_seqs: 1,
            max_waiting: 1,
            ..Default::default()
        },
    )
    .await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..4 {
        let r = s
            .post("/v1/models/hearth/demo/predictions")
            .json(&json!({"input": long_job()}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status().as_u16() == 429 {
            retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let body: Value = r.json().await.unwrap();
            assert!(
                body["detail"].as_str().unwrap().contains("throttled"),
                "{body}"
            );
        }
    }
    // One runs, one waits; the rest are refused at once.
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(retry_after.as_deref(), Some("1"));
}

#[tokio::test]
async fn webhooks_are_retried_after_a_server_error() {
    use axum::routing::post;
    let s = start(1 << 20).await;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move || {
            let counter = counter.clone();
            async move {
                // The first delivery fails with a 503; the retry succeeds.
                if counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let r = s
        .post("/v1/models/hearth/demo/predictions")
        .json(&json!({"input": {"prompt": "retry", "max_tokens": 3}, "webhook": hook, "webhook_events_filter": ["completed"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let deadline = Instant::now() + Duration::from_secs(20);
    while calls.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "the failed webhook was not retried"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "retried after success"
    );
}
