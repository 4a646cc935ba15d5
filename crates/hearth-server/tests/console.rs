//! The web console's server side: `/` sends browsers to `/ui` and keeps Cog's JSON
//! index for API clients, the console's files answer without a token under a strict
//! Content-Security-Policy and reference only each other, and the operations history
//! needs the token and records what the engine did.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use hearth_server::routes::console::ASSETS;
use serde_json::{json, Value};
use support::{engine_default, start, start_custom, TOKEN};

const CHROMIUM_ACCEPT: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8";

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

#[tokio::test]
async fn root_redirects_browsers_and_keeps_the_json_index_for_api_clients() {
    let s = start(1 << 20).await;
    let c = no_redirects();
    let root = format!("{}/", s.base);
    // A browser, without a token: to the console, which asks for one itself.
    let r = c
        .get(&root)
        .header("accept", CHROMIUM_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui");
    // API clients: the token is still required, and with it Cog's index as before.
    for accept in [None, Some("*/*"), Some("application/json")] {
        let mut req = c.get(&root);
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        assert_eq!(req.send().await.unwrap().status(), 401, "{accept:?}");
        let mut req = c.get(&root).bearer_auth(TOKEN);
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200, "{accept:?}");
        let index: Value = r.json().await.unwrap();
        assert_eq!(index["docs_url"], "/docs", "{index}");
    }
    // Only `/`: other paths a browser asks for are answered as ever.
    let r = c
        .get(format!("{}/v1/models", s.base))
        .header("accept", CHROMIUM_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A POST to `/` is not a navigation.
    let r = c
        .post(&root)
        .header("accept", CHROMIUM_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 303);
}

#[tokio::test]
async fn console_files_answer_without_a_token_under_a_strict_policy() {
    let s = start(1 << 20).await;
    let c = no_redirects();
    let paths: BTreeSet<&str> = ASSETS.iter().map(|a| a.0).collect();
    for (path, content_type, _) in ASSETS {
        let r = c.get(format!("{}{path}", s.base)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        assert_eq!(h["content-type"], *content_type, "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self';"), "{path}: {csp}");
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        // (SVG's namespace is a name, not a load.)
        let body = r
            .text()
            .await
            .unwrap()
            .replace("\"http://www.w3.org/2000/svg\"", "SVG_NS");
        // Model output is data: only text nodes, never markup, and nothing from
        // another origin.
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            "http://",
            "https://",
        ] {
            // (The file input's placeholder says "https://…": a hint, not a load.)
            let hits = body.matches(banned).count();
            let allowed = usize::from(banned == "https://" && path == &"/ui/form.js");
            assert!(hits <= allowed, "{path} contains {banned}");
        }
        // Every file it loads is one the server registers.
        for reference in references(&body) {
            assert!(
                paths.contains(reference.as_str()),
                "{path} loads {reference}"
            );
        }
        // The token never goes into a URL.
        assert!(!body.contains("?token"), "{path}");
    }
    assert!(paths.contains("/ui/app.js"));
}

/// `src="/ui/…"`, `href="/ui/…"` and `from "./x.js"` (resolved against /ui/).
fn references(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    for prefix in ["src=\"", "href=\"", "from \""] {
        for part in body.split(prefix).skip(1) {
            let target = part.split('"').next().unwrap_or("");
            if let Some(rel) = target.strip_prefix("./") {
                out.push(format!("/ui/{rel}"));
            } else if target.starts_with("/ui") {
                out.push(target.to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn ops_history_needs_the_token_and_records_generation() {
    let s = start_custom(engine_default(), |_| {}).await;
    let url = format!("{}/v1/console/ops", s.base);
    assert_eq!(
        s.client.get(&url).send().await.unwrap().status(),
        401,
        "no token"
    );
    assert_eq!(
        s.client
            .get(&url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    // A first sample before the prediction: the later ones are differences from it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ops: Value = s
            .get("/v1/console/ops")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ops["models"][0]["samples"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            break;
        }
        assert!(Instant::now() < deadline, "no sample taken: {ops}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, p) = s
        .create(
            json!({"prompt": "ops history", "max_tokens": 64, "ignore_eos": true}),
            Some("wait"),
        )
        .await;
    assert_eq!(code, 201, "{p}");
    assert_eq!(p["status"], "succeeded", "{p}");
    // The sampler runs each second: within a bounded wait, a sample shows the
    // tokens generated and the success, and the window's TTFT distribution the request.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ops: Value = s
            .get("/v1/console/ops")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let m = &ops["models"][0];
        assert_eq!(m["model"], "hearth/demo", "{ops}");
        let samples = m["samples"].as_array().cloned().unwrap_or_default();
        let tokens = samples
            .iter()
            .any(|x| x["tokens_per_s"].as_f64().unwrap_or(0.0) > 0.0);
        let succeeded: u64 = samples.iter().filter_map(|x| x["succeeded"].as_u64()).sum();
        if tokens && succeeded == 1 && m["ttft"]["count"] == 1 {
            assert_eq!(m["state"], "READY");
            assert!(samples.iter().all(|x| x["kv_total"].as_u64() > Some(0)));
            assert!(m["ttft"]["p50"].as_f64().is_some(), "{m}");
            assert!(samples.len() <= hearth_server::ops_history::KEEP);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no sample shows the prediction: {ops}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
