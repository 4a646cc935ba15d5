//! Who may call what, and the limits a public endpoint needs: every registered route
//! behind the token (capability URLs and the health check aside), ids never reused,
//! the web page, uploads, connection and header limits, bounded metric labels.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use axum::http::Method;
use hearth_server::routes::{route_table, Access};
use serde_json::{json, Value};
use support::{engine_default, long_job, start, start_custom, TOKEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn concrete(path: &str) -> String {
    path.replace("{id}", "abcdefghijklmnopqrstuvwxyz")
        .replace("{token}", &"0".repeat(32))
        .replace("{owner}", "hearth")
        .replace("{name}", "demo")
        .replace("{version}", &"a".repeat(64))
}

async fn call(s: &support::Server, method: &Method, path: &str, token: Option<&str>) -> u16 {
    let mut r = s
        .client
        .request(method.clone(), format!("{}{}", s.base, concrete(path)));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if *method == Method::POST || *method == Method::PUT {
        r = r.header("content-type", "application/json").body("{}");
    }
    r.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn every_registered_route_refuses_a_request_without_the_token() {
    for (metrics_public, cog_api) in [(false, true), (true, false)] {
        let s = start_custom(engine_default(), |c| {
            c.metrics_public = metrics_public;
            c.cog_api = cog_api;
        })
        .await;
        let table = route_table(&s.state.cfg);
        assert!(table.len() >= 24, "{} routes", table.len());
        // The only doors without a token: a route added later as Public or Capability
        // changes these sets and fails here until someone decides it should.
        let open: BTreeSet<&str> = table
            .iter()
            .filter(|r| r.access == Access::Public)
            .map(|r| r.path)
            .collect();
        let mut want: BTreeSet<&str> = ["/health-check", "/health"].into();
        // The console's files: the same bytes for everyone, no data (console.rs).
        want.extend(hearth_server::routes::console::ASSETS.iter().map(|a| a.0));
        if cog_api {
            want.insert("/openapi.json");
        }
        if metrics_public {
            want.insert("/metrics");
        }
        assert_eq!(open, want);
        let capability: BTreeSet<&str> = table
            .iter()
            .filter(|r| r.access == Access::Capability)
            .map(|r| r.path)
            .collect();
        assert_eq!(
            capability,
            [
                "/streams/{id}/{token}",
                "/p/{id}/{token}",
                "/p/{id}/{token}/json"
            ]
            .into()
        );
        for r in &table {
            let without = call(&s, &r.method, r.path, None).await;
            let wrong = call(&s, &r.method, r.path, Some("not-the-token")).await;
            match r.access {
                Access::Token => {
                    assert_eq!(without, 401, "{} {} without a token", r.method, r.path);
                    assert_eq!(wrong, 401, "{} {} with a wrong token", r.method, r.path);
                    // (Not /shutdown with the token: it would stop the server.)
                    if r.path != "/shutdown" {
                        let with = call(&s, &r.method, r.path, Some(TOKEN)).await;
                        assert_ne!(with, 401, "{} {} with the token", r.method, r.path);
                    }
                }
                // A capability URL with a wrong capability reveals nothing.
                Access::Capability => assert_eq!(without, 404, "{} {}", r.method, r.path),
                Access::Public => assert_eq!(without, 200, "{} {}", r.method, r.path),
            }
        }
        // Unknown paths and wrong methods on guarded paths say nothing either.
        for (m, p) in [
            (Method::GET, "/nope"),
            (Method::DELETE, "/v1/predictions"),
            (Method::GET, "/p/abcdefghijklmnopqrstuvwxyz"),
        ] {
            assert_eq!(call(&s, &m, p, None).await, 401, "{m} {p}");
        }
        assert_eq!(call(&s, &Method::GET, "/nope", Some(TOKEN)).await, 404);
        if !cog_api {
            for p in ["/predictions", "/shutdown"] {
                assert_eq!(call(&s, &Method::POST, p, Some(TOKEN)).await, 404, "{p}");
            }
        }
        s.state.stop.cancel();
        let _ = s.task.await;
    }
}

#[test]
fn no_token_on_a_public_address_is_refused_unless_allowed() {
    let mut c =
        hearth_server::ServerConfig::new("0.0.0.0:8080".parse().unwrap(), std::env::temp_dir());
    let e = c.check().unwrap_err().to_string();
    assert!(
        e.contains("--api-token") && e.contains("--allow-unauthenticated"),
        "{e}"
    );
    c.allow_unauthenticated = true;
    assert!(c.check().is_ok());
    c.allow_unauthenticated = false;
    c.api_tokens = vec!["t".into()];
    assert!(c.check().is_ok());
    let local =
        hearth_server::ServerConfig::new("127.0.0.1:8080".parse().unwrap(), std::env::temp_dir());
    assert!(local.check().is_ok());
}

#[tokio::test]
async fn a_cog_id_that_exists_is_a_409_and_concurrent_creates_have_one_winner() {
    let s = start(1 << 20).await;
    let body = json!({"id": "mine-1", "input": {"prompt": "first", "max_tokens": 2}});
    let r = s.post("/predictions").json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    for (method, path) in [
        (Method::POST, "/predictions"),
        (Method::PUT, "/predictions/mine-1"),
    ] {
        let r = s
            .client
            .request(method, format!("{}{path}", s.base))
            .bearer_auth(TOKEN)
            .json(&json!({"id": "mine-1", "input": {"prompt": "second", "max_tokens": 2}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 409, "{path}");
        // Cog's error shape on Cog's routes.
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["status"], "failed", "{e}");
        assert!(e["error"].as_str().unwrap().contains("mine-1"), "{e}");
    }
    // The original is untouched.
    let p = s.prediction("mine-1").await;
    assert_eq!(p["input"]["prompt"], "first", "{p}");
    // A /v1 prediction's id cannot be taken over through Cog's PUT, even in flight.
    let (_, v1) = s.create(long_job(), None).await;
    let v1_id = v1["id"].as_str().unwrap();
    let r = s
        .client
        .put(format!("{}/predictions/{v1_id}", s.base))
        .bearer_auth(TOKEN)
        .json(&json!({"input": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    // Racing PUTs with one id: exactly one creates it (202 `{id, status}`); the others
    // attach to it in flight (202 with its state, as Cog answers) or, past the race
    // that both lose, are refused (409). Nothing is created twice.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = s.client.clone();
        let url = format!("{}/predictions/race-1", s.base);
        tasks.push(tokio::spawn(async move {
            let r = c
                .put(url)
                .bearer_auth(TOKEN)
                .header("Prefer", "respond-async")
                .json(&json!({"input": {"prompt": format!("racer {i}"), "max_tokens": 200, "ignore_eos": true}}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    let mut created = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            202 if body.get("input").is_none() => created += 1,
            202 => assert_eq!(body["id"], "race-1"),
            409 => {}
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(created, 1);
}

#[tokio::test]
async fn urls_web_is_a_live_page_behind_the_stream_capability() {
    let s = start(1 << 20).await;
    let (_, p) = s
        .create(json!({"prompt": "web", "max_tokens": 3}), Some("wait"))
        .await;
    let web = p["urls"]["web"].as_str().unwrap().to_string();
    assert!(web.starts_with(&format!("{}/p/{}/", s.base, p["id"].as_str().unwrap())));
    // A browser sends no token.
    let r = s.client.get(&web).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let h = r.headers().clone();
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
    let csp = h["content-security-policy"].to_str().unwrap().to_string();
    assert!(
        csp.contains("script-src 'nonce-") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert_eq!(h["referrer-policy"], "no-referrer");
    let html = r.text().await.unwrap();
    let nonce = csp
        .split("'nonce-")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap();
    assert!(html.contains(&format!("<script nonce=\"{nonce}\">")));
    assert!(!html.contains("{{NONCE}}"));
    let j: Value = s
        .client
        .get(format!("{web}/json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(j["id"], p["id"]);
    assert_eq!(j["output"], p["output"]);
    let wrong = format!("{}/{}", web.rsplit_once('/').unwrap().0, "f".repeat(32));
    assert_eq!(
        s.client.get(&wrong).send().await.unwrap().status().as_u16(),
        404
    );
}

#[tokio::test]
async fn uploads_are_capped_streamed_and_served_as_attachments() {
    let s = start_custom(engine_default(), |c| c.max_file_bytes = 1000).await;
    let form = |n: usize| {
        reqwest::multipart::Form::new().part(
            "content",
            reqwest::multipart::Part::bytes(vec![b'<'; n])
                .file_name("page.html")
                .mime_str("text/html")
                .unwrap(),
        )
    };
    let r = s
        .post("/v1/files")
        .multipart(form(2000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let e: Value = r.json().await.unwrap();
    assert!(e["detail"].as_str().unwrap().contains("content"), "{e}");
    let r = s
        .post("/v1/files")
        .multipart(form(500))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let meta: Value = r.json().await.unwrap();
    assert_eq!(meta["size"], 500);
    let d = s
        .get(
            meta["urls"]["get"]
                .as_str()
                .unwrap()
                .trim_start_matches(&s.base),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(d.headers()["x-content-type-options"], "nosniff");
    assert!(d.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment"));
    assert_eq!(d.bytes().await.unwrap().len(), 500);
    let leftovers: Vec<_> = std::fs::read_dir(s.data.0.join("files"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".upload"))
        .collect();
    assert!(leftovers.is_empty(), "a refused upload left {leftovers:?}");
}

#[cfg(unix)]
#[tokio::test]
async fn the_secret_and_the_database_are_private_to_the_server() {
    use std::os::unix::fs::PermissionsExt;
    let s = start(1 << 20).await;
    // On PostgreSQL (HEARTH_TEST_STORE) the secret and the predictions are in the
    // database: only the folder is on disk.
    let on_disk: &[(&str, u32)] = if std::env::var("HEARTH_TEST_STORE").as_deref() == Ok("postgres")
    {
        &[("files", 0o700)]
    } else {
        &[
            ("webhook_secret", 0o600),
            ("predictions.sqlite3", 0o600),
            ("files", 0o700),
        ]
    };
    for &(f, mode) in on_disk {
        let m = std::fs::metadata(s.data.0.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, mode, "{f}: {m:o}");
    }
}

#[tokio::test]
async fn slow_headers_are_cut_off_and_connections_are_capped() {
    let s = start_custom(engine_default(), |c| {
        c.header_read_timeout = Duration::from_secs(1);
        c.max_connections = 2;
    })
    .await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /health-check HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Cut off by the 1 s header timeout: nothing else would close it within this
    // bound (the idle timeout is 120 s), however slow the machine.
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), slow.read_to_end(&mut buf))
        .await
        .expect("a client that never finishes its headers is disconnected");
    // Two idle connections hold both slots; a third is refused with a 503.
    let _a = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.to_lowercase().contains("retry-after: 1"), "{text}");
}

#[tokio::test]
async fn metric_labels_stay_bounded_and_internal_errors_name_only_a_reference() {
    let s = start(1 << 20).await;
    let m = Method::from_bytes(b"BREW").unwrap();
    let _ = s
        .client
        .request(m, format!("{}/v1/account", s.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let text = s
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("BREW"), "raw method in a label");
    assert!(text.contains("method=\"other\""), "{text}");
    s.state.store.inject_write_failures(true);
    let (status, e) = s
        .create(json!({"prompt": "x", "max_tokens": 2}), None)
        .await;
    s.state.store.inject_write_failures(false);
    assert_eq!(status, 500, "{e}");
    let detail = e["detail"].as_str().unwrap();
    assert!(detail.contains("reference"), "{detail}");
    assert!(
        !detail.to_lowercase().contains("inject"),
        "internal text leaked: {detail}"
    );
}

#[tokio::test]
async fn a_body_without_input_is_a_422_naming_input() {
    let s = start(1 << 20).await;
    for (path, body) in [
        ("/v1/models/hearth/demo/predictions", json!({})),
        (
            "/v1/deployments/hearth/demo/predictions",
            json!({"webhook": null}),
        ),
        ("/v1/predictions", json!({"version": "a".repeat(64)})),
    ] {
        let r = s.post(path).json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 422, "{path}");
        let e: Value = r.json().await.unwrap();
        assert!(
            e["detail"].as_str().unwrap().starts_with("input"),
            "{path}: {e}"
        );
    }
    let _ = long_job();
}
