//! The console's server side for hybrid serving: the predictions list filtered by
//! model on the server (`model`, hearth's own like `status`), and the operations
//! history's local and upstream sides of routed models and its upstream panels (by
//! name: never an upstream's URL or token). A front server routes `hearth/demo` as a
//! canary (half upstream) and `acme/base` upstream only, to a second server.

mod support;

use std::time::{Duration, Instant};

use hearth_server::upstream::{ModelRoute, Secret, UpstreamSpec};
use serde_json::{json, Value};
use support::{engine_default, Server, TOKEN};

/// The upstream's address and the front routing to it.
async fn front_and_upstream() -> (std::net::SocketAddr, Server) {
    let up = support::serve_demo_and_base(("hearth", "demo"), ("acme", "base")).await;
    let front = support::start_custom(engine_default(), |c| {
        let mut spec = UpstreamSpec::parse(&format!("up=http://{up}")).unwrap();
        spec.token = Some(Secret::new(TOKEN));
        c.upstreams = vec![spec];
        c.routes = ["hearth/demo=canary:up:50", "acme/base=upstream:up"]
            .iter()
            .map(|r| ModelRoute::parse(r).unwrap())
            .collect();
    })
    .await;
    (up, front)
}

async fn run(front: &Server, model: &str, i: usize) -> String {
    let r = front
        .post(&format!("/v1/models/{model}/predictions"))
        .header("Prefer", "wait")
        .json(&json!({"input": {"prompt": format!("ops {i}"), "max_tokens": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let p: Value = r.json().await.unwrap();
    let id = p["id"].as_str().unwrap().to_string();
    let p = front.wait_terminal(&id).await;
    assert_eq!(p["status"], "succeeded", "{p}");
    id
}

/// The ids of a `GET /v1/predictions` page and its `next` link.
async fn ids(front: &Server, query: &str) -> (Vec<String>, Option<String>) {
    let r = front
        .get(&format!("/v1/predictions?{query}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{query}");
    let page: Value = r.json().await.unwrap();
    let ids = page["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    (ids, page["next"].as_str().map(str::to_string))
}

/// The list keeps one model's predictions, here or upstream, with the status filter
/// at once; a value that is not `owner/name`, or too long, is refused with a 400
/// naming the field.
#[tokio::test]
async fn predictions_list_filters_by_model_on_the_server() {
    let (_up, front) = front_and_upstream().await;
    let mut demo = Vec::new();
    let mut base = Vec::new();
    for i in 0..3 {
        demo.push(run(&front, "hearth/demo", i).await);
    }
    for i in 0..2 {
        base.push(run(&front, "acme/base", i).await);
    }
    demo.reverse();
    base.reverse();
    assert_eq!(ids(&front, "model=acme/base").await, (base.clone(), None));
    assert_eq!(ids(&front, "model=acme%2Fbase").await.0, base);
    assert_eq!(ids(&front, "model=hearth/demo").await.0, demo);
    assert_eq!(
        ids(&front, "model=acme/base&status=succeeded").await.0,
        base
    );
    assert!(ids(&front, "model=acme/base&status=failed")
        .await
        .0
        .is_empty());
    assert!(ids(&front, "model=acme/nothing").await.0.is_empty());
    assert_eq!(ids(&front, "model=").await.0.len(), 5, "empty keeps all");
    let prefix = &base[0][..8];
    assert_eq!(
        ids(&front, &format!("model=acme/base&id_prefix={prefix}"))
            .await
            .0,
        [base[0].clone()]
    );
    for (bad, says) in [
        ("acme", "is not owner/name"),
        ("a/b/c", "is not owner/name"),
        ("/base", "is not owner/name"),
        ("acme%20x/base", "is not owner/name"),
        (&format!("a/{}", "b".repeat(199))[..], "201 characters"),
    ] {
        let r = front
            .get(&format!("/v1/predictions?model={bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let body = r.text().await.unwrap();
        assert!(body.contains("model: ") && body.contains(says), "{body}");
    }
}

/// A routed model's panel compares what its local engine and its upstream served
/// (counts and latency per side add up to the predictions made), a model that runs
/// upstream only has its upstream side and no engine, and the upstream's panel counts
/// its calls and shows its circuit; its URL and token appear nowhere.
#[tokio::test]
async fn ops_history_compares_the_local_and_upstream_sides() {
    let (up, front) = front_and_upstream().await;
    // The sides' first point before any prediction: every later one is a difference.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ops: Value = front
            .get("/v1/console/ops")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let sided = ops["models"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["sides"]["local"].is_object())
            .count();
        if sided == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no sides sampled: {ops}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    const N: usize = 16;
    for i in 0..N {
        run(&front, "hearth/demo", i).await;
    }
    for i in 0..2 {
        run(&front, "acme/base", i).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = front
            .get("/v1/console/ops")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            !body.contains(&up.to_string()) && !body.contains(TOKEN),
            "{body}"
        );
        let ops: Value = serde_json::from_str(&body).unwrap();
        let model = |name: &str| {
            ops["models"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["model"] == name)
                .cloned()
                .unwrap_or(Value::Null)
        };
        let (demo, base) = (model("hearth/demo"), model("acme/base"));
        let total = |m: &Value, side: &str| m["sides"][side]["total"]["succeeded"].as_u64();
        let (local, upstream) = (
            total(&demo, "local").unwrap_or(0),
            total(&demo, "upstream").unwrap_or(0),
        );
        let window = |m: &Value, side: &str| m["sides"][side]["window"]["succeeded"].as_u64();
        let u = &ops["upstreams"][0];
        // A side's latency histogram and its ended counts are read one after the
        // other, so a sample taken as a prediction ends can have it in one and not yet
        // in the other: each must reach the count, not one of them and then the other.
        let side_adds_up = |side: &str, n: u64| {
            let served: u64 = demo["sides"][side]["samples"].as_array().map_or(0, |a| {
                a.iter().filter_map(|x| x["succeeded"].as_u64()).sum()
            });
            demo["sides"][side]["latency"]["count"].as_u64() == Some(n) && served == n
        };
        let done = local + upstream == N as u64
            && total(&base, "upstream") == Some(2)
            && window(&demo, "upstream") == Some(upstream)
            && window(&demo, "local") == Some(local)
            && side_adds_up("local", local)
            && side_adds_up("upstream", upstream)
            && u["total"]["ok"].as_u64().unwrap_or(0) > 0;
        if done {
            // A 50% canary over 16 ids: both sides served some (1 in 32,768 not).
            assert!(local > 0 && upstream > 0, "{local} {upstream}");
            assert_eq!(demo["route"], "canary:up:50");
            assert_eq!(demo["engine"], true);
            for side in ["local", "upstream"] {
                let lat = &demo["sides"][side]["latency"];
                assert!(lat["p50"].as_f64().is_some(), "{lat}");
            }
            assert_eq!(base["engine"], false);
            assert_eq!(base["state"], "UPSTREAM");
            assert_eq!(base["route"], "upstream:up");
            assert_eq!(total(&base, "local"), Some(0));
            assert_eq!(u["name"], "up");
            assert_eq!(u["circuit"], "closed");
            assert_eq!(u["total"]["errors"], 0, "{u}");
            break;
        }
        assert!(Instant::now() < deadline, "the sides never added up: {ops}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
