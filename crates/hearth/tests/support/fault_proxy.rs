//! A small fault-injecting HTTP/1.1 proxy in front of an upstream: it forwards each
//! request as is, or, as its plan says, answers a create with 429 (`Retry-After`) or
//! 503 without forwarding it, or forwards a create and then drops the connection
//! before answering (the upstream ran it; the caller cannot know), or answers
//! everything with 503. URLs in the upstream's JSON that point at the upstream point
//! at the proxy instead, so prediction event streams come through it too: relayed as
//! they arrive, cut after a number of events, refused, or left out of the records (an
//! upstream that names no stream). It can also hold back a request that asks for an
//! event stream (a slow attach) and swallow cancels (an upstream that never confirms
//! one: held unanswered, never forwarded), and gate an event stream: relay its first
//! output events, then hold it and every plain `GET` until the test lets go (what
//! the caller has by then came from those events alone).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the next requests get. Each counter is spent one create at a time.
#[derive(Default)]
pub struct Plan {
    pub throttle_creates: usize,
    pub fail_creates: usize,
    pub reset_after_creates: usize,
    pub fail_all: bool,
    /// Each event stream is cut after this many events (0: never).
    pub cut_streams_after: usize,
    /// Records come without `urls.stream`.
    pub strip_stream_urls: bool,
    /// Event streams are refused (503).
    pub refuse_streams: bool,
    /// Records name their `urls.stream` on this origin instead (another host).
    pub stream_origin: Option<String>,
    /// A request asking for an event stream is forwarded only after this long.
    pub delay_streams: std::time::Duration,
    /// `POST .../cancel` is held unanswered for two minutes and never forwarded.
    pub swallow_cancels: bool,
    /// Plain `GET`s (not streams) are held unanswered, never forwarded, until their
    /// caller hangs up (two minutes at most): an upstream that hangs.
    pub hang_gets: bool,
    /// An event stream opened while this is N > 0 relays its first N `output` events,
    /// then holds the rest, and plain `GET`s wait before they are forwarded, until it
    /// is set back to 0 (two minutes at most).
    pub gate_after: usize,
}

pub struct FaultProxy {
    pub url: String,
    pub plan: Arc<Mutex<Plan>>,
    /// Creates that reached the proxy (forwarded or not).
    pub creates: Arc<AtomicUsize>,
    /// Event streams opened through the proxy, and those it cut.
    pub streams: Arc<AtomicUsize>,
    pub streams_cut: Arc<AtomicUsize>,
    /// Event streams whose request carried an `Authorization` header.
    pub streams_with_token: Arc<AtomicUsize>,
    /// The path of every plain `GET` (not a stream) forwarded, in order.
    pub gets: Arc<Mutex<Vec<String>>>,
    pub hung: Arc<Hung>,
    /// Event streams held by `gate_after`.
    pub gated: Arc<AtomicUsize>,
}

/// The plain `GET`s `hang_gets` held, and what they were when each cancel came.
#[derive(Default)]
pub struct Hung {
    /// Held so far.
    pub started: AtomicUsize,
    /// Held now: their callers have not hung up.
    pub open: AtomicUsize,
    /// For each `POST .../cancel` that reached the proxy (forwarded or swallowed), in
    /// order: (`started`, `open`) as it came.
    pub at_cancels: Mutex<Vec<(usize, usize)>>,
}

#[derive(Clone)]
struct Counts {
    creates: Arc<AtomicUsize>,
    streams: Arc<AtomicUsize>,
    streams_cut: Arc<AtomicUsize>,
    streams_with_token: Arc<AtomicUsize>,
    gets: Arc<Mutex<Vec<String>>>,
    hung: Arc<Hung>,
    gated: Arc<AtomicUsize>,
}

/// The upstream's base URL and the proxy's own.
struct Ends {
    upstream: String,
    proxy: String,
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl FaultProxy {
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let plan: Arc<Mutex<Plan>> = Default::default();
        let creates = Arc::new(AtomicUsize::new(0));
        let streams = Arc::new(AtomicUsize::new(0));
        let streams_cut = Arc::new(AtomicUsize::new(0));
        let streams_with_token = Arc::new(AtomicUsize::new(0));
        let gets: Arc<Mutex<Vec<String>>> = Default::default();
        let hung: Arc<Hung> = Default::default();
        let gated = Arc::new(AtomicUsize::new(0));
        let counts = Counts {
            creates: creates.clone(),
            streams: streams.clone(),
            streams_cut: streams_cut.clone(),
            streams_with_token: streams_with_token.clone(),
            gets: gets.clone(),
            hung: hung.clone(),
            gated: gated.clone(),
        };
        let (p, up, me) = (plan.clone(), upstream.to_string(), url.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let to = Ends {
                    upstream: up.clone(),
                    proxy: me.clone(),
                };
                tokio::spawn(serve(sock, http.clone(), to, p.clone(), counts.clone()));
            }
        });
        FaultProxy {
            url,
            plan,
            creates,
            streams,
            streams_cut,
            streams_with_token,
            gets,
            hung,
            gated,
        }
    }

    /// Plain `GET`s of `path` forwarded so far.
    pub fn gets_of(&self, path: &str) -> usize {
        self.gets
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == path)
            .count()
    }

    pub fn set(&self, f: impl FnOnce(&mut Plan)) {
        f(&mut self.plan.lock().unwrap());
    }
}

async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 8192];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 8192];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

async fn respond(
    sock: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
) -> bool {
    let mut out = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    sock.write_all(out.as_bytes()).await.is_ok() && sock.write_all(body).await.is_ok()
}

/// Until `gate_after` is 0 again (two minutes at most).
async fn gate_open(plan: &Mutex<Plan>) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while plan.lock().unwrap().gate_after != 0 && std::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Relays an event stream as it comes, cut after `cut_after` events (0: never), held
/// after `gate_after` output events (0: never) until the gate opens.
async fn relay_stream(
    sock: &mut TcpStream,
    mut resp: reqwest::Response,
    (cut_after, gate_after): (usize, usize),
    plan: &Mutex<Plan>,
    counts: &Counts,
) {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
    if sock.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut events = 0usize;
    // The gate: output events seen, and the unfinished event the last chunk ended in.
    let (mut outputs, mut partial) = (0usize, Vec::new());
    while let Ok(Some(chunk)) = resp.chunk().await {
        let mut out = chunk.to_vec();
        if gate_after > 0 && outputs < gate_after {
            let mut scan = std::mem::take(&mut partial);
            let carried = scan.len();
            scan.extend_from_slice(&out);
            let (mut start, mut at) = (0, None);
            for i in 0..scan.len().saturating_sub(1) {
                if &scan[i..i + 2] != b"\n\n" || i < start {
                    continue;
                }
                let event = String::from_utf8_lossy(&scan[start..i]);
                start = i + 2;
                let named = |l: &str| l.strip_prefix("event:").map(str::trim) == Some("output");
                if event.lines().any(named) {
                    outputs += 1;
                    if outputs == gate_after {
                        at = Some(i + 2 - carried);
                        break;
                    }
                }
            }
            match at {
                Some(end) => {
                    if sock.write_all(&out[..end]).await.is_err() {
                        return;
                    }
                    counts.gated.fetch_add(1, Ordering::SeqCst);
                    gate_open(plan).await;
                    out.drain(..end);
                }
                None => partial = scan[start..].to_vec(),
            }
        }
        if cut_after > 0 {
            // Cut right after the event that reaches the count.
            let mut at = None;
            for (i, w) in out.windows(2).enumerate() {
                if w == b"\n\n" {
                    events += 1;
                    if events >= cut_after {
                        at = Some(i + 2);
                        break;
                    }
                }
            }
            if let Some(end) = at {
                out.truncate(end);
                let _ = sock.write_all(&out).await;
                counts.streams_cut.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        if sock.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn serve(
    mut sock: TcpStream,
    http: reqwest::Client,
    ends: Ends,
    plan: Arc<Mutex<Plan>>,
    counts: Counts,
) {
    let upstream = &ends.upstream;
    let creates = &counts.creates;
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut sock, &mut buf).await {
        let is_create = req.method == "POST" && req.path.ends_with("/predictions");
        if is_create {
            creates.fetch_add(1, Ordering::SeqCst);
        }
        enum Act {
            Forward,
            Throttle,
            Fail,
            ResetAfter,
        }
        let wants_stream = req
            .headers
            .iter()
            .any(|(k, v)| k == "accept" && v.contains("text/event-stream"));
        let (delay, swallow) = {
            let p = plan.lock().unwrap();
            (p.delay_streams, p.swallow_cancels)
        };
        let is_cancel = req.method == "POST" && req.path.ends_with("/cancel");
        if is_cancel {
            let h = &counts.hung;
            let now = (
                h.started.load(Ordering::SeqCst),
                h.open.load(Ordering::SeqCst),
            );
            h.at_cancels.lock().unwrap().push(now);
        }
        if swallow && is_cancel {
            tokio::time::sleep(std::time::Duration::from_secs(120)).await;
            return;
        }
        if req.method == "GET" && !wants_stream && plan.lock().unwrap().hang_gets {
            let h = &counts.hung;
            h.started.fetch_add(1, Ordering::SeqCst);
            h.open.fetch_add(1, Ordering::SeqCst);
            // Until the caller hangs up (its read ends) or sends anything more.
            let mut byte = [0u8; 1];
            let wait = std::time::Duration::from_secs(120);
            let _ = tokio::time::timeout(wait, sock.read(&mut byte)).await;
            h.open.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        if wants_stream && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if req.method == "GET" && !wants_stream && plan.lock().unwrap().gate_after != 0 {
            gate_open(&plan).await;
        }
        let act = {
            let mut p = plan.lock().unwrap();
            if p.fail_all || (wants_stream && p.refuse_streams) {
                Act::Fail
            } else if is_create && p.throttle_creates > 0 {
                p.throttle_creates -= 1;
                Act::Throttle
            } else if is_create && p.fail_creates > 0 {
                p.fail_creates -= 1;
                Act::Fail
            } else if is_create && p.reset_after_creates > 0 {
                p.reset_after_creates -= 1;
                Act::ResetAfter
            } else {
                Act::Forward
            }
        };
        let json = ("content-type".to_string(), "application/json".to_string());
        match act {
            Act::Throttle => {
                let h = [json, ("retry-after".into(), "1".into())];
                let body = br#"{"detail":"Request was throttled. Your rate limit resets in ~1s."}"#;
                if !respond(&mut sock, 429, &h, body).await {
                    return;
                }
                continue;
            }
            Act::Fail => {
                if !respond(&mut sock, 503, &[json], br#"{"detail":"injected fault"}"#).await {
                    return;
                }
                continue;
            }
            Act::Forward | Act::ResetAfter => {}
        }
        if req.method == "GET" && !wants_stream {
            counts.gets.lock().unwrap().push(req.path.clone());
        }
        let method = reqwest::Method::from_bytes(req.method.as_bytes()).unwrap();
        let mut r = http.request(method, format!("{upstream}{}", req.path));
        for (k, v) in &req.headers {
            if [
                "authorization",
                "content-type",
                "cancel-after",
                "prefer",
                "accept",
                "last-event-id",
            ]
            .contains(&k.as_str())
            {
                r = r.header(k, v);
            }
        }
        let Ok(resp) = r.body(req.body).send().await else {
            return;
        };
        let status = resp.status().as_u16();
        let is_stream = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if is_stream {
            counts.streams.fetch_add(1, Ordering::SeqCst);
            if req.headers.iter().any(|(k, _)| k == "authorization") {
                counts.streams_with_token.fetch_add(1, Ordering::SeqCst);
            }
            let limits = {
                let p = plan.lock().unwrap();
                (p.cut_streams_after, p.gate_after)
            };
            relay_stream(&mut sock, resp, limits, &plan, &counts).await;
            return;
        }
        let mut headers = Vec::new();
        for k in ["content-type", "retry-after"] {
            if let Some(v) = resp.headers().get(k).and_then(|v| v.to_str().ok()) {
                headers.push((k.to_string(), v.to_string()));
            }
        }
        let mut body = resp.bytes().await.unwrap_or_default().to_vec();
        let is_json = headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("application/json"));
        if is_json {
            let (strip, origin) = {
                let p = plan.lock().unwrap();
                (p.strip_stream_urls, p.stream_origin.clone())
            };
            body = rewrite(&body, &ends, strip, origin.as_deref());
        }
        if let Act::ResetAfter = act {
            // The upstream has the prediction; the caller gets no answer.
            return;
        }
        if !respond(&mut sock, status, &headers, &body).await {
            return;
        }
    }
}

/// The upstream's JSON with its own URLs pointing at the proxy, and without
/// `urls.stream` when `strip_streams`, or with it on `stream_origin`.
fn rewrite(body: &[u8], ends: &Ends, strip_streams: bool, stream_origin: Option<&str>) -> Vec<u8> {
    let text = String::from_utf8_lossy(body).replace(&ends.upstream, &ends.proxy);
    if !strip_streams && stream_origin.is_none() {
        return text.into_bytes();
    }
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return text.into_bytes();
    };
    let strip = |p: &mut serde_json::Value| {
        if let Some(urls) = p.get_mut("urls").and_then(|u| u.as_object_mut()) {
            match stream_origin {
                Some(o) if !strip_streams => {
                    if let Some(s) = urls.get("stream").and_then(|s| s.as_str()) {
                        let moved = s.replace(&ends.proxy, o);
                        urls.insert("stream".into(), moved.into());
                    }
                }
                _ => {
                    urls.remove("stream");
                }
            }
        }
    };
    strip(&mut v);
    if let Some(items) = v.get_mut("results").and_then(|r| r.as_array_mut()) {
        items.iter_mut().for_each(strip);
    }
    v.to_string().into_bytes()
}
