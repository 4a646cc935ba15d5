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

/// Every id in a `GET /v1/predictions` page, and its `next` link.
async fn list_page(s: &support::Server, path: &str) -> (Vec<String>, Option<String>) {
    let r = s.get(path).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    let page: Value = r.json().await.unwrap();
    // Replicate's page shape, filtered or not: nothing added for the filter.
    let keys: BTreeSet<&str> = page
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["next", "previous", "results"]),
        "{page}"
    );
    let ids = page["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    let next = page["next"].as_str().map(|n| {
        let u = reqwest::Url::parse(n).unwrap();
        format!("{}?{}", u.path(), u.query().unwrap_or(""))
    });
    (ids, next)
}

/// The console's list asks the server for one status (hearth's `status` parameter):
/// a prediction older than the newest page is found, a page holds only that status,
/// the `next` link keeps the filter, and a status that does not exist is refused by
/// name. Runs on PostgreSQL too (HEARTH_TEST_STORE=postgres).
#[tokio::test]
async fn predictions_list_filters_by_status_on_the_server() {
    let s = start(1 << 20).await;
    // The oldest: canceled, so an unfiltered first page (100 newest) does not hold it.
    let (code, long) = s.create(support::long_job(), None).await;
    assert_eq!(code, 201, "{long}");
    let long_id = long["id"].as_str().unwrap().to_string();
    let r = s
        .post(&format!("/v1/predictions/{long_id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(s.wait_terminal(&long_id).await["status"], "canceled");
    let mut succeeded = Vec::new();
    for i in 0..101 {
        let (code, p) = s
            .create(
                json!({"prompt": format!("list {i}"), "max_tokens": 1}),
                Some("wait"),
            )
            .await;
        assert_eq!(code, 201, "{p}");
        assert_eq!(p["status"], "succeeded", "{p}");
        succeeded.push(p["id"].as_str().unwrap().to_string());
    }
    succeeded.reverse();

    let (all, _) = list_page(&s, "/v1/predictions").await;
    assert_eq!(all.len(), 100);
    assert!(
        !all.contains(&long_id),
        "the canceled one is on a later page"
    );

    let (canceled, next) = list_page(&s, "/v1/predictions?status=canceled").await;
    assert_eq!(canceled, std::slice::from_ref(&long_id));
    assert_eq!(next, None);

    let (first, next) = list_page(&s, "/v1/predictions?status=succeeded").await;
    assert_eq!(first, succeeded[..100]);
    let next = next.expect("a second page of succeeded ones");
    assert!(next.contains("status=succeeded"), "{next}");
    let (second, after) = list_page(&s, &next).await;
    assert_eq!(second, succeeded[100..]);
    assert_eq!(after, None);

    // Several at once; an empty filter keeps all.
    let (ended, _) = list_page(&s, "/v1/predictions?status=failed,canceled").await;
    assert_eq!(ended, std::slice::from_ref(&long_id));
    let (none, _) = list_page(&s, "/v1/predictions?status=processing").await;
    assert!(none.is_empty());
    let (unfiltered, _) = list_page(&s, "/v1/predictions?status=").await;
    assert_eq!(unfiltered, all);

    let r = s.get("/v1/predictions?status=done").send().await.unwrap();
    assert_eq!(r.status(), 422);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("status: \\\"done\\\" is not a prediction status"),
        "{body}"
    );
}

/// The console's search by the start of an id is the server's (`id_prefix`, hearth's
/// own like `status`): the predictions whose id starts so, with the status filter at
/// once; a prefix too short to narrow the list, or with a character no id has, is
/// refused by name.
#[tokio::test]
async fn predictions_list_searches_by_the_start_of_an_id() {
    let s = start(1 << 20).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (code, p) = s
            .create(
                json!({"prompt": format!("search {i}"), "max_tokens": 1}),
                Some("wait"),
            )
            .await;
        assert_eq!(code, 201, "{p}");
        ids.push(p["id"].as_str().unwrap().to_string());
    }
    let target = &ids[1];
    // Ids are random: a prefix long enough that no other of the three shares it.
    let len = (4..=26)
        .find(|n| ids.iter().filter(|i| i.starts_with(&target[..*n])).count() == 1)
        .unwrap();
    let prefix = &target[..len.max(6)];
    let (found, next) = list_page(&s, &format!("/v1/predictions?id_prefix={prefix}")).await;
    assert_eq!(found, std::slice::from_ref(target));
    assert_eq!(next, None);
    let (whole, _) = list_page(&s, &format!("/v1/predictions?id_prefix={target}")).await;
    assert_eq!(whole, std::slice::from_ref(target));
    let (ok, _) = list_page(
        &s,
        &format!("/v1/predictions?id_prefix={prefix}&status=succeeded"),
    )
    .await;
    assert_eq!(ok, std::slice::from_ref(target));
    let (none, _) = list_page(
        &s,
        &format!("/v1/predictions?id_prefix={prefix}&status=failed"),
    )
    .await;
    assert!(none.is_empty(), "{none:?}");
    let (all, _) = list_page(&s, "/v1/predictions?id_prefix=").await;
    assert_eq!(all.len(), 3, "an empty search keeps all");
    for (bad, says) in [
        ("abc", "3 characters"),
        ("abc%25d", "is in no prediction id"),
        (&"a".repeat(129)[..], "129 characters"),
    ] {
        let r = s
            .get(&format!("/v1/predictions?id_prefix={bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{bad}");
        let body = r.text().await.unwrap();
        assert!(
            body.contains("id_prefix: ") && body.contains(says),
            "{body}"
        );
    }
}

/// A server (token `TOKEN`) serving the demo as `owner/chat` (it has a chat template)
/// and `dummy:demo` as `owner/base` (the same shape with a bare tokenizer: a base
/// model); its address.
async fn serve_chat_and_base(owner: &str) -> std::net::SocketAddr {
    support::serve_demo_and_base((owner, "chat"), (owner, "base")).await
}

/// The console shows a chat view for chat models only: the model document says
/// whether the model has a chat template of its own (`hearth.chat`).
#[tokio::test]
async fn model_documents_say_which_models_are_chat_models() {
    let addr = serve_chat_and_base("hearth").await;
    let c = reqwest::Client::new();
    let get = |path: &str| {
        let req = c
            .get(format!("http://{addr}{path}"))
            .bearer_auth(TOKEN)
            .send();
        async move { req.await.unwrap().json::<Value>().await.unwrap() }
    };
    let list = get("/v1/models").await;
    let chat: Vec<(String, Value)> = list["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["hearth"]["chat"].clone(),
            )
        })
        .collect();
    assert_eq!(
        chat,
        [
            ("hearth/chat".to_string(), json!(true)),
            ("hearth/base".to_string(), json!(false))
        ]
    );
    assert_eq!(get("/v1/models/hearth/base").await["hearth"]["chat"], false);
    assert_eq!(get("/v1/models/hearth/chat").await["hearth"]["chat"], true);
    assert_eq!(
        get("/v1/console/routes").await,
        json!({"routes": []}),
        "no model routed elsewhere"
    );
}

/// Models that run upstream only: the console lists them (`/v1/console/routes`), and
/// their documents as the front answers them carry `hearth.chat` by
/// `upstream::chat_shape`'s rule (here the upstream is a hearth, whose own answer
/// decides) with how the chat view sends a conversation and the route. A turn as the
/// chat view sends it (a `prompt` holding the transcript, the system prompt, max
/// tokens) runs through the Replicate API on the upstream, streamed.
#[tokio::test]
async fn upstream_only_models_are_chat_models_by_the_upstreams_schema() {
    let up = serve_chat_and_base("acme").await;
    let front = support::start_custom(engine_default(), |c| {
        let mut spec =
            hearth_server::upstream::UpstreamSpec::parse(&format!("up=http://{up}")).unwrap();
        spec.token = Some(hearth_server::upstream::Secret::new(TOKEN));
        c.upstreams = vec![spec];
        c.routes = [
            "acme/chat=upstream:up",
            "acme/base=upstream:up",
            "hearth/demo=fallback:up",
        ]
        .iter()
        .map(|r| hearth_server::upstream::ModelRoute::parse(r).unwrap())
        .collect();
    })
    .await;
    let get = |path: &str| {
        let req = front.get(path).send();
        async move {
            let r = req.await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    assert_eq!(
        get("/v1/console/routes").await,
        json!({"routes": [
            {"model": "acme/base", "route": "upstream:up", "served_here": false},
            {"model": "acme/chat", "route": "upstream:up", "served_here": false},
            {"model": "hearth/demo", "route": "fallback:up", "served_here": true},
        ]})
    );
    let chat = get("/v1/models/acme/chat").await;
    assert_eq!(
        chat["hearth"],
        json!({"chat": true, "chat_input": "prompt", "route": "upstream:up"}),
        "{chat}"
    );
    assert!(chat["latest_version"]["openapi_schema"].is_object());
    let base = get("/v1/models/acme/base").await;
    assert_eq!(
        base["hearth"],
        json!({"chat": false, "chat_input": null, "route": "upstream:up"})
    );
    // A model served here keeps its own answer (fallback routes run here first).
    assert_eq!(get("/v1/models/hearth/demo").await["hearth"]["chat"], true);
    // Unauthenticated, the routes are not shown.
    let r = reqwest::get(format!("{}/v1/console/routes", front.base))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The chat view's second turn.
    let r = front
        .post("/v1/models/acme/chat/predictions")
        .json(&json!({"input": {
            "prompt": "User: hello\n\nAssistant: hi there\n\nUser: and now?",
            "system_prompt": "Be brief.", "max_tokens": 8,
        }, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let p: Value = r.json().await.unwrap();
    let stream = p["urls"]["stream"]
        .as_str()
        .expect("a stream URL")
        .to_string();
    let body = reqwest::Client::new()
        .get(&stream)
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.contains("event: output"), "{body}");
    assert!(body.contains("event: done"), "{body}");
    let ended = front.wait_terminal(p["id"].as_str().unwrap()).await;
    assert_eq!(ended["status"], "succeeded", "{ended}");
    assert_eq!(ended["model"], "acme/chat");
}
