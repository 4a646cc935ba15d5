//! An `upstream` route follows the upstream's event stream, with real processes: a
//! front `hearth serve` routing hearth/demo to another `hearth serve` through the
//! fault-injecting proxy (`support::fault_proxy`), which carries the upstream's event
//! streams too. Output reaches the caller's stream as the upstream's stream brings
//! it (not at the end), and the upstream is not polled while its stream flows; a stream cut
//! again and again mid-prediction still ends with the whole output, each chunk once
//! (reconnects resume after the last event, then polling); a stream that cannot be
//! opened, one named on another origin (unless `--upstream-stream-origin` names it:
//! then followed there, without the token), and an upstream whose records name no
//! stream, are polled. What an upstream may send is capped; shadow copies follow the
//! stream too; a graceful shutdown ends upstream work in flight within its bound.

mod support;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::fault_proxy::FaultProxy;
use support::procs::{spawn, spawn_upstream, temp, Api, Proc};

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
    front_with(dir, up, &["--route", &format!("{MODEL}=upstream:up")]).await
}

async fn front_with(dir: &Path, up: &str, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = [
        "--data-dir",
        &dir.join("front-data").display().to_string(),
        "--api-token",
        FRONT_TOKEN,
        "--upstream",
        &format!("up={up}"),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn(
        0,
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

/// One event of a stream as the caller read it.
struct Got {
    event: String,
    data: String,
}

/// Reads the caller's stream at `url` to its end, each event as it arrives.
async fn read_stream(http: &reqwest::Client, url: &str) -> Vec<Got> {
    read_stream_with(http, url, |_| {}).await
}

/// `read_stream`, calling `each` with the events so far as each one arrives.
async fn read_stream_with(
    http: &reqwest::Client,
    url: &str,
    mut each: impl FnMut(&[Got]),
) -> Vec<Got> {
    let mut resp = http.get(url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    // Bytes until a whole event is in: a network chunk can end inside a character
    // (decoded chunk by chunk, its halves became two U+FFFDs).
    let mut buf: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while let Some(chunk) = tokio::time::timeout_at(deadline.into(), resp.chunk())
        .await
        .expect("the stream did not end in 120 s")
        .unwrap()
    {
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let block =
                String::from_utf8(buf.drain(..end + 2).collect()).expect("an event is UTF-8");
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
            });
            each(&out);
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
    run_one_with(api, up, inp, |_| {}).await
}

/// `run_one`, calling `each` with the caller's events so far as each one arrives.
async fn run_one_with(
    api: &Api,
    up: &Api,
    inp: &Value,
    each: impl FnMut(&[Got]),
) -> (Vec<Got>, Value, Value) {
    let (code, p) = api
        .post(
            &format!("/v1/models/{MODEL}/predictions"),
            &json!({"input": inp}),
            None,
        )
        .await;
    assert_eq!(code, 201, "{p}");
    let events = read_stream_with(&api.http, p["urls"]["stream"].as_str().unwrap(), each).await;
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

    // Output reaches the caller as the upstream's stream brings it, not in one burst
    // at the end: the proxy relays the upstream's first 5 output events, then holds
    // its stream and every read of its records until the caller has had output. A
    // front that kept the output for the end could give none (and the stream would
    // never end). An order, not a time: a loaded machine only delays both.
    proxy.set(|p| p.gate_after = 5);
    let mut held_output = String::new();
    let (events, done, theirs) = run_one_with(&api, &up, &input("incremental", 2500), |got| {
        if held_output.is_empty() && proxy.plan.lock().unwrap().gate_after != 0 {
            held_output = streamed_text(got);
            if !held_output.is_empty() {
                proxy.set(|p| p.gate_after = 0);
            }
        }
    })
    .await;
    assert_eq!(
        proxy.gated.load(Ordering::SeqCst),
        1,
        "the stream was not held"
    );
    assert!(
        !held_output.is_empty() && joined(&done).starts_with(&held_output),
        "no output reached the caller while the upstream's stream was held after 5 events"
    );
    let outputs = events.iter().filter(|e| e.event == "output").count();
    assert!(outputs >= 50, "{outputs} output events");
    assert_eq!(done["completed_at"], theirs["completed_at"]);
    assert_eq!(done["started_at"], theirs["started_at"]);
    assert!(
        proxy.streams.load(Ordering::SeqCst) >= 1,
        "no stream followed"
    );
    // Followed along its stream from the create on: the upstream's record was read
    // at the end, and not polled while events flowed. One check GET is allowed: a
    // loaded CI machine can stall the upstream past the 1 s after which a quiet
    // stream is checked; polling would have read it every 200 ms.
    let uid = done["hearth"]["upstream_id"].as_str().unwrap();
    assert!(
        proxy.gets_of(&format!("/v1/predictions/{uid}")) <= 2,
        "the upstream was polled while its stream was followed: {:?}",
        proxy.gets.lock().unwrap()
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

    proxy.set(|p| p.strip_stream_urls = false);

    // A stream named on another origin is not followed (nothing is asked of that
    // origin; the token never goes there): polled to the same end.
    let elsewhere = FaultProxy::start(&u.base).await;
    proxy.set(|p| p.stream_origin = Some(elsewhere.url.clone()));
    let (_, done, _) = run_one(&api, &up, &input("elsewhere", 40)).await;
    assert_eq!(elsewhere.streams.load(Ordering::SeqCst), 0);
    assert!(elsewhere.gets.lock().unwrap().is_empty());
    let logs = done["logs"].as_str().unwrap();
    assert!(
        logs.contains("was not followed") && logs.contains("not upstream up's own origin"),
        "{logs}"
    );
    assert!(
        proxy.streams_with_token.load(Ordering::SeqCst) >= 1,
        "a stream on the upstream's own origin goes with its token"
    );

    // The same upstream behind a front told --upstream-stream-origin up=<that origin>
    // (as for a hosted API whose streams live on a host that is no sibling of its
    // API's): the stream there is followed to its end, not polled, without the token.
    let allowed = dir.join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    let f2 = front_with(
        &allowed,
        &proxy.url,
        &[
            "--route",
            &format!("{MODEL}=upstream:up"),
            "--upstream-stream-origin",
            &format!("up={}", elsewhere.url),
        ],
    )
    .await;
    let api2 = Api::new(&f2.base, FRONT_TOKEN);
    let (_, done, _) = run_one(&api2, &up, &input("allowed", 40)).await;
    assert_eq!(elsewhere.streams.load(Ordering::SeqCst), 1);
    assert_eq!(
        elsewhere.streams_with_token.load(Ordering::SeqCst),
        0,
        "the upstream's token went to another origin"
    );
    let uid = done["hearth"]["upstream_id"].as_str().unwrap();
    assert!(
        proxy.gets_of(&format!("/v1/predictions/{uid}")) <= 2,
        "polled, not followed: {}",
        done["logs"]
    );
    assert!(
        !done["logs"]
            .as_str()
            .unwrap_or("")
            .contains("polling it instead"),
        "{}",
        done["logs"]
    );
}

/// The caps on what an upstream may send for one prediction: output past
/// `--upstream-max-output-bytes` fails the prediction, naming the flag, whether it
/// comes along the stream or by polling, and cancels it upstream; logs past
/// `--upstream-max-log-bytes` in the final record fail it the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_and_logs_past_their_caps_fail_the_prediction_naming_the_limit() {
    let dir = temp("caps");
    let u = upstream(&dir).await;
    let proxy = FaultProxy::start(&u.base).await;
    let f = front_with(
        &dir,
        &proxy.url,
        &[
            "--route",
            &format!("{MODEL}=upstream:up"),
            "--upstream-max-output-bytes",
            "300",
            "--upstream-max-log-bytes",
            "40",
        ],
    )
    .await;
    let api = Api::new(&f.base, FRONT_TOKEN);
    let up = Api::new(&u.base, UP_TOKEN);
    for (how, refuse) in [("streamed", false), ("polled", true)] {
        proxy.set(|p| p.refuse_streams = refuse);
        let (code, p) = api
            .post(
                &format!("/v1/models/{MODEL}/predictions"),
                &json!({"input": input(how, 4000)}),
                None,
            )
            .await;
        assert_eq!(code, 201, "{p}");
        let events = read_stream(&api.http, p["urls"]["stream"].as_str().unwrap()).await;
        let done = api.wait_terminal(p["id"].as_str().unwrap(), 60).await;
        assert_eq!(done["status"], "failed", "{how}: {done}");
        let err = done["error"].as_str().unwrap();
        assert!(
            err.contains("--upstream-max-output-bytes") && err.contains("300 bytes"),
            "{how}: {err}"
        );
        let kept: usize = done["output"]
            .as_array()
            .map_or(0, |o| o.iter().map(|c| c.as_str().unwrap().len()).sum());
        assert!(kept <= 300, "{how}: {kept} bytes kept");
        assert_eq!(events.last().map(|e| e.event.as_str()), Some("done"));
        assert!(events
            .iter()
            .any(|e| e.event == "error" && e.data.contains("300 bytes")));
        // Canceled upstream, not left to run its 4000 tokens.
        let uid = done["hearth"]["upstream_id"].as_str().unwrap();
        let theirs = up.wait_terminal(uid, 60).await;
        assert_eq!(theirs["status"], "canceled", "{how}: {theirs}");
    }
    proxy.set(|p| p.refuse_streams = false);
    // A few tokens of output, but the upstream's closing log line is past 40 bytes.
    let (code, p) = api
        .post(
            &format!("/v1/models/{MODEL}/predictions"),
            &json!({"input": input("logs", 3)}),
            None,
        )
        .await;
    assert_eq!(code, 201, "{p}");
    let done = api.wait_terminal(p["id"].as_str().unwrap(), 60).await;
    assert_eq!(done["status"], "failed", "{done}");
    let err = done["error"].as_str().unwrap();
    assert!(err.contains("--upstream-max-log-bytes"), "{err}");
}

/// Shadow copies follow the upstream's stream; and a graceful shutdown of a front
/// with an upstream prediction and a shadow copy in flight: the process exits within
/// its bound; the copy is canceled upstream (not
/// left to bill); the upstream prediction is canceled there and ends canceled here,
/// recorded before the exit or, left resumable, after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_copies_follow_the_stream_and_a_shutdown_ends_upstream_work_in_bound() {
    let dir = temp("upshutdown");
    let u = spawn_upstream(
        &dir,
        &[
            "name = \"hearth/demo\"\nmodel = \"demo\"\n",
            // Defaults of its own: two cards of one model need different versions.
            "name = \"acme/remote\"\nmodel = \"demo\"\n[defaults]\nmax_tokens = 129\n",
        ],
        UP_TOKEN,
    )
    .await;
    let extra = [
        "--route",
        "acme/remote=upstream:up",
        "--route",
        "hearth/demo=shadow:up:100",
        "--shutdown-timeout",
        "1",
    ];
    let proxy = FaultProxy::start(&u.base).await;
    let mut f = front_with(&dir, &proxy.url, &extra).await;
    let api = Api::new(&f.base, FRONT_TOKEN);
    let up = Api::new(&u.base, UP_TOKEN);

    // A shadow copy is followed along the upstream's stream like a routed
    // prediction: its record there is read once, at its end, never polled while it
    // runs (polling read it every 250 ms).
    let (code, p) = api
        .post(
            &format!("/v1/models/{MODEL}/predictions"),
            &json!({"input": input("copy", 400)}),
            None,
        )
        .await;
    assert_eq!(code, 201, "{p}");
    api.wait_terminal(p["id"].as_str().unwrap(), 60).await;
    let m = api.settled_compare(MODEL, 1, 60).await;
    let pair = &m["shadow"]["recent_pairs"][0];
    assert_eq!(pair["upstream"], "succeeded", "{m}");
    let uid = pair["upstream_id"].as_str().unwrap();
    assert_eq!(proxy.streams.load(Ordering::SeqCst), 1, "the copy's stream");
    assert!(
        proxy.gets_of(&format!("/v1/predictions/{uid}")) <= 2,
        "the copy was polled: {:?}",
        proxy.gets.lock().unwrap()
    );

    let tag = format!("sd{}", rand::random::<u32>());
    let mut ids = Vec::new();
    for model in ["acme/remote", MODEL] {
        let (code, p) = api
            .post(
                &format!("/v1/models/{model}/predictions"),
                &json!({"input": input(&tag, 8000)}),
                None,
            )
            .await;
        assert_eq!(code, 201, "{p}");
        ids.push(p["id"].as_str().unwrap().to_string());
    }
    // Both running upstream: the routed prediction and the shadow copy.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let there = up.listed_with_tag(&tag).await;
        if there.len() == 2 && there.iter().all(|p| p["status"] == "processing") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not both running upstream: {there:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &f.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = loop {
        if let Some(s) = f.child.try_wait().unwrap() {
            break s;
        }
        // Its own bounds end it (1 s of drain, a few seconds each for the cancels
        // and to close); this one only catches a front that waits for the upstream
        // work instead (8,000 tokens each), not a slow machine. That the work was
        // canceled rather than finished is checked below, upstream.
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "still running 120 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    // Nothing is left running upstream.
    for p in up.listed_with_tag(&tag).await {
        let id = p["id"].as_str().unwrap();
        let theirs = up.wait_terminal(id, 60).await;
        assert_eq!(theirs["status"], "canceled", "{theirs}");
    }
    // The routed prediction ends canceled here: as recorded, or once resumed.
    drop(f);
    let f = front_with(&dir, &proxy.url, &extra).await;
    let api = Api::new(&f.base, FRONT_TOKEN);
    let done = api.wait_terminal(&ids[0], 60).await;
    assert_eq!(done["status"], "canceled", "{done}");
    let local = api.wait_terminal(&ids[1], 60).await;
    assert!(
        ["canceled", "failed"].contains(&local["status"].as_str().unwrap()),
        "{local}"
    );
}
