//! Hybrid serving's edges, with real processes: a front `hearth serve` routing to an
//! upstream `hearth serve` through the fault-injecting proxy (`support::fault_proxy`).
//! A Cog container upstream (`cog+URL`) gets each prediction created and streamed in
//! one `PUT`, so one- and two-token predictions, which end at once, are never lost
//! between a create and an attach, even with every stream request held back; and a
//! front stopped (SIGTERM) while its upstreams have not confirmed the cancels its
//! shutdown sent ends those predictions `canceled` after its restart, there and here.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::fault_proxy::FaultProxy;
use support::procs::{spawn, spawn_upstream, temp, Api, Proc};

const UP_TOKEN: &str = "upstream-secret-91c2";
const FRONT_TOKEN: &str = "front-token";

async fn upstream(dir: &std::path::Path) -> Proc {
    spawn_upstream(
        dir,
        &["name = \"acme/remote\"\nmodel = \"demo\"\n"],
        UP_TOKEN,
    )
    .await
}

/// A front routing acme/remote to `up` (Replicate's API) and acme/cogged to `cogup`
/// (Cog's), both at `url`.
async fn front(port: u16, dir: &std::path::Path, url: &str) -> Proc {
    let args: Vec<String> = [
        "--data-dir",
        &dir.join("front-data").display().to_string(),
        "--api-token",
        FRONT_TOKEN,
        "--shutdown-timeout",
        "1",
        "--upstream",
        &format!("up={url}"),
        "--upstream",
        &format!("cogup=cog+{url}"),
        "--route",
        "acme/remote=upstream:up",
        "--route",
        "acme/cogged=upstream:cogup",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let env = [
        ("HEARTH_UPSTREAM_TOKEN_UP", UP_TOKEN),
        ("HEARTH_UPSTREAM_TOKEN_COGUP", UP_TOKEN),
    ];
    spawn(port, &args, &env, &dir.join("front.log")).await
}

fn input(tag: &str, tokens: u32) -> Value {
    // min_tokens: the demo's random weights may end a prompt at once.
    json!({"prompt": format!("{tag} {}", rand::random::<u64>()), "max_tokens": tokens, "min_tokens": tokens, "temperature": 0})
}

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig}");
}

/// A short prediction through the Cog route: it succeeds with the output the
/// container made, which ran it once.
async fn short_cog_prediction(api: &Api, up: &Api, tag: &str, tokens: u32) {
    let inp = input(tag, tokens);
    let (code, p) = api
        .post(
            "/v1/models/acme/cogged/predictions",
            &json!({"input": inp}),
            Some("wait=60"),
        )
        .await;
    assert_eq!(code, 201, "{p}");
    let id = p["id"].as_str().unwrap();
    let p = api.wait_terminal(id, 120).await;
    assert_eq!(p["status"], "succeeded", "{tokens} tokens: {p}");
    let out = p["output"].as_array().unwrap();
    assert!(!out.is_empty(), "{p}");
    let theirs = up.get(&format!("/v1/predictions/{id}")).await;
    assert_eq!(theirs["output"], p["output"], "{theirs}");
    let runs = up
        .listed_with_tag(inp["prompt"].as_str().unwrap())
        .await
        .len();
    assert_eq!(runs, 1, "ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_cog_predictions_are_created_and_streamed_in_one_request() {
    let dir = temp("cog-short");
    let u = upstream(&dir).await;
    let proxy = FaultProxy::start(&u.base).await;
    let f = front(0, &dir, &proxy.url).await;
    let api = Api::new(&f.base, FRONT_TOKEN);
    let up = Api::new(&u.base, UP_TOKEN);
    for i in 0..8u32 {
        short_cog_prediction(&api, &up, &format!("cogshort{i}"), 1 + i % 2).await;
    }
    // Every request for a stream held back 2 s: a create answered at once and a
    // separate attach would find these already ended there (Cog forgets them); one
    // request that creates and streams cannot miss them.
    proxy.set(|p| p.delay_streams = Duration::from_secs(2));
    for tokens in [1, 2] {
        short_cog_prediction(&api, &up, "cogdelayed", tokens).await;
    }
    drop(f);
    drop(u);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The front's record of `id` once it is `processing`.
async fn processing(api: &Api, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = api.get(&format!("/v1/predictions/{id}")).await;
        if p["status"] == "processing" {
            return p;
        }
        assert!(Instant::now() < deadline, "never processing: {p}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_the_upstream_has_not_confirmed_at_shutdown_is_sent_again_after_the_restart() {
    let dir = temp("drain-cancel");
    let u = upstream(&dir).await;
    let proxy = FaultProxy::start(&u.base).await;
    let mut f = front(0, &dir, &proxy.url).await;
    let port = f.port();
    let api = Api::new(&f.base, FRONT_TOKEN);
    let up = Api::new(&u.base, UP_TOKEN);

    // One long prediction on each kind of upstream, running there.
    let long = |tag: &str| json!({"input": {"prompt": format!("{tag} {}", rand::random::<u64>()), "max_tokens": 8000, "ignore_eos": true}});
    let mut ids = Vec::new();
    for model in ["acme/remote", "acme/cogged"] {
        let (code, p) = api
            .post(
                &format!("/v1/models/{model}/predictions"),
                &long("drain"),
                None,
            )
            .await;
        assert_eq!(code, 201, "{p}");
        ids.push(p["id"].as_str().unwrap().to_string());
    }
    let mut upstream_ids = Vec::new();
    for id in &ids {
        let p = processing(&api, id).await;
        upstream_ids.push(p["hearth"]["upstream_id"].as_str().unwrap().to_string());
    }

    // The upstream stops answering (and running) and cancels go unconfirmed: the
    // drain's cancels cannot end these before the front exits.
    proxy.set(|p| p.swallow_cancels = true);
    signal(&u, "-STOP");
    signal(&f, "-TERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the front did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(&f.log).unwrap();
    assert!(log.contains("left to the next start"), "{log}");
    drop(f);

    // Restarted, the front sends the cancels again; once the upstream runs again it
    // ends both, and so does the front.
    proxy.set(|p| p.swallow_cancels = false);
    f = front(port, &dir, &proxy.url).await;
    signal(&u, "-CONT");
    for (id, uid) in ids.iter().zip(&upstream_ids) {
        let p = api.wait_terminal(id, 180).await;
        assert_eq!(p["status"], "canceled", "{p}");
        let theirs = up.wait_terminal(uid, 60).await;
        assert_eq!(theirs["status"], "canceled", "{theirs}");
    }
    drop(f);
    drop(u);
    let _ = std::fs::remove_dir_all(&dir);
}
