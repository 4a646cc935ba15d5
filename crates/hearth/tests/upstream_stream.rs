//! An `upstream` route follows the upstream's event stream, with real processes: a
//! front `hearth serve` routing hearth/demo to another `hearth serve` through the
//! fault-injecting proxy (`support::fault_proxy`), which carries the upstream's event
//! streams too. Output reaches the caller's stream while the upstream is still
//! making it; a stream cut again and again mid-prediction still ends with the whole
//! output, each chunk once (reconnects resume after the last event, then polling);
//! a stream that cannot be opened, and an upstream whose records name no stream, are
//! polled.

mod support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use support::fault_proxy::FaultProxy;
use support::procs::{free_port, spawn, spawn_upstream, temp, Api, Proc};

const UP_TOKEN: &str = "upstream-secret-9d41";
const FRONT_TOKEN: &str = "front-token";
const MODEL: &str = "hearth/demo";

async fn upstream(dir: &Path) -> Proc {
    spawn_upstream(
        dir,
        &["name = \"hearth/demo\"\nmodel = \"demo\"\n"],
        UP_TOKEN,
    )
    .await
}

async fn front(dir: &Path, up: &str) -> Proc {
    let args: Vec<String> = [
        "--data-dir",
        &dir.join("front-data").display().to_string(),
        "--api-token",
        FRONT_TOKEN,
        "--upstream",
        &format!("up={up}"),
        "--route",
        &format!("{MODEL}=upstream:up"),
    ]
    .map(String::from)
    .to_vec();
    spawn(
        free_port(),
        &args,
        &[("HEARTH_UPSTREAM_TOKEN_UP", UP_TOKEN)],
        &dir.join("front.log"),
    )
    .await
}

fn input(tag: &str, max_tokens: u32) -> Value {
    // min_tokens: the demo's random weights end some prompts at once.
    json!({"prompt": format!("{tag} {}", rand::random::<u64>()), "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0})
}

/// One event of a stream as the caller read it, and when it arrived.
struct Got {
    event: String,
    data: String,
    at: DateTime<Utc>,
}

/// Reads the caller's stream at `url` to its end, each event as it arrives.
async fn read_stream(http: &reqwest::Client, url: &str) -> Vec<Got> {
    let mut resp = http.get(url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Some(chunk) = tokio::time::timeout_at(deadline.into(), resp.chunk())
        .await
        .expect("the stream did not end in 120 s")
        .unwrap()
    {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let Some(event) = block.lines().find_map(|l| l.strip_prefix("event:")) else {
                continue;
            };
            let data: Vec<&str> = block
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            out.push(Got {
                event: event.trim().to_string(),
                data: data.join("\n"),
                at: Utc::now(),
            });
        }
    }
    out
}

fn streamed_text(events: &[Got]) -> String {
    events
        .iter()
        .filter(|e| e.event == "output")
        .map(|e| e.data.as_str())
        .collect()
}

fn joined(p: &Value) -> String {
    p["output"]
        .as_array()
        .unwrap_or_else(|| panic!("no output: {p}"))
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect()
}

/// Creates one prediction on the front, reads its stream to the end, and checks
/// what every run must: done last, the streamed text the front's final output, and
/// that the upstream's own. Returns the events, the front's record and the
/// upstream's.
async fn run_one(api: &Api, up: &Api, inp: &Value) -> (Vec<Got>, Value, Value) {
    let (code, p) = api
        .post(
            &format!("/v1/models/{MODEL}/predictions"),
            &json!({"input": inp}),
            None,
        )
        .await;
    assert_eq!(code, 201, "{p}");
    let events = read_stream(&api.http, p["urls"]["stream"].as_str().unwrap()).await;
    let done = api.wait_terminal(p["id"].as_str().unwrap(), 60).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(events.last().map(|e| e.event.as_str()), Some("done"));
    let uid = done["hearth"]["upstream_id"].as_str().unwrap();
    let theirs = up.get(&format!("/v1/predictions/{uid}")).await;
    assert_eq!(
        done["output"], theirs["output"],
        "front {done} upstream {theirs}"
    );
    assert_eq!(
        streamed_text(&events),
        joined(&done),
        "the caller's stream is the output, each chunk once"
    );
    (events, done, theirs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_route_relays_the_upstreams_stream_and_falls_back_to_polling() {
    let dir = temp("sse");
    let u = upstream(&dir).await;
    let proxy = FaultProxy::start(&u.base).await;
    let f = front(&dir, &proxy.url).await;
    let api = Api::new(&f.base, FRONT_TOKEN);
    let up = Api::new(&u.base, UP_TOKEN);

    // Output reaches the caller while the upstream is still making it: most chunks
    // arrive before the upstream's completed_at, not in one burst at the end.
    let (events, done, theirs) = run_one(&api, &up, &input("incremental", 200)).await;
    let completed: DateTime<Utc> = theirs["completed_at"].as_str().unwrap().parse().unwrap();
    let outputs: Vec<&Got> = events.iter().filter(|e| e.event == "output").collect();
    let early = outputs.iter().filter(|e| e.at < completed).count();
    assert!(
        outputs.len() >= 50 && early * 2 >= outputs.len(),
        "{early} of {} chunks reached the caller before the upstream completed ({completed}); arrivals: {:?}",
        outputs.len(),
        outputs.iter().map(|e| e.at.to_rfc3339()).collect::<Vec<_>>()
    );
    assert_eq!(done["completed_at"], theirs["completed_at"]);
    assert_eq!(done["started_at"], theirs["started_at"]);
    assert!(
        proxy.streams.load(Ordering::SeqCst) >= 1,
        "no stream followed"
    );
    // Followed to its end, not opened and then left for polling (which also delivers
    // most chunks early, 200 ms apart).
    assert!(
        !done["logs"]
            .as_str()
            .unwrap_or("")
            .contains("could not be followed"),
        "the stream was not followed to its end: {}",
        done["logs"]
    );

    // Every stream is cut after 5 events: the front reconnects after the last event
    // it had (each chunk once), a bounded number of times, then polls for the rest
    // (the prediction is long enough to outlast the reconnects).
    proxy.set(|p| p.cut_streams_after = 5);
    let opened = proxy.streams.load(Ordering::SeqCst);
    let (_, done, _) = run_one(&api, &up, &input("cut", 8000)).await;
    assert!(
        proxy.streams_cut.load(Ordering::SeqCst) >= 1,
        "no stream was cut"
    );
    assert!(
        proxy.streams.load(Ordering::SeqCst) > opened + 1,
        "no reconnect"
    );
    assert!(
        done["logs"]
            .as_str()
            .unwrap()
            .contains("polling it instead"),
        "{}",
        done["logs"]
    );
    proxy.set(|p| p.cut_streams_after = 0);

    // A stream that cannot be opened: polled from the start, to the same end.
    proxy.set(|p| p.refuse_streams = true);
    let (_, done, _) = run_one(&api, &up, &input("refused", 40)).await;
    let logs = done["logs"].as_str().unwrap();
    assert!(
        logs.contains("could not be followed (opening it") && logs.contains("polling it instead"),
        "{logs}"
    );
    proxy.set(|p| p.refuse_streams = false);

    // An upstream whose records name no stream is polled to the same end.
    proxy.set(|p| p.strip_stream_urls = true);
    let opened = proxy.streams.load(Ordering::SeqCst);
    run_one(&api, &up, &input("nostream", 40)).await;
    assert_eq!(
        proxy.streams.load(Ordering::SeqCst),
        opened,
        "a stream was opened"
    );
}
