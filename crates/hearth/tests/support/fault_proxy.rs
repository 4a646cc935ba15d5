//! A small fault-injecting HTTP/1.1 proxy in front of an upstream: it forwards each
//! request as is, or, as its plan says, answers a create with 429 (`Retry-After`) or
//! 503 without forwarding it, or forwards a create and then drops the connection
//! before answering (the upstream ran it; the caller cannot know), or answers
//! everything with 503.

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
}

pub struct FaultProxy {
    pub url: String,
    pub plan: Arc<Mutex<Plan>>,
    /// Creates that reached the proxy (forwarded or not).
    pub creates: Arc<AtomicUsize>,
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
        let (p, c, up) = (plan.clone(), creates.clone(), upstream.to_string());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(sock, http.clone(), up.clone(), p.clone(), c.clone()));
            }
        });
        FaultProxy { url, plan, creates }
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

async fn serve(
    mut sock: TcpStream,
    http: reqwest::Client,
    upstream: String,
    plan: Arc<Mutex<Plan>>,
    creates: Arc<AtomicUsize>,
) {
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
        let act = {
            let mut p = plan.lock().unwrap();
            if p.fail_all {
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
        let method = reqwest::Method::from_bytes(req.method.as_bytes()).unwrap();
        let mut r = http.request(method, format!("{upstream}{}", req.path));
        for (k, v) in &req.headers {
            if ["authorization", "content-type", "cancel-after", "prefer"].contains(&k.as_str()) {
                r = r.header(k, v);
            }
        }
        let Ok(resp) = r.body(req.body).send().await else {
            return;
        };
        let status = resp.status().as_u16();
        let mut headers = Vec::new();
        for k in ["content-type", "retry-after"] {
            if let Some(v) = resp.headers().get(k).and_then(|v| v.to_str().ok()) {
                headers.push((k.to_string(), v.to_string()));
            }
        }
        let body = resp.bytes().await.unwrap_or_default();
        if let Act::ResetAfter = act {
            // The upstream has the prediction; the caller gets no answer.
            return;
        }
        if !respond(&mut sock, status, &headers, &body).await {
            return;
        }
    }
}
