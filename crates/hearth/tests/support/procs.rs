//! `hearth serve` processes for the hybrid-serving tests and a small client of
//! their API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::ports;

pub struct Proc {
    pub child: Child,
    pub base: String,
    pub log: PathBuf,
}

impl Proc {
    /// The port it serves on (to start it again on the same one).
    pub fn port(&self) -> u16 {
        self.base.rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn temp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "hearth-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The upstream of the hybrid-serving tests: a hearth serving one model card per
/// TOML text in `cards` (the demo model under other names), behind `token`, its data
/// in `dir/up-data` and its log in `dir/upstream.log`.
pub async fn spawn_upstream(dir: &Path, cards: &[&str], token: &str) -> Proc {
    let card_dir = dir.join("cards");
    std::fs::create_dir_all(&card_dir).unwrap();
    for (i, card) in cards.iter().enumerate() {
        std::fs::write(card_dir.join(format!("{i}.toml")), card).unwrap();
    }
    let args: Vec<String> = vec![
        "--models".into(),
        card_dir.display().to_string(),
        "--data-dir".into(),
        dir.join("up-data").display().to_string(),
        "--api-token".into(),
        token.into(),
    ];
    spawn(0, &args, &[], &dir.join("upstream.log")).await
}

/// Starts `hearth serve` on `port` and waits until it is READY. Port 0 (every first
/// start): the server binds a free port itself, read back from the line it writes to
/// `log` when it listens (a port picked here and bound there later can be taken
/// meanwhile, by another test's server binding port 0). A given port is a restart on
/// the port its clients already hold: see `launch`.
pub async fn spawn(port: u16, args: &[String], env: &[(&str, &str)], log: &Path) -> Proc {
    let p = launch(port, args, env, log).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = reqwest::get(format!("{}/health-check", p.base)).await {
            if r.json::<Value>()
                .await
                .is_ok_and(|h| h["status"] == "READY")
            {
                return p;
            }
        }
        assert!(
            Instant::now() < deadline,
            "server on {} did not come up",
            p.base
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `hearth serve --port PORT ARGS` (its stderr appended to `log`) and returns
/// once it listens, on the port it announced. Its own announcement, never a probe: a
/// probe of a fixed port can be answered by whatever else listens there. A fixed port
/// taken while the server was down (its bind fails) is tried again until it is free.
pub async fn launch(port: u16, args: &[String], env: &[(&str, &str)], log: &Path) -> Proc {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // The log is appended to across restarts: the announcement is after this offset.
        let from = std::fs::metadata(log).map_or(0, |m| m.len() as usize);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
        cmd.args(["serve", "--port", &port.to_string()])
            .args(args)
            .env("HEARTH_LOG", "info")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            );
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut p = Proc {
            child: cmd.spawn().unwrap(),
            base: String::new(),
            log: log.to_path_buf(),
        };
        match announced(&mut p, from, deadline).await {
            Ok(bound) => {
                p.base = format!("http://127.0.0.1:{bound}");
                return p;
            }
            Err(text) if port != 0 && ports::in_use(&text) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(text) => panic!("hearth serve exited before it listened:\n{text}"),
        }
    }
}

/// The port `p` announced in its log after byte `from`, or its log if it exited first.
async fn announced(p: &mut Proc, from: usize, deadline: Instant) -> Result<u16, String> {
    loop {
        let text = std::fs::read(&p.log).unwrap_or_default();
        let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
        if let Some(port) = text
            .lines()
            .find_map(|l| l.strip_prefix("hearth listening on http://"))
            .and_then(|a| a.trim().rsplit(':').next()?.parse::<u16>().ok())
        {
            return Ok(port);
        }
        if let Some(status) = p.child.try_wait().unwrap() {
            // What it wrote before it exited is all in the log now.
            let text = std::fs::read(&p.log).unwrap_or_default();
            let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
            return Err(format!("({status})\n{text}"));
        }
        assert!(
            Instant::now() < deadline,
            "hearth serve never listened:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub token: &'static str,
}

impl Api {
    pub fn new(base: &str, token: &'static str) -> Self {
        Api {
            http: reqwest::Client::new(),
            base: base.into(),
            token,
        }
    }

    pub async fn post(&self, path: &str, body: &Value, prefer: Option<&str>) -> (u16, Value) {
        let mut r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(self.token)
            .json(body);
        if let Some(p) = prefer {
            r = r.header("Prefer", p);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(self.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn text(&self, path: &str) -> String {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(self.token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn wait_terminal(&self, id: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let p = self.get(&format!("/v1/predictions/{id}")).await;
            if ["succeeded", "failed", "canceled"].contains(&p["status"].as_str().unwrap_or("")) {
                return p;
            }
            assert!(Instant::now() < deadline, "not terminal: {p}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every prediction listed (following `next`) whose input's prompt starts with
    /// `tag`.
    pub async fn listed_with_tag(&self, tag: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut path = "/v1/predictions".to_string();
        for _ in 0..100 {
            let page = self.get(&path).await;
            out.extend(
                page["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|p| {
                        p["input"]["prompt"]
                            .as_str()
                            .is_some_and(|s| s.starts_with(tag))
                    })
                    .cloned(),
            );
            match page["next"].as_str() {
                Some(n) => path = n.trim_start_matches(&self.base).to_string(),
                None => break,
            }
        }
        out
    }

    /// `/v1/hearth/compare`'s entry for `model` once no shadow copy is in flight and
    /// the primary side has counted `primaries` predictions. A primary is counted by a
    /// watcher a moment after it ends, so a caller can see it ended before then.
    pub async fn settled_compare(&self, model: &str, primaries: usize, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let c = self.get("/v1/hearth/compare").await;
            let m = c["models"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["model"] == model)
                .cloned()
                .unwrap_or_else(|| panic!("{model} not compared: {c}"));
            if is_settled(&m, primaries) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "the comparison never settled: {m}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Api {
    /// A create of `model`'s (`Prefer: wait=N` with `prefer`): the status and the body.
    pub async fn create(&self, model: &str, body: Value, prefer: Option<&str>) -> (u16, Value) {
        self.post(&format!("/v1/models/{model}/predictions"), &body, prefer)
            .await
    }

    pub async fn wait_status(&self, id: &str, status: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let p = self.get(&format!("/v1/predictions/{id}")).await;
            if p["status"] == status {
                return p;
            }
            assert!(Instant::now() < deadline, "never {status}: {p}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Whether a `/v1/hearth/compare` model entry has no copy in flight and at least
/// `primaries` predictions counted on its primary side (more is the caller's to catch).
pub fn is_settled(m: &Value, primaries: usize) -> bool {
    let counted = m["sides"]
        .as_object()
        .into_iter()
        .flat_map(|s| s.values())
        .filter(|s| s["role"] == "primary")
        .filter_map(|s| s["count"].as_u64())
        .sum::<u64>();
    m["shadow"]["in_flight"] == 0 && counted >= primaries as u64
}

/// A Prometheus sample's value: the line that starts with `name{` and holds every
/// label in `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
