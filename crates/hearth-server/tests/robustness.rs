//! Losing nothing: webhooks that survive restarts and cannot be aimed at the host,
//! store faults that end predictions cleanly, corrupt databases that say what to do,
//! and `Cancel-After` deadlines.

mod support;

use std::time::Duration;

use hearth_runtime::EngineConfig;
use serde_json::{json, Value};
use support::{
    demo_model, engine_default, long_job, parse_sse, receiver, receiver_on, start, start_custom,
    start_in, start_with, TempDir,
};

/// One sequence runs, the rest wait: a queued prediction on demand.
fn one_at_a_time() -> EngineConfig {
    EngineConfig {
        max_num_seqs: 1,
        max_waiting: 8,
        ..engine_default()
    }
}

fn text(v: &Value) -> String {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn webhooks_to_the_host_or_its_network_are_refused() {
    let s = start_custom(engine_default(), |c| c.webhook_allow_private = false).await;
    for hook in [
        "http://127.0.0.1:9/hook",
        "http://localhost:8080/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/x",
        "http://[::1]/x",
    ] {
        let r = s
            .post("/v1/models/hearth/demo/predictions")
            .json(&json!({"input": {"prompt": "x", "max_tokens": 1}, "webhook": hook}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 422, "{hook}");
        let e: Value = r.json().await.unwrap();
        assert!(
            e["detail"].as_str().unwrap().starts_with("webhook:"),
            "{hook}: {e}"
        );
    }
}

#[tokio::test]
async fn webhooks_wait_out_a_restart_and_keep_their_id_across_retries() {
    let data = TempDir::new("outbox");
    // A receiver address with nothing listening yet: bound here (connections to it are
    // refused until it listens), so that no other socket can take the port meanwhile.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    let hook = format!("http://127.0.0.1:{port}/hook");
    let dir = data.0.clone();
    let s = start_in(data, engine_default(), |_| {}).await;
    let r = s
        .post("/v1/models/hearth/demo/predictions")
        .json(&json!({"input": {"prompt": "outbox", "max_tokens": 4}, "webhook": hook, "webhook_events_filter": ["completed"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let done = s.wait_terminal(&id).await;
    // The delivery waits in the outbox (its row is written as the prediction ends,
    // not necessarily before a reader sees it ended), kept there while the receiver
    // refuses it, and made after the restart below.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while s.state.store.outbox_len().await.unwrap() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the delivery never waited in the outbox"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.state.stop.cancel();
    let support::Server { task, data, .. } = s;
    task.await.unwrap().unwrap();
    // The receiver comes up (failing its first call) and the server restarts.
    let listener = socket.listen(1024).unwrap();
    let rx = receiver_on(listener, 1, 503).await;
    let s2 = start_in(data, engine_default(), |_| {}).await;
    assert_eq!(s2.data.0, dir);
    rx.wait_for(2, 30).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = rx.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "one failure, one success");
    assert_eq!(calls[0].0["webhook-id"], calls[1].0["webhook-id"]);
    let body: Value = serde_json::from_str(&calls[1].1).unwrap();
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["status"], done["status"]);
    assert_eq!(s2.state.store.outbox_len().await.unwrap(), 0);
}

#[tokio::test]
async fn logs_events_fire_throttled_output_coalesces_and_completed_is_last() {
    let s = start(1 << 20).await;
    let all = receiver(0, 200).await;
    let output_only = receiver(0, 200).await;
    let logs_only = receiver(0, 200).await;
    let input = json!({"prompt": "hooks", "max_tokens": 120, "ignore_eos": true, "temperature": 0});
    let mut ids = Vec::new();
    for (rx, filter) in [
        (&all, json!(null)),
        (&output_only, json!(["output"])),
        (&logs_only, json!(["logs"])),
    ] {
        let r = s
            .post("/v1/models/hearth/demo/predictions")
            .json(&json!({"input": input, "webhook": rx.url, "webhook_events_filter": filter}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut finals = Vec::new();
    for id in &ids {
        finals.push(s.wait_terminal(id).await);
    }
    // Until every delivery is made (the outbox is empty) and each subscriber has its
    // last one; a fixed 1.5 s pause raced a loaded machine's last deliveries.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ended = all
            .bodies()
            .last()
            .is_some_and(|b| b["status"] == "succeeded")
            && output_only
                .bodies()
                .last()
                .is_some_and(|b| text(&b["output"]) == text(&finals[1]["output"]))
            && !logs_only.bodies().is_empty();
        if ended && s.state.store.outbox_len().await.unwrap() == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the webhooks never all arrived: {} / {} / {}",
            all.bodies().len(),
            output_only.bodies().len(),
            logs_only.bodies().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bodies = all.bodies();
    assert!(bodies.len() >= 3, "{} calls", bodies.len());
    assert_eq!(bodies[0]["status"], "processing", "start comes first");
    assert_eq!(bodies.last().unwrap()["status"], "succeeded");
    assert_eq!(
        text(&bodies.last().unwrap()["output"]),
        text(&finals[0]["output"])
    );
    // Throttled to one every 500 ms, but the final output arrives even with no
    // `completed` subscription.
    let outs = output_only.bodies();
    assert!(!outs.is_empty());
    assert_eq!(
        text(&outs.last().unwrap()["output"]),
        text(&finals[1]["output"])
    );
    assert!(
        outs.len() < 120,
        "{} output webhooks for 120 tokens",
        outs.len()
    );
    let logs = logs_only.bodies();
    assert!(!logs.is_empty(), "no logs webhook");
    assert!(logs.last().unwrap()["logs"]
        .as_str()
        .unwrap()
        .contains("Generated"));
}

#[tokio::test]
async fn a_store_failure_fails_the_prediction_and_ends_its_readers() {
    let s = start_with(1 << 20, one_at_a_time()).await;
    let (_, a) = s.create(long_job(), None).await;
    let (_, b) = s
        .create(json!({"prompt": "queued", "max_tokens": 5}), None)
        .await;
    let b_id = b["id"].as_str().unwrap().to_string();
    let stream = b["urls"]["stream"].as_str().unwrap().to_string();
    let reader = tokio::spawn({
        let c = s.client.clone();
        async move { c.get(stream).send().await.unwrap().text().await.unwrap() }
    });
    // From now on the store refuses writes: B's start cannot be recorded.
    s.state.store.inject_write_failures(true);
    let a_id = a["id"].as_str().unwrap();
    let canceled: Value = s
        .post(&format!("/v1/predictions/{a_id}/cancel"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // A races the cancel: its own next write may fail first (then it fails for the
    // store, as B will). Either way it ends and frees the engine for B.
    let a_status = canceled["status"].as_str().unwrap().to_string();
    assert!(
        a_status == "canceled"
            || (a_status == "failed"
                && canceled["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("could not save"))),
        "{canceled}"
    );
    let bp = s.wait_terminal(&b_id).await;
    assert_eq!(bp["status"], "failed", "{bp}");
    assert!(
        bp["error"].as_str().unwrap().contains("could not save"),
        "{bp}"
    );
    assert_eq!(bp["output"], json!([]));
    let events = parse_sse(
        &tokio::time::timeout(Duration::from_secs(10), reader)
            .await
            .expect("the SSE reader was ended")
            .unwrap(),
    );
    let names: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(names[names.len() - 2..], ["error", "done"], "{names:?}");
    // Still served from memory, then written once the store works again.
    assert_eq!(s.prediction(a_id).await["status"], a_status.as_str());
    s.state.store.inject_write_failures(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stored = s.state.store.get(a_id).await.unwrap().unwrap();
        if stored.prediction.status.is_terminal() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn build_err(data: &std::path::Path) -> String {
    let cfg = hearth_server::ServerConfig::new("127.0.0.1:0".parse().unwrap(), data.to_path_buf());
    match hearth_server::build_state(cfg, vec![demo_model(engine_default())]).await {
        Ok(_) => panic!("started on a bad database"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn a_corrupt_or_newer_database_is_a_clear_startup_error() {
    let d = TempDir::new("corrupt");
    let db = d.0.join("predictions.sqlite3");
    std::fs::write(&db, vec![0x5a; 8192]).unwrap();
    let e = build_err(&d.0).await;
    assert!(e.contains(&db.display().to_string()), "{e}");
    assert!(e.contains("move it aside"), "{e}");
    std::fs::remove_file(&db).unwrap();
    drop(
        hearth_server::store::SqliteStore::open(&db, &d.0)
            .await
            .unwrap(),
    );
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute("INSERT INTO schema_version VALUES (99, 'future')", [])
        .unwrap();
    drop(c);
    let e = build_err(&d.0).await;
    assert!(e.contains("newer") && e.contains("99"), "{e}");
}

#[tokio::test]
async fn an_undecodable_row_is_skipped_and_interrupted_rows_get_metrics() {
    let s = start(1 << 20).await;
    let (_, p) = s
        .create(json!({"prompt": "ok", "max_tokens": 2}), Some("wait"))
        .await;
    let db = s.data.0.join("predictions.sqlite3");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute(
        "INSERT INTO predictions (id, created_at, status, record) VALUES ('broken', '2999-01-01T00:00:00.000000Z', 'succeeded', '{not json')",
        [],
    )
    .unwrap();
    let r = s.get("/v1/predictions").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let list: Value = r.json().await.unwrap();
    let ids: Vec<&str> = list["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [p["id"].as_str().unwrap()]);
    // A row left `processing` by a process that died ends failed, with a total time
    // and a list; this replica's own rows are never touched.
    let mut r = s
        .state
        .store
        .get(p["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    r.prediction.id = "crashed".into();
    r.prediction.status = hearth_server::record::Status::Processing;
    r.prediction.output = None;
    r.prediction.metrics = None;
    c.execute(
        "INSERT INTO predictions (id, created_at, status, record, owner) VALUES ('crashed', ?1, 'processing', ?2, 'a-dead-process')",
        rusqlite::params![r.prediction.created_at, serde_json::to_string(&r).unwrap()],
    )
    .unwrap();
    r.prediction.id = "mine".into();
    s.state.store.put(&r).await.unwrap();
    let ended = hearth_server::replicas::end_orphans(&s.state.store, &s.state.webhooks)
        .await
        .unwrap()
        .ended;
    assert_eq!(ended, 1);
    let got = s
        .state
        .store
        .get("crashed")
        .await
        .unwrap()
        .unwrap()
        .prediction;
    assert_eq!(got.status, hearth_server::record::Status::Failed);
    assert_eq!(got.output, Some(vec![]));
    assert!(got.metrics.unwrap()["total_time"].as_f64().unwrap() >= 0.0);
    let mine = s.state.store.get("mine").await.unwrap().unwrap().prediction;
    assert_eq!(mine.status, hearth_server::record::Status::Processing);
}

#[tokio::test]
async fn cancel_after_ends_running_and_queued_predictions_as_canceled() {
    let s = start_with(1 << 20, one_at_a_time()).await;
    let r = s
        .post("/v1/models/hearth/demo/predictions")
        .header("Cancel-After", "soon")
        .json(&json!({"input": {"prompt": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    assert!(r.json::<Value>().await.unwrap()["detail"]
        .as_str()
        .unwrap()
        .contains("Cancel-After"));
    let create = |deadline: &'static str, input: Value| {
        s.post("/v1/models/hearth/demo/predictions")
            .header("Cancel-After", deadline)
            .json(&json!({"input": input}))
            .send()
    };
    let running: Value = create("1s", long_job())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let queued: Value = create("300ms", json!({"prompt": "q", "max_tokens": 3}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let created =
        chrono::DateTime::parse_from_rfc3339(running["created_at"].as_str().unwrap()).unwrap();
    let deadline =
        chrono::DateTime::parse_from_rfc3339(running["deadline"].as_str().unwrap()).unwrap();
    assert_eq!((deadline - created).num_milliseconds(), 1000);
    for (p, started) in [(&queued, false), (&running, true)] {
        let done = s.wait_terminal(p["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "canceled", "{done}");
        assert!(
            done["logs"].as_str().unwrap().contains("Deadline"),
            "{done}"
        );
        assert!(
            done["metrics"]["total_time"].as_f64().unwrap() > 0.25,
            "{done}"
        );
        assert!(done["output"].is_array(), "{done}");
        if !started {
            assert_eq!(done["output"], json!([]), "{done}");
        }
    }
}

#[tokio::test]
async fn a_client_hanging_up_while_its_prediction_is_stored_leaves_no_orphan_row() {
    let s = start(1 << 20).await;
    // Another connection holds the database's write lock: the create's store write
    // waits (busy timeout) while the client gives up and hangs up.
    let db = rusqlite::Connection::open(s.data.0.join("predictions.sqlite3")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let gave_up = s
        .post("/v1/models/hearth/demo/predictions")
        .json(&json!({"input": {"prompt": "hung up", "max_tokens": 4}}))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(
        gave_up.is_err(),
        "the create answered while the store was locked"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    db.execute_batch("COMMIT").unwrap();
    // The prediction was stored after the client left: it runs to its end anyway.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let id = loop {
        let list: Value = s
            .get("/v1/predictions")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(p) = list["results"].as_array().and_then(|r| r.first()) {
            break p["id"].as_str().unwrap().to_string();
        }
        assert!(std::time::Instant::now() < deadline, "never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let p = s.wait_terminal(&id).await;
    assert_eq!(p["status"], "succeeded", "{p}");
}
