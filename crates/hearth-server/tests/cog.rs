//! Cog's container API as Cog 0.23.1 serves it (scripts/cog-diff.sh compares the two
//! servers side by side): SSE on POST and on a PUT that attaches, Cog's shapes, every
//! invalid field with its `loc`, `Prefer: respond-async` exactly, the 409 at capacity,
//! ids with dots, and Cog-style webhooks (one per chunk, logs, `user-agent: coglet`).

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{engine_default, long_job, parse_sse, receiver, start, start_custom, TOKEN};

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    k.sort();
    k
}

fn data(e: &(String, String, String)) -> Value {
    serde_json::from_str(&e.2).unwrap()
}

#[tokio::test]
async fn sse_on_post_streams_start_chunks_logs_and_the_completed_prediction() {
    let s = start(1 << 20).await;
    let r = s
        .post("/predictions")
        .header("Accept", "text/event-stream")
        .json(&json!({"id": "sse.1", "input": {"prompt": "stream", "max_tokens": 12, "ignore_eos": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = parse_sse(&r.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names.first(), Some(&"start"), "{names:?}");
    assert_eq!(
        data(&events[0]),
        json!({"id": "sse.1", "status": "processing"})
    );
    assert_eq!(names[names.len() - 2..], ["log", "completed"], "{names:?}");
    let outputs: Vec<Value> = events
        .iter()
        .filter(|e| e.0 == "output")
        .map(data)
        .collect();
    assert!(!outputs.is_empty());
    for (i, o) in outputs.iter().enumerate() {
        assert_eq!(keys(o), ["chunk", "index"]);
        assert_eq!(o["index"], i);
    }
    let log = data(&events[events.len() - 2]);
    assert_eq!(log["source"], "stdout");
    assert!(log["data"].as_str().unwrap().contains("Generated"), "{log}");
    let done = data(events.last().unwrap());
    assert_eq!(done["status"], "succeeded");
    assert_eq!(keys(&done), ["id", "logs", "metrics", "output", "status"]);
    let streamed: Vec<Value> = outputs.iter().map(|o| o["chunk"].clone()).collect();
    assert_eq!(done["output"], json!(streamed));
    assert!(done["metrics"]["predict_time"].is_number());
}

#[tokio::test]
async fn put_attaches_to_a_prediction_in_flight_and_replays_its_stream() {
    let s = start(1 << 20).await;
    let r = s
        .post("/predictions")
        .header("Prefer", "respond-async")
        .json(&json!({"id": "job.2", "input": long_job()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"id": "job.2", "status": "starting"})
    );
    // Same id in flight: 202 with its state and input, whatever the body says.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let url = format!("{}/predictions/job.2", s.base);
    let r = s
        .client
        .put(&url)
        .bearer_auth(TOKEN)
        .json(&json!({"input": {"prompt": "other"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let state: Value = r.json().await.unwrap();
    assert_eq!(state["id"], "job.2");
    assert_eq!(state["input"], long_job());
    assert_eq!(state["metrics"], json!({}));
    assert!(["starting", "processing"].contains(&state["status"].as_str().unwrap()));
    // With Accept: text/event-stream, the events from the start; cancel ends it.
    let attach = s
        .client
        .put(&url)
        .bearer_auth(TOKEN)
        .header("Accept", "text/event-stream")
        .json(&json!({"input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(attach.status().as_u16(), 200);
    let canceler = {
        let (c, base) = (s.client.clone(), s.base.clone());
        tokio::spawn(async move {
            // Once it has output to replay (a fixed 400 ms raced a loaded machine's
            // first token: no output event before the cancel).
            support::wait_for_output(&c, &base, "job.2", 30).await;
            c.post(format!("{base}/predictions/job.2/cancel"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let events = parse_sse(&attach.text().await.unwrap());
    assert_eq!(canceler.await.unwrap(), 200);
    assert_eq!(events[0].0, "start");
    let first_output = events
        .iter()
        .find(|e| e.0 == "output")
        .expect("outputs replayed");
    assert_eq!(data(first_output)["index"], 0, "replayed from the start");
    let done = data(events.last().unwrap());
    assert_eq!(events.last().unwrap().0, "completed");
    assert_eq!(done["status"], "canceled");
    // Finished now: the id is never reused.
    let r = s
        .client
        .put(&url)
        .bearer_auth(TOKEN)
        .json(&json!({"input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "failed");
}

#[tokio::test]
async fn put_with_another_id_in_the_body_is_a_422_and_ids_may_have_dots() {
    let s = start(1 << 20).await;
    let r = s
        .client
        .put(format!("{}/predictions/p.one", s.base))
        .bearer_auth(TOKEN)
        .json(&json!({"id": "p.two", "input": {"max_tokens": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["detail"][0]["loc"], json!(["body", "id"]));
    assert_eq!(e["detail"][0]["type"], "value_error");
    let r = s
        .client
        .put(format!("{}/predictions/p.one", s.base))
        .bearer_auth(TOKEN)
        .json(&json!({"id": "p.one", "input": {"max_tokens": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["id"], "p.one");
    assert_eq!(keys(&p), ["id", "logs", "metrics", "output", "status"]);
    assert_eq!(s.prediction("p.one").await["status"], "succeeded");
}

#[tokio::test]
async fn every_invalid_field_is_listed_with_its_location() {
    let s = start(1 << 20).await;
    let post = |body: Value| {
        let r = s.post("/predictions").json(&body);
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let locs = |e: &Value| -> Vec<Value> {
        e["detail"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["loc"].clone())
            .collect()
    };
    let (st, e) =
        post(json!({"input": {"max_tokens": "x", "temperature": 9, "prompt": 5, "bogus": 1}}))
            .await;
    assert_eq!(st, 422);
    assert_eq!(
        locs(&e),
        [
            json!(["body", "input", "max_tokens"]),
            json!(["body", "input", "prompt"]),
            json!(["body", "input", "temperature"])
        ]
    );
    for d in e["detail"].as_array().unwrap() {
        assert_eq!(keys(d), ["loc", "msg", "type"]);
    }
    // Only a nullable input may be null.
    let (st, e) = post(json!({"input": {"seed": null, "prompt": null, "max_tokens": 1}})).await;
    assert_eq!(st, 422);
    assert_eq!(locs(&e), [json!(["body", "input", "prompt"])]);
    let (st, _) = post(json!({"input": {"seed": null, "max_tokens": 1}})).await;
    assert_eq!(st, 200);
    // Errors outside the input name their own place.
    let (st, e) =
        post(json!({"id": 5, "input": [1], "webhook": 7, "webhook_events_filter": ["nope"]})).await;
    assert_eq!(st, 422);
    assert_eq!(
        locs(&e),
        [
            json!(["body", "id"]),
            json!(["body", "input", "__root__"]),
            json!(["body", "webhook"]),
            json!(["body", "webhook_events_filter"])
        ]
    );
    // A missing or null input is every default, as in Cog.
    let (st, p) = post(json!({"input": null})).await;
    assert_eq!(st, 200, "{p}");
}

#[tokio::test]
async fn prefer_respond_async_must_be_exact() {
    let s = start(1 << 20).await;
    let body = json!({"input": {"max_tokens": 2}});
    let r = s
        .post("/predictions")
        .header("Prefer", "respond-async")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let b: Value = r.json().await.unwrap();
    assert_eq!(keys(&b), ["id", "status"]);
    assert_eq!(b["status"], "starting");
    for prefer in ["respond-async, wait=5", "Respond-Async", "wait=5"] {
        let r = s
            .post("/predictions")
            .header("Prefer", prefer)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{prefer}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["status"],
            "succeeded",
            "{prefer}"
        );
    }
}

#[tokio::test]
async fn all_slots_busy_is_cogs_409_and_health_says_busy() {
    let s = start_custom(engine_default(), |c| c.cog_max_concurrency = 1).await;
    let health = || async {
        s.client
            .get(format!("{}/health-check", s.base))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    assert_eq!(health().await["status"], "READY");
    let r = s
        .post("/predictions")
        .header("Prefer", "respond-async")
        .json(&json!({"id": "busy", "input": long_job()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    for (prefer, accept) in [
        (None, None),
        (Some("respond-async"), None),
        (None, Some("text/event-stream")),
    ] {
        let mut req = s
            .post("/predictions")
            .json(&json!({"input": {"max_tokens": 2}}));
        if let Some(p) = prefer {
            req = req.header("Prefer", p);
        }
        if let Some(a) = accept {
            req = req.header("Accept", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 409);
        assert_eq!(
            r.json::<Value>().await.unwrap(),
            json!({"error": "At capacity - all prediction slots busy", "status": "failed"})
        );
    }
    // Validation comes first, as in Cog; the /v1 routes are not limited.
    let r = s
        .post("/predictions")
        .json(&json!({"input": {"max_tokens": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let (st, _) = s.create(json!({"max_tokens": 2}), Some("wait")).await;
    assert_eq!(st, 201);
    assert_eq!(health().await["status"], "BUSY");
    let r = s.post("/predictions/busy/cancel").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(s.wait_terminal("busy").await["status"], "canceled");
    // The slot is free again once the prediction has ended.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while health().await["status"] != "READY" {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = s
        .post("/predictions")
        .json(&json!({"input": {"max_tokens": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn cog_webhooks_come_per_chunk_in_cogs_shape_with_logs() {
    let s = start(1 << 20).await;
    let all = receiver(0, 200).await;
    let logs_only = receiver(0, 200).await;
    let input = json!({"prompt": "hooks", "max_tokens": 40, "ignore_eos": true, "temperature": 0});
    // (A prompt of its own, under a block: no "Prefix cache" line at the start, whose
    // webhook would drop the summary's under Cog's 500 ms rule.)
    let own = json!({"prompt": "logs only", "prompt_template": "{prompt}", "max_tokens": 40, "ignore_eos": true});
    for (rx, filter, input) in [
        (&all, json!(null), &input),
        (&logs_only, json!(["logs"]), &own),
    ] {
        let r = s
            .post("/predictions")
            .json(&json!({"input": input, "webhook": rx.url, "webhook_events_filter": filter}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    // Delivered one at a time, in order: wait for the last.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while all
        .bodies()
        .last()
        .is_none_or(|b| b["status"] != "succeeded")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "webhooks missing: {:?}",
            all.bodies()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bodies = all.bodies();
    let calls = all.calls.lock().unwrap().clone();
    for (h, _) in &calls {
        assert_eq!(h["user-agent"], "coglet/0.23.1");
    }
    let (first, last) = (&bodies[0], bodies.last().unwrap());
    assert_eq!(
        keys(first),
        ["id", "logs", "metrics", "status"],
        "start: {first}"
    );
    assert_eq!(first["status"], "processing");
    assert_eq!(last["status"], "succeeded");
    assert_eq!(keys(last), ["id", "logs", "metrics", "output", "status"]);
    // One output webhook per chunk, each with the output so far: no throttling, no
    // chunk lost. (A `logs` one may come between, within Cog's 500 ms rule.)
    let chunks = last["output"].as_array().unwrap().len();
    let mut seen = 0;
    for b in &bodies[1..bodies.len() - 1] {
        assert_eq!(b["status"], "processing", "{b}");
        assert_eq!(b["metrics"], json!({}));
        let n = b["output"].as_array().unwrap().len();
        if n == seen + 1 {
            seen = n;
        } else {
            assert_eq!(n, seen, "a chunk was skipped: {b}");
        }
    }
    assert_eq!(seen, chunks, "{} output webhooks for {chunks} chunks", seen);
    // A subscriber to logs alone gets the summary line while it is still processing.
    logs_only.wait_for(1, 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = logs_only.bodies();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert_eq!(logs[0]["status"], "processing");
    assert!(
        logs[0]["logs"].as_str().unwrap().contains("Generated"),
        "{}",
        logs[0]
    );
}

/// Each output webhook of a Cog prediction carries the whole output so far: queued
/// as bodies, a long prediction would write O(tokens²) bytes to the outbox. The rows
/// hold how far it had got instead, rendered at delivery: the receiver still sees
/// the output grow chunk by chunk and the full output last.
#[tokio::test]
async fn a_long_cog_prediction_queues_small_webhook_rows_and_its_receiver_sees_it_grow() {
    let s = start(1 << 20).await;
    let rx = receiver(0, 200).await;
    let (rows_before, bytes_before) = s.state.webhooks.queued_totals();
    let tokens = 300;
    let input =
        json!({"prompt": "a long one", "max_tokens": tokens, "ignore_eos": true, "temperature": 0});
    let r = s
        .post("/predictions")
        .json(&json!({"input": input, "webhook": rx.url}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let done: Value = r.json().await.unwrap();
    assert_eq!(done["status"], "succeeded", "{done}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while rx
        .bodies()
        .last()
        .is_none_or(|b| b["status"] != "succeeded")
    {
        assert!(std::time::Instant::now() < deadline, "no completed webhook");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bodies = rx.bodies();
    let last = bodies.last().unwrap();
    assert_eq!(last["output"], done["output"]);
    let chunks = last["output"].as_array().unwrap().len();
    assert!(chunks >= tokens / 2, "{chunks} chunks");
    // Every delivery a prefix of the next (output and logs), the completed one last.
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    for w in bodies.windows(2) {
        let (a, b) = (strings(&w[0]["output"]), strings(&w[1]["output"]));
        assert!(b.starts_with(&a), "output shrank: {} then {}", w[0], w[1]);
        let (la, lb) = (
            w[0]["logs"].as_str().unwrap(),
            w[1]["logs"].as_str().unwrap(),
        );
        assert!(lb.starts_with(la), "logs shrank: {la:?} then {lb:?}");
    }
    for b in &bodies[..bodies.len() - 1] {
        assert_eq!(b["status"], "processing", "{b}");
    }
    let outputs = bodies
        .iter()
        .filter(|b| b["status"] == "processing" && b.get("output").is_some())
        .count();
    assert!(outputs >= 1, "no output webhook: {bodies:?}");
    // What went to the outbox: a row an event, each small but the start and the end.
    let (rows_after, bytes_after) = s.state.webhooks.queued_totals();
    let (rows, bytes) = (rows_after - rows_before, bytes_after - bytes_before);
    let final_body = last.to_string().len() as u64;
    assert!(rows <= chunks as u64 + 4, "{rows} rows for {chunks} chunks");
    assert!(
        bytes <= 2 * final_body + 64 * rows,
        "{bytes} bytes queued in {rows} rows for a final body of {final_body} bytes"
    );
}
