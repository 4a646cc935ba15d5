//! A cancel reaches the upstream at once even while the front's poll of that
//! prediction is stuck in a `GET` the upstream never answers: a hung upstream holds
//! such a `GET` for the client's whole 30 s timeout, and the cancel must not wait
//! behind it. A front `hearth serve` routes to an upstream `hearth serve` through the
//! fault-injecting proxy (`support::fault_proxy`), which names no event streams (so
//! the front polls) and then hangs every plain `GET`, while the upstream is held
//! still (SIGSTOP) so the prediction cannot end before the cancel could reach it.

mod support;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;
use support::fault_proxy::FaultProxy;
use support::procs::{spawn, spawn_upstream, temp, Api, Proc};

const UP_TOKEN: &str = "upstream-secret-7d1e";
const FRONT_TOKEN: &str = "front-token";

fn signal(p: &Proc, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_is_forwarded_at_once_while_a_poll_hangs_on_the_upstream() {
    let dir = temp("cancel-hung-get");
    let u = spawn_upstream(
        &dir,
        &["name = \"acme/remote\"\nmodel = \"demo\"\n"],
        UP_TOKEN,
    )
    .await;
    let proxy = FaultProxy::start(&u.base).await;
    proxy.set(|p| p.strip_stream_urls = true);
    let args: Vec<String> = [
        "--data-dir",
        &dir.join("front-data").display().to_string(),
        "--api-token",
        FRONT_TOKEN,
        "--upstream",
        &format!("up={}", proxy.url),
        "--route",
        "acme/remote=upstream:up",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let f = spawn(
        0,
        &args,
        &[("HEARTH_UPSTREAM_TOKEN_UP", UP_TOKEN)],
        &dir.join("front.log"),
    )
    .await;
    let api = Api::new(&f.base, FRONT_TOKEN);
    let up = Api::new(&u.base, UP_TOKEN);

    let body = json!({"input": {"prompt": format!("hung {}", rand::random::<u64>()), "max_tokens": 8000, "ignore_eos": true}});
    let (code, p) = api
        .post("/v1/models/acme/remote/predictions", &body, None)
        .await;
    assert_eq!(code, 201, "{p}");
    let id = p["id"].as_str().unwrap().to_string();
    // Processing upstream, seen here through the front's polls.
    let deadline = Instant::now() + Duration::from_secs(60);
    let uid = loop {
        let p = api.get(&format!("/v1/predictions/{id}")).await;
        if p["status"] == "processing" {
            break p["hearth"]["upstream_id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "never processing: {p}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // The upstream hangs every GET, and is held still (SIGSTOP) so the prediction
    // cannot end on its own meanwhile. While output flows the front polls every
    // 200 ms: its next poll is stuck in a GET.
    proxy.set(|p| p.hang_gets = true);
    signal(&u, "-STOP");
    let deadline = Instant::now() + Duration::from_secs(60);
    while proxy.hung.open.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no poll hung");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hung = proxy.hung.started.load(Ordering::SeqCst);
    let asked = Instant::now();
    let (code, p) = api
        .post(&format!("/v1/predictions/{id}/cancel"), &json!({}), None)
        .await;
    assert_eq!(code, 200, "{p}");
    // The cancel was forwarded at once: it reached the upstream's side before any
    // later poll, and long before the hung GET's 30 s timeout would have let it go
    // (the front drops that GET as the cancel is asked). The bound is that timeout,
    // far from what the forward takes even on a loaded machine (3 s was not).
    let deadline = asked + Duration::from_secs(20);
    let at_cancel = loop {
        if let Some(&at) = proxy.hung.at_cancels.lock().unwrap().first() {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "the cancel had not reached the upstream 20 s after it was asked: held behind the hung poll"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        at_cancel.0, hung,
        "a poll came before the cancel ({hung} GETs hung before it was asked; (hung, still open) as it came: {at_cancel:?})"
    );
    // Let go, the upstream reads the cancel waiting in its socket and ends the
    // prediction, long before it could finish 8000 tokens. Read straight from the
    // upstream.
    signal(&u, "-CONT");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let theirs = up.get(&format!("/v1/predictions/{uid}")).await;
        if theirs["status"] == "canceled" {
            break;
        }
        assert!(
            Instant::now() < deadline && theirs["status"] == "processing",
            "the upstream did not end the prediction canceled: {theirs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The upstream answers again: the front reads the end.
    proxy.set(|p| p.hang_gets = false);
    let p = api.wait_terminal(&id, 90).await;
    assert_eq!(p["status"], "canceled", "{p}");
    drop(f);
    drop(u);
    let _ = std::fs::remove_dir_all(&dir);
}
