//! Two `hearth serve` processes on one PostgreSQL: a prediction created on one is
//! read, listed, streamed and cancelled through the other; a file uploaded to one is
//! served by the other; a Cog-API prediction is attached to (`PUT`, its SSE) and
//! cancelled through the other; one replica killed with -9 has its running predictions
//! ended `failed` by the survivor once its lease runs out, and every prediction's
//! `completed` webhook arrives exactly once, in the style of the API that created it.

// postgres.rs and support/ both bring the one ports.rs (each of its users needs it).
#![allow(clippy::duplicate_mod)]

#[path = "../../hearth-server/tests/support/postgres.rs"]
mod postgres;
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::procs::{launch, Proc as Replica};

const TOKEN: &str = "replica-token";

/// A replica on a port of its own choosing, its log beside its data dir.
async fn start(store: &str, data: &std::path::Path) -> Replica {
    let args: Vec<String> = [
        "--api-token",
        TOKEN,
        "--store",
        store,
        "--replica-lease",
        "3",
        "--webhook-allow-private",
        "--kv-cache-memory",
        "64MiB",
        "--data-dir",
        &data.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    std::fs::create_dir_all(data.parent().unwrap()).unwrap();
    let log = data.with_extension("log");
    let r = launch(0, &args, &[("HEARTH_LOG", "warn")], &log).await;
    // The server listens before its model loads: `/health` says 200 once it serves.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(resp) = reqwest::get(format!("{}/health", r.base)).await {
            if resp.status().is_success() {
                return r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "replica did not come up: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn get(r: &Replica, path: &str) -> Value {
    client()
        .get(format!("{}{path}", r.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn create(r: &Replica, input: Value, hook: &str) -> Value {
    let resp = client()
        .post(format!("{}/v1/models/hearth/demo/predictions", r.base))
        .bearer_auth(TOKEN)
        .json(&json!({"input": input, "webhook": hook, "webhook_events_filter": ["completed"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    resp.json().await.unwrap()
}

async fn wait_status(r: &Replica, id: &str, want: &[&str], secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let p = get(r, &format!("/v1/predictions/{id}")).await;
        if want.contains(&p["status"].as_str().unwrap_or("")) {
            return p;
        }
        assert!(Instant::now() < deadline, "never {want:?}: {p}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn long_job() -> Value {
    // Several seconds on the demo (its context is 8,192 tokens), far past the waits timed here.
    json!({"prompt": "a long job", "max_tokens": 8000, "ignore_eos": true, "temperature": 0})
}

/// The webhooks of each prediction id whose body says it ended: (user-agent, body).
type Seen = Arc<Mutex<HashMap<String, Vec<(String, Value)>>>>;

/// Records terminal webhooks per prediction id (Replicate's `completed` filter sends
/// only those; Cog's style sends every event, of which the terminal ones count here).
async fn receiver() -> (String, Seen) {
    use axum::routing::post;
    let seen: Seen = Default::default();
    let sink = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |headers: axum::http::HeaderMap, body: String| {
            let sink = sink.clone();
            async move {
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                let terminal = ["succeeded", "failed", "canceled"]
                    .contains(&v["status"].as_str().unwrap_or(""));
                if terminal {
                    let id = v["id"].as_str().unwrap_or("").to_string();
                    let ua = headers
                        .get("user-agent")
                        .and_then(|u| u.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    sink.lock().unwrap().entry(id).or_default().push((ua, v));
                }
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
async fn two_replicas_share_predictions_and_a_killed_one_is_ended_by_the_other() {
    let Some(url) = postgres::fresh_database().await else {
        return;
    };
    let root = std::env::temp_dir().join(format!("hearth-replicas-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let a = start(&url, &root.join("a")).await;
    let b = start(&url, &root.join("b")).await;
    let (hook, seen) = receiver().await;

    // Created on A, read on B while it runs, its output streamed through B.
    let p = create(&a, long_job(), &hook).await;
    let id = p["id"].as_str().unwrap().to_string();
    let running = wait_status(&b, &id, &["processing"], 30).await;
    assert_eq!(running["id"], id.as_str());
    let stream_url = running["urls"]["stream"]
        .as_str()
        .unwrap()
        .replace(&a.base, &b.base);
    let mut sse = client().get(&stream_url).send().await.unwrap();
    assert_eq!(sse.status().as_u16(), 200);
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while text.matches("event: output").count() < 3 {
        assert!(
            Instant::now() < deadline,
            "no live output through B: {text:?}"
        );
        let chunk = tokio::time::timeout(Duration::from_secs(10), sse.chunk())
            .await
            .expect("B's stream went quiet")
            .unwrap()
            .expect("B's stream ended early");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let listed = get(&b, "/v1/predictions").await;
    assert!(listed["results"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == id.as_str()));

    // Cancelled through B: A, its owner, ends it `canceled`; B's stream says so.
    let canceled: Value = client()
        .post(format!("{}/v1/predictions/{id}/cancel", b.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(canceled["status"], "canceled", "{canceled}");
    assert_eq!(
        get(&a, &format!("/v1/predictions/{id}")).await["status"],
        "canceled"
    );
    let rest = tokio::time::timeout(Duration::from_secs(10), sse.text())
        .await
        .expect("B's stream did not end")
        .unwrap();
    assert!(rest.contains("event: done"), "{rest}");
    assert!(rest.contains("canceled"), "{rest}");

    // Read your writes across replicas: what A answered (a wait, a cancel), B reads
    // at once (a race: 20 tries; without the fix one in three runs caught it).
    for _ in 0..20 {
        let done: Value = client()
            .post(format!("{}/v1/models/hearth/demo/predictions", a.base))
            .bearer_auth(TOKEN)
            .header("Prefer", "wait")
            .json(&json!({"input": {"prompt": "quick", "max_tokens": 8}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(done["status"], "succeeded", "{done}");
        let seen = get(
            &b,
            &format!("/v1/predictions/{}", done["id"].as_str().unwrap()),
        )
        .await;
        assert_eq!(seen["status"], "succeeded", "{seen}");
        assert_eq!(seen["output"], done["output"]);
    }
    let p3 = create(&a, long_job(), &hook).await;
    let id3 = p3["id"].as_str().unwrap().to_string();
    wait_status(&a, &id3, &["processing"], 30).await;
    let canceled: Value = client()
        .post(format!("{}/v1/predictions/{id3}/cancel", a.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(canceled["status"], "canceled");
    assert_eq!(
        get(&b, &format!("/v1/predictions/{id3}")).await["status"],
        "canceled"
    );

    // A file uploaded to A is served by B.
    let form = reqwest::multipart::Form::new().part(
        "content",
        reqwest::multipart::Part::bytes(b"shared bytes".to_vec()).file_name("s.txt"),
    );
    let f: Value = client()
        .post(format!("{}/v1/files", a.base))
        .bearer_auth(TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let fid = f["id"].as_str().unwrap();
    let bytes = client()
        .get(format!("{}/v1/files/{fid}/download", b.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&bytes[..], b"shared bytes");

    // Both replicas sign webhooks with one secret.
    assert_eq!(
        get(&a, "/v1/webhooks/default/secret").await,
        get(&b, "/v1/webhooks/default/secret").await
    );

    // Cog's API: created on A, attached to and cancelled through B.
    let cog_id = format!("cog.{}", std::process::id());
    let cog_put = |base: &str| {
        client()
            .put(format!("{base}/predictions/{cog_id}"))
            .bearer_auth(TOKEN)
            .json(&json!({"input": long_job()}))
    };
    let created = cog_put(&a.base)
        .header("Prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 202);
    wait_status(&b, &cog_id, &["processing"], 30).await;
    let attached = cog_put(&b.base).send().await.unwrap();
    assert_eq!(attached.status().as_u16(), 202, "a PUT on B attaches");
    let attached: Value = attached.json().await.unwrap();
    assert_eq!(attached["id"], cog_id.as_str(), "{attached}");
    assert_eq!(attached["status"], "processing", "{attached}");
    assert!(attached.get("urls").is_none(), "Cog's shape: {attached}");
    let mut cog_sse = cog_put(&b.base)
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(cog_sse.status().as_u16(), 200);
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while text.matches("event: output").count() < 3 {
        assert!(Instant::now() < deadline, "no Cog SSE through B: {text:?}");
        let chunk = tokio::time::timeout(Duration::from_secs(10), cog_sse.chunk())
            .await
            .expect("B's Cog stream went quiet")
            .unwrap()
            .expect("B's Cog stream ended early");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains("event: start"), "{text}");
    let cancel = client()
        .post(format!("{}/predictions/{cog_id}/cancel", b.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status().as_u16(), 200);
    wait_status(&a, &cog_id, &["canceled"], 10).await;
    let rest = tokio::time::timeout(Duration::from_secs(10), cog_sse.text())
        .await
        .expect("B's Cog stream did not end")
        .unwrap();
    assert!(rest.contains("event: completed"), "{rest}");
    assert!(rest.contains("\"canceled\""), "{rest}");
    // A finished Cog id is never reused, whichever replica is asked.
    assert_eq!(
        cog_put(&b.base).send().await.unwrap().status().as_u16(),
        409
    );

    // A dies mid-prediction: B ends it once A's lease (3 s) runs out, and a Cog
    // prediction's `completed` webhook goes out from B in Cog's style.
    let p2 = create(&a, long_job(), &hook).await;
    let id2 = p2["id"].as_str().unwrap().to_string();
    let cog2 = format!("cog2.{}", std::process::id());
    let resp = client()
        .post(format!("{}/predictions", a.base))
        .bearer_auth(TOKEN)
        .header("Prefer", "respond-async")
        .json(&json!({"id": cog2, "input": long_job(), "webhook": hook,
                      "webhook_events_filter": ["completed"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    wait_status(&b, &id2, &["processing"], 30).await;
    wait_status(&b, &cog2, &["processing"], 30).await;
    let mut a = a;
    a.child.kill().unwrap(); // SIGKILL
    a.child.wait().unwrap();
    let killed_at = Instant::now();
    let failed = wait_status(&b, &id2, &["failed"], 20).await;
    assert!(
        failed["error"].as_str().unwrap().contains("stopped"),
        "{failed}"
    );
    assert!(failed["output"].is_array(), "{failed}");
    eprintln!("orphan ended {:?} after the kill", killed_at.elapsed());
    wait_status(&b, &cog2, &["failed"], 20).await;

    // Each prediction's `completed` webhook arrives once: the cancel's from A, the
    // orphans' from B (the Cog one in Cog's shape, with Cog's user-agent).
    let count = |s: &HashMap<String, Vec<(String, Value)>>, id: &str| s.get(id).map_or(0, Vec::len);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = seen.lock().unwrap().clone();
        if count(&s, &id) == 1 && count(&s, &id2) == 1 && count(&s, &cog2) == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "webhooks: {s:?}");
        drop(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = seen.lock().unwrap().clone();
    assert_eq!(count(&s, &id), 1, "{s:?}");
    assert_eq!(count(&s, &id2), 1, "{s:?}");
    assert_eq!(count(&s, &cog2), 1, "{s:?}");
    let (ua, body) = &s[&cog2][0];
    assert!(ua.starts_with("coglet/"), "{ua}");
    assert!(body.get("urls").is_none(), "Cog's shape: {body}");
    assert_eq!(body["status"], "failed", "{body}");
    let (ua, body) = &s[&id2][0];
    assert!(!ua.starts_with("coglet/"), "{ua}");
    assert!(body["urls"]["get"].is_string(), "Replicate's shape: {body}");
    drop(b);
    let _ = std::fs::remove_dir_all(&root);
}
