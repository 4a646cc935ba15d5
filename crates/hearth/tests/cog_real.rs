//! hearth in front of the real Cog server: a route whose upstream is a Cog 0.23.1
//! container (`cog+URL`, Cog's own Rust HTTP server from PyPI, in the venv
//! scripts/cog-diff.sh builds) running scripts/cog_real/predict.py, checked end to
//! end through hearth's Replicate API: a create with its SSE stream, `Prefer: wait`,
//! a failure, a cancel mid-run, a kill -9 of hearth mid-prediction and its restart,
//! a restart of Cog mid-prediction, and a model whose Cog serves no event streams
//! (406). Cog counts its runs in a file: nothing may run twice.
//!
//! Skipped, saying so, only when the venv is absent (`COG_DIFF_VENV`, default
//! .venv-cog-diff at the workspace root): `.ci/run` runs it after cog-diff.sh.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::ports;
use support::procs::{spawn, temp, Api, Proc};

const FRONT_TOKEN: &str = "front-token";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn venv() -> Option<PathBuf> {
    let v = std::env::var_os("COG_DIFF_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv-cog-diff"));
    let v = if v.is_absolute() { v } else { root().join(v) };
    v.join("bin/python").exists().then_some(v)
}

/// A Cog server on `port` running predict.py from `model`.
struct Cog {
    child: Child,
    base: String,
}

impl Cog {
    fn port(&self) -> u16 {
        self.base.rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl Drop for Cog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// predict.py and the schema `cog build` would write beside it, with
/// `x-cog-streaming` or without.
fn model_dir(venv: &Path, dir: &Path, streaming: bool) -> PathBuf {
    let m = dir.join(if streaming { "model-sse" } else { "model-json" });
    std::fs::create_dir_all(m.join(".cog")).unwrap();
    std::fs::copy(
        root().join("scripts/cog_real/predict.py"),
        m.join("predict.py"),
    )
    .unwrap();
    let schema = m.join(".cog/openapi_schema.json");
    let ok = Command::new(venv.join("bin/python"))
        .arg(root().join("scripts/cog_diff/cog_build_schema.py"))
        .arg(&schema)
        .current_dir(&m)
        .status()
        .unwrap();
    assert!(ok.success(), "cog_build_schema.py failed");
    if !streaming {
        let mut s: Value = serde_json::from_slice(&std::fs::read(&schema).unwrap()).unwrap();
        s["paths"]["/predictions"]["post"]
            .as_object_mut()
            .unwrap()
            .remove("x-cog-streaming");
        std::fs::write(&schema, s.to_string()).unwrap();
    }
    m
}

/// A Cog server on a port picked for it: another while the one picked was taken
/// before Cog bound it (Cog must be told its port; hearth's route names it).
async fn start_cog_anywhere(venv: &Path, model: &Path, runs: &Path, log: &Path) -> Cog {
    ports::with_free_port_async(|port| try_start_cog(venv, model, port, runs, log))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Cog again on `port` (a restart: hearth's route names the port), tried again while
/// whatever took the port meanwhile holds it.
async fn start_cog(venv: &Path, model: &Path, port: u16, runs: &Path, log: &Path) -> Cog {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match try_start_cog(venv, model, port, runs, log).await {
            Ok(cog) => return cog,
            Err(e) if ports::in_use(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Cog on `port` once it is READY, or what it wrote to `log` if it exited first.
async fn try_start_cog(
    venv: &Path,
    model: &Path,
    port: u16,
    runs: &Path,
    log: &Path,
) -> Result<Cog, String> {
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let from = std::fs::metadata(log).map_or(0, |m| m.len() as usize);
    let append = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap()
    };
    let child = Command::new(venv.join("bin/python"))
        .args(["-m", "cog.server.http", "--host", "127.0.0.1"])
        .current_dir(model)
        .env("PATH", path)
        .env("PORT", port.to_string())
        .env("COG_PREDICT_TYPE_STUB", "predict.py:Predictor")
        .env("COG_REAL_RUNS", runs)
        .stdout(append())
        .stderr(append())
        .spawn()
        .unwrap();
    let mut cog = Cog {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = cog.child.try_wait().unwrap() {
            let text = std::fs::read(log).unwrap_or_default();
            let text = String::from_utf8_lossy(text.get(from..).unwrap_or_default());
            return Err(format!("Cog on {port} exited ({status}):\n{text}"));
        }
        if let Ok(r) = reqwest::get(format!("{}/health-check", cog.base)).await {
            // READY from our Cog, still running (not another server on the port).
            if r.json::<Value>()
                .await
                .is_ok_and(|h| h["status"] == "READY")
                && cog.child.try_wait().unwrap().is_none()
            {
                return Ok(cog);
            }
        }
        assert!(Instant::now() < deadline, "Cog on {port} never READY");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A front routing acme/cogged to the streaming Cog and acme/plain to the other.
async fn front(port: u16, dir: &Path, sse: &str, json: &str) -> Proc {
    let args: Vec<String> = [
        "--data-dir",
        &dir.join("front-data").display().to_string(),
        "--api-token",
        FRONT_TOKEN,
        "--upstream",
        &format!("cogsse=cog+{sse}"),
        "--upstream",
        &format!("cogjson=cog+{json}"),
        "--route",
        "acme/cogged=upstream:cogsse",
        "--route",
        "acme/plain=upstream:cogjson",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    spawn(port, &args, &[], &dir.join("front.log")).await
}

fn runs_of(runs: &Path, prompt: &str) -> usize {
    std::fs::read_to_string(runs)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == prompt)
        .count()
}

fn tag(t: &str) -> String {
    format!("{t}{}-", rand::random::<u32>())
}

async fn create(api: &Api, model: &str, input: Value, prefer: Option<&str>) -> Value {
    let (code, p) = api
        .post(
            &format!("/v1/models/{model}/predictions"),
            &json!({"input": input, "stream": true}),
            prefer,
        )
        .await;
    assert_eq!(code, 201, "{p}");
    p
}

async fn processing(api: &Api, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = api.get(&format!("/v1/predictions/{id}")).await;
        if p["status"] == "processing" && p["output"].as_array().is_some_and(|o| !o.is_empty()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never processing with output: {p}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (`secs` at most) until `cog` runs nothing: its `/health-check` says READY,
/// not BUSY.
async fn idle(cog: &Cog, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let h: Value = reqwest::get(format!("{}/health-check", cog.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if h["status"] == "READY" {
            return;
        }
        assert!(Instant::now() < deadline, "Cog still running: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn expected(prompt: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prompt}{i} ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hearth_in_front_of_a_real_cog_server() {
    let Some(venv) = venv() else {
        eprintln!(
            "SKIPPED: no Cog venv (COG_DIFF_VENV, default .venv-cog-diff): run scripts/cog-diff.sh once to build it"
        );
        return;
    };
    let dir = temp("cog-real");
    let runs = dir.join("runs.txt");
    let sse_model = model_dir(&venv, &dir, true);
    let json_model = model_dir(&venv, &dir, false);
    let mut cog = start_cog_anywhere(&venv, &sse_model, &runs, &dir.join("cog-sse.log")).await;
    let sse_port = cog.port();
    let plain = start_cog_anywhere(&venv, &json_model, &runs, &dir.join("cog-json.log")).await;
    let mut f = front(0, &dir, &cog.base, &plain.base).await;
    let port = f.port();
    let api = Api::new(&f.base, FRONT_TOKEN);

    // 1. A create and its SSE stream: Cog's chunks as `output` events, then `done`;
    // the record holds Cog's output and logs; it ran once.
    let p = tag("stream");
    let created = create(
        &api,
        "acme/cogged",
        json!({"prompt": p, "tokens": 6, "delay": 0.05}),
        None,
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    let stream = created["urls"]["stream"].as_str().unwrap().to_string();
    let text = reqwest::Client::new()
        .get(&stream)
        .header("Accept", "text/event-stream")
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let outputs: Vec<&str> = text
        .split("\n\n")
        .filter(|e| e.contains("event: output"))
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .collect();
    assert_eq!(outputs, expected(&p, 6), "{text}");
    assert!(
        text.trim_end().ends_with("{}") && text.contains("event: done"),
        "{text}"
    );
    let done = api.wait_terminal(&id, 30).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"], json!(expected(&p, 6)), "{done}");
    assert!(
        done["logs"].as_str().unwrap().contains("log line 5\n"),
        "{done}"
    );
    assert!(
        done["metrics"]["predict_time"].as_f64().unwrap() > 0.0,
        "{done}"
    );
    assert_eq!(runs_of(&runs, &p), 1);

    // 2. Prefer: wait answers with the finished prediction.
    let p = tag("wait");
    let w = create(
        &api,
        "acme/cogged",
        json!({"prompt": p, "tokens": 3}),
        Some("wait=30"),
    )
    .await;
    assert_eq!(w["status"], "succeeded", "{w}");
    assert_eq!(w["output"], json!(expected(&p, 3)), "{w}");

    // 3. A failure: Cog's error, its output so far.
    let p = tag("fail");
    let x = create(
        &api,
        "acme/cogged",
        json!({"prompt": p, "tokens": 2, "fail": true}),
        Some("wait=30"),
    )
    .await;
    assert_eq!(x["status"], "failed", "{x}");
    assert!(
        x["error"].as_str().unwrap().contains("failed on purpose"),
        "{x}"
    );

    // 4. A cancel mid-run reaches Cog: canceled here, ended there (Cog idle again
    // long before the 500 s run could have ended by itself).
    let p = tag("cancel");
    let c = create(
        &api,
        "acme/cogged",
        json!({"prompt": p, "tokens": 1000, "delay": 0.5}),
        None,
    )
    .await;
    let id = c["id"].as_str().unwrap().to_string();
    processing(&api, &id).await;
    let (code, _) = api
        .post(&format!("/v1/predictions/{id}/cancel"), &json!({}), None)
        .await;
    assert_eq!(code, 200);
    let c = api.wait_terminal(&id, 60).await;
    assert_eq!(c["status"], "canceled", "{c}");
    idle(&cog, 60).await;
    let n = c["output"].as_array().unwrap().len();
    assert!(n > 0 && n < 1000, "{c}");
    assert_eq!(runs_of(&runs, &p), 1);

    // 5. hearth killed (-9) mid-prediction, then restarted: Cog canceled the
    // prediction when hearth's stream dropped; the restarted front attaches, finds
    // that, and fails it saying so. Never run twice.
    let p = tag("kill");
    let k = create(
        &api,
        "acme/cogged",
        json!({"prompt": p, "tokens": 400, "delay": 0.05}),
        None,
    )
    .await;
    let id = k["id"].as_str().unwrap().to_string();
    processing(&api, &id).await;
    let _ = f.child.kill();
    let _ = f.child.wait();
    drop(f);
    f = front(port, &dir, &cog.base, &plain.base).await;
    let k = api.wait_terminal(&id, 60).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(runs_of(&runs, &p), 1, "Cog ran it again: {k}");
    assert_eq!(k["status"], "failed", "{k}");
    let err = k["error"].as_str().unwrap();
    eprintln!("hearth killed (-9) and restarted: {err}");
    assert!(
        err.contains("Cog cancels a prediction created over an event stream"),
        "{k}"
    );
    assert!(err.contains("create it again"), "{k}");

    // 6. Cog restarted mid-prediction: it forgets everything; hearth fails the
    // prediction saying its result is lost (or that Cog is unreachable), and Cog
    // never runs it again.
    let p = tag("cogrestart");
    let r = create(
        &api,
        "acme/cogged",
        json!({"prompt": p, "tokens": 400, "delay": 0.05}),
        None,
    )
    .await;
    let id = r["id"].as_str().unwrap().to_string();
    processing(&api, &id).await;
    let _ = cog.child.kill();
    let _ = cog.child.wait();
    drop(cog);
    cog = start_cog(&venv, &sse_model, sse_port, &runs, &dir.join("cog-sse.log")).await;
    let r = api.wait_terminal(&id, 90).await;
    assert_eq!(runs_of(&runs, &p), 1, "Cog ran it again: {r}");
    assert_eq!(r["status"], "failed", "{r}");
    let err = r["error"].as_str().unwrap();
    eprintln!("Cog restarted: {err}");
    assert!(
        err.contains("result is lost") || err.contains("is unreachable"),
        "{r}"
    );
    // The restarted Cog serves the route again.
    let p = tag("after");
    let a = create(
        &api,
        "acme/cogged",
        json!({"prompt": p, "tokens": 2}),
        Some("wait=30"),
    )
    .await;
    assert_eq!(a["output"], json!(expected(&p, 2)), "{a}");

    // 7. A model without @cog.streaming (406 to an event stream): one synchronous
    // request runs it; a cancel still ends it there.
    let p = tag("plain");
    let s = create(
        &api,
        "acme/plain",
        json!({"prompt": p, "tokens": 4}),
        Some("wait=30"),
    )
    .await;
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["output"], json!(expected(&p, 4)), "{s}");
    assert!(s["logs"].as_str().unwrap().contains("log line 3\n"), "{s}");
    assert_eq!(runs_of(&runs, &p), 1);
    let p = tag("plaincancel");
    let s = create(
        &api,
        "acme/plain",
        json!({"prompt": p, "tokens": 600, "delay": 0.05}),
        None,
    )
    .await;
    let id = s["id"].as_str().unwrap().to_string();
    // Running on Cog (it counts a run as it starts) before the cancel is asked.
    let deadline = Instant::now() + Duration::from_secs(60);
    while runs_of(&runs, &p) == 0 {
        assert!(Instant::now() < deadline, "Cog never started {p}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _) = api
        .post(&format!("/v1/predictions/{id}/cancel"), &json!({}), None)
        .await;
    assert_eq!(code, 200);
    let s = api.wait_terminal(&id, 30).await;
    assert_eq!(s["status"], "canceled", "{s}");
    assert_eq!(runs_of(&runs, &p), 1);

    drop(f);
    drop(cog);
    drop(plain);
    let _ = std::fs::remove_dir_all(&dir);
}
