//! `shadow-local:UP:PCT` with real processes: callers are served by an upstream (another
//! `hearth serve`) and copies of their predictions run on the front's own engine at
//! background priority. The counts of the comparison add up exactly, callers never
//! see a copy, and a caller's local prediction on the same engine starts ahead of the
//! copies queued there (the engine runs one sequence at a time, so the order of
//! starts is the scheduler's choice alone).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::procs::{launch, metric, spawn, spawn_upstream, temp, Api, Proc};

const UP_TOKEN: &str = "upstream-secret-51c2";
const FRONT_TOKEN: &str = "front-token";
const MODEL: &str = "hearth/demo";

/// The upstream: the demo model as hearth/demo.
async fn upstream(dir: &Path) -> Proc {
    spawn_upstream(
        dir,
        &["name = \"hearth/demo\"\nmodel = \"demo\"\n"],
        UP_TOKEN,
    )
    .await
}

/// A front serving the demo model here (hearth/demo), one sequence at a time, with
/// hearth/demo's route `shadow-local:up:PCT`.
async fn front(dir: &Path, up: &str, percent: u8, max_concurrent: usize) -> Proc {
    let args: Vec<String> = [
        "--data-dir",
        &dir.join(format!("front-{percent}")).display().to_string(),
        "--api-token",
        FRONT_TOKEN,
        "--upstream",
        &format!("up={up}"),
        "--route",
        &format!("{MODEL}=shadow-local:up:{percent}"),
        "--shadow-max-concurrent",
        &max_concurrent.to_string(),
        "--shadow-max-per-minute",
        "100000",
        "--max-num-seqs",
        "1",
    ]
    .map(String::from)
    .to_vec();
    spawn(
        0,
        &args,
        &[("HEARTH_UPSTREAM_TOKEN_UP", UP_TOKEN)],
        &dir.join("front.log"),
    )
    .await
}

fn input(prompt: String, max_tokens: u32) -> Value {
    // min_tokens: the demo's random weights end some prompts at once.
    json!({"prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0})
}

fn n(v: &Value) -> usize {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}")) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_an_upstream_s_traffic_run_here_behind_local_callers() {
    use hearth_server::upstream::route::canary_goes_upstream;

    const N: usize = 48;
    let dir = temp("shadow-local");
    let u = upstream(&dir).await;
    let up = Api::new(&u.base, UP_TOKEN);

    // Counts: N creates from 6 callers, half of them shadowed by the hash.
    let f = front(&dir, &u.base, 50, 2).await;
    let api = std::sync::Arc::new(Api::new(&f.base, FRONT_TOKEN));
    let tag = format!("rev{}", rand::random::<u32>());
    let mut tasks = Vec::new();
    for w in 0..6 {
        let (api, tag) = (api.clone(), tag.clone());
        tasks.push(tokio::spawn(async move {
            let mut ended = Vec::new();
            for i in (w..N).step_by(6) {
                let body =
                    json!({"input": input(format!("{tag} {i} {}", rand::random::<u32>()), 4)});
                let (code, p) = api
                    .post(
                        &format!("/v1/models/{MODEL}/predictions"),
                        &body,
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
    // Callers see the upstream's predictions, under hearth's ids, and nothing else.
    for p in &ended {
        assert_eq!(p["status"], "succeeded", "{p}");
        assert_eq!(p["hearth"]["side"], "upstream", "{p}");
        assert_eq!(p["hearth"]["reason"], "shadow", "{p}");
        assert!(p["hearth"]["upstream_id"].is_string(), "{p}");
    }
    let listed = api.listed_with_tag(&tag).await;
    assert_eq!(listed.len(), N);
    assert!(listed.iter().all(|p| p["hearth"]["side"] == "upstream"));
    // The upstream ran the callers' predictions only: copies ran here.
    assert_eq!(up.listed_with_tag(&tag).await.len(), N);

    let shadowed = ended
        .iter()
        .filter(|p| canary_goes_upstream(p["id"].as_str().unwrap(), 50))
        .count();
    assert!(shadowed > 0 && shadowed < N, "{shadowed}");
    let m = api.settled_compare(MODEL, N, 180).await;
    assert_eq!(m["route"], "shadow-local:up:50", "{m}");
    let (primary, copies) = (&m["sides"]["upstream"], &m["sides"]["local"]);
    assert_eq!(primary["role"], "primary", "{m}");
    assert_eq!(copies["role"], "shadow", "{m}");
    let sh = &m["shadow"];
    assert_eq!(n(&primary["count"]), N, "{m}");
    assert_eq!(n(&primary["succeeded"]), N, "{m}");
    assert_eq!(n(&sh["eligible"]), shadowed, "{m}");
    assert_eq!(n(&sh["copies"]) + n(&sh["skipped_total"]), shadowed, "{m}");
    assert!(n(&sh["copies"]) > 0, "{m}");
    assert_eq!(n(&copies["count"]), n(&sh["copies"]), "{m}");
    assert_eq!(n(&copies["succeeded"]), n(&sh["copies"]), "{m}");
    assert_eq!(n(&sh["agreement"]["pairs"]), n(&sh["copies"]), "{m}");
    assert_eq!(n(&sh["agreement"]["compared"]), n(&sh["copies"]), "{m}");
    // Each listed pair is a caller's prediction and the upstream's id of it.
    for pair in sh["recent_pairs"].as_array().unwrap() {
        let ours = api
            .get(&format!("/v1/predictions/{}", pair["id"].as_str().unwrap()))
            .await;
        assert_eq!(pair["upstream_id"], ours["hearth"]["upstream_id"], "{pair}");
        assert_eq!(pair["upstream"], "succeeded", "{pair}");
        assert_eq!(pair["local"], "succeeded", "{pair}");
        assert!(pair["copy_started_at"].is_string(), "{pair}");
        assert!(pair["similarity"].is_number(), "{pair}");
    }
    drop(f);

    // Priority: four long copies fill the one-sequence engine (one runs, the rest wait),
    // then a caller's own prediction arrives through the Cog API, which serves this
    // model here at normal priority.
    const COPIES: usize = 4;
    let f = front(&dir, &u.base, 100, COPIES).await;
    let api = Api::new(&f.base, FRONT_TOKEN);
    let tag = format!("flood{}", rand::random::<u32>());
    for i in 0..COPIES {
        let body = json!({"input": input(format!("{tag} {i} {}", rand::random::<u32>()), 600)});
        let (code, p) = api
            .post(&format!("/v1/models/{MODEL}/predictions"), &body, None)
            .await;
        assert_eq!(code, 201, "{p}");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = api.text("/metrics").await;
        let gauge = |name| metric(&text, name, &["hearth/demo"]).unwrap_or(-1.0);
        let waiting = gauge("vllm:num_requests_waiting");
        if gauge("vllm:num_requests_running") == 1.0 && waiting >= 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the copies never queued: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let caller_id = format!("caller{}", rand::random::<u32>());
    let (code, cog) = api
        .post(
            "/predictions",
            &json!({"id": caller_id, "input": input(format!("{tag} caller"), 4)}),
            None,
        )
        .await;
    assert_eq!(code, 200, "{cog}");
    assert_eq!(cog["status"], "succeeded", "{cog}");
    let caller = api.wait_terminal(&caller_id, 60).await;
    let m = api.settled_compare(MODEL, COPIES, 300).await;
    let pairs = m["shadow"]["recent_pairs"].as_array().unwrap().clone();
    assert_eq!(pairs.len(), COPIES, "{m}");
    let at = |v: &Value| v.as_str().unwrap().to_string();
    // Copies that had not started when the caller's prediction was created were
    // queued on the engine: every one of them starts after the caller's.
    let queued: Vec<String> = pairs
        .iter()
        .map(|p| at(&p["copy_started_at"]))
        .filter(|t| *t > at(&caller["created_at"]))
        .collect();
    assert!(!queued.is_empty(), "no copy was queued: {m}");
    for t in &queued {
        assert!(
            *t > at(&caller["started_at"]),
            "a copy queued before the caller started first: {t} vs {caller}"
        );
    }
    // The caller was never preempted or queued behind copies.
    assert!(
        !caller["logs"].as_str().unwrap().contains("Preempted"),
        "{caller}"
    );
    assert_eq!(api.listed_with_tag(&tag).await.len(), COPIES + 1);
    assert!(n(&m["sides"]["local"]["count"]) == COPIES, "{m}");
    let text = api.text("/metrics").await;
    assert!(metric(&text, "vllm:num_preemptions", &["hearth/demo"]).unwrap() >= 1.0);
    drop(f);
    drop(u);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A shadow-local route needs the model's weights here; a start without them fails
/// setup (`SETUP_FAILED`, kept up so an orchestrator can read why), naming the route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_local_route_without_local_weights_fails_setup() {
    let dir = temp("shadow-local-refused");
    let args: Vec<String> = [
        "--data-dir",
        &dir.join("d").display().to_string(),
        "--upstream",
        "up=http://127.0.0.1:9",
        "--route",
        "acme/elsewhere=shadow-local:up:10",
    ]
    .map(String::from)
    .to_vec();
    let p = launch(0, &args, &[], &dir.join("serve.log")).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let health = loop {
        if let Ok(r) = reqwest::get(format!("{}/health-check", p.base)).await {
            let h: Value = r.json().await.unwrap_or(Value::Null);
            if h["status"] == "SETUP_FAILED" {
                break h;
            }
            assert_ne!(h["status"], "READY", "{h}");
        }
        assert!(Instant::now() < deadline, "setup never failed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let text = health.to_string();
    assert!(
        text.contains("acme/elsewhere=shadow-local:up:10")
            && text.contains("runs its shadow copies on the local engine"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
