//! What one client or one web page can do to a server exposed to them: rebinding and
//! cross-site requests, bodies that skip a CORS preflight, hostile stream ids, too
//! many connections (or idle and old ones), too much queued work, oversized upload
//! metadata, and the upload debris of a crash.

mod support;

use std::time::Duration;

use hearth_runtime::EngineConfig;
use serde_json::{json, Value};
use support::{engine_default, long_job, start, start_custom, start_in, TempDir, TOKEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn port_of(base: &str) -> &str {
    base.rsplit(':').next().unwrap()
}

async fn problem(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if status >= 400 {
        assert!(ct.contains("json"), "{status}: {ct}");
    }
    (status, body["detail"].as_str().unwrap_or("").to_string())
}

#[tokio::test]
async fn foreign_host_names_are_refused_and_known_ones_served() {
    let s = start_custom(engine_default(), |c| {
        c.allowed_hosts = vec!["hearth.internal".into(), ".svc.cluster.local".into()];
        c.public_url = Some("https://ai.example.com".into());
    })
    .await;
    let port = port_of(&s.base).to_string();
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "[::1]".to_string(),
        "hearth.internal".into(),
        format!("hearth.ns.svc.cluster.local:{port}"),
        "ai.example.com".into(),
    ] {
        let r = s
            .get("/v1/predictions")
            .header("host", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{host}");
    }
    // A rebinding page's name: refused before anything is read or run.
    let r = s
        .get("/v1/webhooks/default/secret")
        .header("host", format!("attacker.example:{port}"))
        .send()
        .await
        .unwrap();
    let (status, detail) = problem(r).await;
    assert_eq!(status, 403);
    assert!(detail.contains("--allowed-host"), "{detail}");
    // Probes send whatever Host they like.
    for path in ["/health", "/health-check"] {
        let r = s
            .client
            .get(format!("{}{path}", s.base))
            .header("host", "probe.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
}

#[tokio::test]
async fn cross_site_requests_and_undeclared_bodies_change_nothing() {
    let s = start_custom(engine_default(), |c| c.api_tokens.clear()).await;
    let create = format!("{}/v1/models/hearth/demo/predictions", s.base);
    let body = json!({"input": {"prompt": "x", "max_tokens": 2}}).to_string();
    // What a page of another site can send without a preflight.
    let refused = [
        ("origin", "http://evil.example", "application/json"),
        ("origin", "null", "application/json"),
        ("sec-fetch-site", "cross-site", "application/json"),
    ];
    for (h, v, ct) in refused {
        let r = s
            .client
            .post(&create)
            .header(h, v)
            .header("content-type", ct)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let (status, detail) = problem(r).await;
        assert_eq!(status, 403, "{h}: {v}");
        assert!(detail.to_lowercase().contains(h), "{detail}");
    }
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut r = s.client.post(&create).body(body.clone());
        if let Some(ct) = ct {
            r = r.header("content-type", ct);
        }
        let (status, detail) = problem(r.send().await.unwrap()).await;
        assert_eq!(status, 415, "{ct:?}");
        assert!(detail.contains("application/json"), "{detail}");
    }
    let list: Value = s
        .get("/v1/predictions")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        list["results"].as_array().unwrap().len(),
        0,
        "nothing created"
    );
    // The shutdown a page would aim at: refused, the server still serves.
    let r = s
        .client
        .post(format!("{}/shutdown", s.base))
        .header("content-type", "text/plain")
        .header("origin", "http://evil.example")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = s
        .client
        .post(format!("{}/shutdown", s.base))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    assert!(!s.state.stop.is_cancelled(), "shut down by a page");
    // Same-origin pages and JSON with parameters pass; an empty body needs no type.
    let r = s
        .client
        .post(&create)
        .header("origin", s.base.clone())
        .header("sec-fetch-site", "same-origin")
        .header("content-type", "application/json; charset=utf-8")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s
        .client
        .post(format!("{}/v1/predictions/{id}/cancel", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Uploads stay multipart.
    let form = reqwest::multipart::Form::new().part(
        "content",
        reqwest::multipart::Part::bytes(b"hi".to_vec()).file_name("a.txt"),
    );
    let r = s
        .client
        .post(format!("{}/v1/files", s.base))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
}

#[tokio::test]
async fn a_last_event_id_past_the_last_index_is_a_400_not_a_replay_or_a_panic() {
    let s = start(1 << 20).await;
    let (_, p) = s
        .create(json!({"prompt": "x", "max_tokens": 3}), Some("wait=10"))
        .await;
    let url = p["urls"]["stream"].as_str().unwrap().to_string();
    for bad in ["1:18446744073709551615", "1:abc", "18446744073709551616"] {
        let r = s
            .client
            .get(&url)
            .header("Last-Event-ID", bad)
            .send()
            .await
            .unwrap();
        let (status, detail) = problem(r).await;
        assert_eq!(status, 400, "{bad}");
        assert!(detail.contains("Last-Event-ID"), "{detail}");
    }
    let r = s.client.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("event: done"));
}

/// Reads what the server sends until it closes the connection (None: still open
/// after `within`).
async fn read_until_closed(
    stream: &mut tokio::net::TcpStream,
    within: Duration,
) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn one_address_cannot_hold_every_connection() {
    let s = start_custom(engine_default(), |c| c.max_connections_per_ip = 2).await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let held = [
        tokio::net::TcpStream::connect(&addr).await.unwrap(),
        tokio::net::TcpStream::connect(&addr).await.unwrap(),
    ];
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let got = read_until_closed(&mut third, Duration::from_secs(10))
        .await
        .expect("the third connection was kept open");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(text.contains("retry-after"), "{text}");
    assert!(text.contains("--max-connections-per-ip 2"), "{text}");
    drop(held);
    // Its connections closed, the address may connect again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = reqwest::Client::new()
            .get(format!("{}/health", s.base))
            .send()
            .await;
        if r.is_ok_and(|r| r.status().as_u16() == 200) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP/2 connection (prior knowledge) that sends its preface and settings, then
/// no request.
async fn silent_http2(addr: &str) -> tokio::net::TcpStream {
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // An empty SETTINGS frame.
    c.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    c
}

/// Behaves as an idle HTTP/2 client does (acknowledges the server's SETTINGS and
/// PINGs, sends nothing else) until the server closes the connection: true, or
/// false if it is still open after `within`.
async fn idle_http2_until_closed(c: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout_at(deadline, c.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        // Whole frames: 9-byte header (length, type, flags, stream), then the payload.
        while buf.len() >= 9 {
            let len = ((buf[0] as usize) << 16) | ((buf[1] as usize) << 8) | buf[2] as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            let ack = match (kind, flags & 1) {
                (4, 0) => vec![0, 0, 0, 4, 1, 0, 0, 0, 0],
                (6, 0) => [&[0, 0, 8, 6, 1, 0, 0, 0, 0][..], &payload].concat(),
                _ => continue,
            };
            if c.write_all(&ack).await.is_err() {
                return true;
            }
        }
    }
}

#[tokio::test]
async fn idle_and_old_connections_are_closed_http1_and_http2() {
    let s = start_custom(engine_default(), |c| {
        c.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut h2 = silent_http2(&addr).await;
    assert!(
        idle_http2_until_closed(&mut h2, Duration::from_secs(15)).await,
        "an idle HTTP/2 connection stayed open"
    );
    let mut h1 = tokio::net::TcpStream::connect(&addr).await.unwrap();
    h1.write_all(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut h1, Duration::from_secs(15))
        .await
        .expect("an idle HTTP/1.1 keep-alive connection stayed open");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));

    // Busy but old: closed once past its age.
    let s = start_custom(engine_default(), |c| {
        c.max_connection_age = Duration::from_secs(1);
    })
    .await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut h2 = silent_http2(&addr).await;
    assert!(
        idle_http2_until_closed(&mut h2, Duration::from_secs(15)).await,
        "an HTTP/2 connection outlived its maximum age"
    );
}

fn one_at_a_time() -> EngineConfig {
    EngineConfig {
        max_num_seqs: 1,
        max_waiting: 16,
        ..engine_default()
    }
}

#[tokio::test]
async fn one_client_cannot_fill_the_queue() {
    let s = start_custom(one_at_a_time(), |c| {
        c.max_queued_per_client = 2;
        c.api_tokens = vec![TOKEN.into(), "other-token".into()];
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, p) = s.create(long_job(), None).await;
        assert_eq!(status, 201, "{p}");
        ids.push(p["id"].as_str().unwrap().to_string());
    }
    let r = s
        .post("/v1/models/hearth/demo/predictions")
        .json(&json!({"input": long_job()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["retry-after"], "1");
    let (status, detail) = problem(r).await;
    assert_eq!(status, 429);
    assert!(detail.contains("--max-queued-per-client 2"), "{detail}");
    // OpenAI's routes count against the same quota, in OpenAI's shape.
    let r = s
        .post("/v1/completions")
        .json(&json!({"model": "hearth/demo", "prompt": "x", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    // Another client is not held up by this one.
    let r = s
        .client
        .post(format!("{}/v1/models/hearth/demo/predictions", s.base))
        .bearer_auth("other-token")
        .json(&json!({"input": {"prompt": "x", "max_tokens": 2}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    // One ended: room for one more.
    s.post(&format!("/v1/predictions/{}/cancel", ids[0]))
        .send()
        .await
        .unwrap();
    s.wait_terminal(&ids[0]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, p) = s
            .create(json!({"prompt": "x", "max_tokens": 2}), None)
            .await;
        if status == 201 {
            break;
        }
        assert_eq!(status, 429, "{p}");
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.post(&format!("/v1/predictions/{}/cancel", ids[1]))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn upload_metadata_is_capped_and_a_crash_s_temp_files_are_swept() {
    let data = TempDir::new("sweep");
    std::fs::create_dir_all(data.0.join("files")).unwrap();
    let debris = data.0.join("files").join(".upload-left-by-a-crash");
    std::fs::write(&debris, b"partial").unwrap();
    // Untouched for two hours (with a shared store only such files are swept).
    std::fs::File::options()
        .write(true)
        .open(&debris)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    let s = start_in(data, engine_default(), |_| {}).await;
    assert!(!debris.exists(), "a crash's partial upload was left behind");
    let form = |meta: String| {
        reqwest::multipart::Form::new()
            .part(
                "content",
                reqwest::multipart::Part::bytes(b"hi".to_vec()).file_name("a.txt"),
            )
            .text("metadata", meta)
    };
    let big = json!({"k": "x".repeat(70 << 10)}).to_string();
    let r = s
        .post("/v1/files")
        .multipart(form(big))
        .send()
        .await
        .unwrap();
    let (status, detail) = problem(r).await;
    assert_eq!(status, 413);
    assert!(detail.contains("metadata"), "{detail}");
    let r = s
        .post("/v1/files")
        .multipart(form(json!({"k": "v"}).to_string()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    // Listed a page at a time, every file once.
    for _ in 0..100 {
        let r = s
            .post("/v1/files")
            .multipart(form("{}".into()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
    let mut url = format!("{}/v1/files", s.base);
    let (mut seen, mut pages) = (std::collections::HashSet::new(), 0);
    loop {
        let page: Value = s
            .client
            .get(&url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for f in page["results"].as_array().unwrap() {
            assert!(
                seen.insert(f["id"].as_str().unwrap().to_string()),
                "listed twice"
            );
        }
        pages += 1;
        match page["next"].as_str() {
            Some(next) => url = next.to_string(),
            None => break,
        }
    }
    assert_eq!((seen.len(), pages), (101, 2));
    let r = s.get("/v1/files?cursor=bm9wZQ").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

#[tokio::test]
async fn a_token_an_authorization_header_cannot_carry_is_refused_at_startup() {
    for bad in ["has space", "caf\u{e9}", ""] {
        let mut cfg =
            hearth_server::ServerConfig::new("127.0.0.1:0".parse().unwrap(), std::env::temp_dir());
        cfg.api_tokens = vec!["good".into(), bad.into()];
        let e = cfg.check().unwrap_err().to_string();
        assert!(e.contains("--api-token: token 2 of 2"), "{e}");
        assert!(
            !e.contains(bad) || bad.is_empty(),
            "the token is not logged: {e}"
        );
    }
}

/// A webhook receiver that accepts connections and never answers: counts the
/// connections it was sent and those the sender has given up on (closed).
struct Tarpit {
    url: String,
    opened: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

async fn tarpit() -> Tarpit {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (o, c) = (opened.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            o.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                // Reads the request and says nothing, until the sender hangs up.
                let mut buf = [0u8; 4096];
                while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Tarpit {
        url,
        opened,
        closed,
    }
}

/// Receivers that never answer hold at most their host's share of the dispatcher
/// (each attempt waits out its 10 s timeout): another receiver's webhook goes out
/// while every attempt at the tarpit is still waiting.
#[tokio::test]
async fn a_tarpit_receiver_does_not_hold_back_other_receivers_webhooks() {
    use std::sync::atomic::Ordering;
    let s = start(1 << 20).await;
    let pit = tarpit().await;
    let healthy = support::receiver(0, 200).await;
    let create = |hook: &str| {
        s.post("/v1/predictions")
            .header("prefer", "wait=30")
            .json(&json!({
                "version": "hearth/demo",
                "input": {"prompt": "x", "max_tokens": 1},
                "webhook": hook,
                "webhook_events_filter": ["completed"],
            }))
            .send()
    };
    // More deliveries to the tarpit than the dispatcher has slots in all.
    for _ in 0..40 {
        let r = create(&pit.url).await.unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pit.opened.load(Ordering::SeqCst) < hearth_server::store::PER_HOST_IN_FLIGHT {
        assert!(
            std::time::Instant::now() < deadline,
            "the tarpit got no deliveries"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = create(&healthy.url).await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while healthy.calls.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no webhook at all");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Not one attempt at the tarpit had timed out yet: the healthy receiver did not
    // wait for a slot the tarpit held.
    assert_eq!(
        pit.closed.load(Ordering::SeqCst),
        0,
        "the healthy webhook came only once tarpit attempts timed out"
    );
    assert!(pit.opened.load(Ordering::SeqCst) <= hearth_server::store::PER_HOST_IN_FLIGHT);
    assert_eq!(healthy.bodies()[0]["status"], "succeeded");
}
