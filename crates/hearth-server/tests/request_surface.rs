//! A property test over the request surface: every numeric field (and the lists and
//! stop strings) of Replicate's prediction inputs and OpenAI's chat and completions,
//! drawn from its schema's edges, through the real router into the demo model's real
//! engine. Every answer must be a 2xx or a 4xx within a bound, the server must keep
//! serving, and a normal prediction must succeed afterwards. Every (field, edge) pair
//! is sent alone once, then random combinations: a fixed seed and a few seconds in
//! `cargo test`; `HEARTH_PROPTEST_CASES=N` sends N combinations (default 60) and
//! `HEARTH_PROPTEST_SEED` picks another seed.
//!
//! On the code before issue 18 this test ends the process: `top_k: 1e17` (an edge of
//! every integer field) aborted it with an allocation failure on the engine thread.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::{engine_default, start_with, Server};

/// How long one answer may take (headers for a stream, the whole body otherwise), on
/// a loaded 2-core machine with a debug build.
const ANSWER_BOUND: Duration = Duration::from_secs(60);
const IN_FLIGHT: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Api {
    Replicate,
    Chat,
    Completions,
}

/// A field's upper bound as its schema states it.
#[derive(Clone, Copy, Debug)]
enum Max {
    Int(i128),
    Num(f64),
}

/// What kind of value a field takes, which decides its extra edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Number,
    /// OpenAI's `stop`: a string or a list of strings.
    StopList,
    /// Replicate's `stop_sequences`: one comma-separated string.
    StopString,
    /// OpenAI completions' `prompt` as token ids.
    TokenIds,
}

struct Field {
    api: Api,
    name: &'static str,
    shape: Shape,
    max: Max,
}

const NUMERIC_EDGES: &[&str] = &[
    "0",
    "1",
    "max",
    "max+1",
    "2^31",
    "2^53+1",
    "2^63",
    "2^64",
    "1e17",
    "1e300",
    "-1",
    "-2^63",
    "-1e300",
    "0.5",
    "string",
    "empty list",
    "huge list",
    "null",
];
const STOP_EDGES: &[&str] = &["16x256", "17 entries", "257 bytes", "huge"];
const TOKEN_EDGES: &[&str] = &["vocab-1", "vocab", "2^32", "-1", "[[]]", "past context"];

fn edges(shape: Shape) -> Vec<&'static str> {
    let extra: &[&str] = match shape {
        Shape::Number => &[],
        Shape::StopList | Shape::StopString => STOP_EDGES,
        Shape::TokenIds => TOKEN_EDGES,
    };
    NUMERIC_EDGES.iter().chain(extra).copied().collect()
}

/// The raw JSON text of an edge (raw: 2^64 and 2^53 + 1 must reach the server as
/// written, which no f64 or u64 can carry).
fn raw(field: &Field, edge: &str, vocab: i128, context: i128) -> String {
    let many = |item: &str, n: usize| format!("[{}]", vec![item; n].join(","));
    let max_plus = |d: i128| match field.max {
        Max::Int(m) => (m + d).to_string(),
        Max::Num(x) => format!("{}", x + d as f64),
    };
    let stop_items = |n: usize, len: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                format!(
                    "{}{}",
                    char::from(b'a' + (i % 26) as u8),
                    "z".repeat(len - 1)
                )
            })
            .collect()
    };
    let stops = |items: Vec<String>| match field.shape {
        Shape::StopString => Value::String(items.join(",")).to_string(),
        _ => Value::from(items).to_string(),
    };
    match edge {
        "0" => "0".into(),
        "1" => "1".into(),
        "max" => max_plus(0),
        "max+1" => max_plus(1),
        "2^31" => "2147483648".into(),
        "2^53+1" => "9007199254740993".into(),
        "2^63" => "9223372036854775808".into(),
        "2^64" => "18446744073709551616".into(),
        "1e17" => "1e17".into(),
        "1e300" => "1e300".into(),
        "-1" => "-1".into(),
        "-2^63" => "-9223372036854775808".into(),
        "-1e300" => "-1e300".into(),
        "0.5" => "0.5".into(),
        "string" => "\"1\"".into(),
        "empty list" => "[]".into(),
        "huge list" => many("1", 20_000),
        "null" => "null".into(),
        "16x256" => stops(stop_items(16, 256)),
        "17 entries" => stops(stop_items(17, 1)),
        "257 bytes" => stops(stop_items(1, 257)),
        "huge" => stops(stop_items(2000, 64)),
        "vocab-1" => format!("[{}]", vocab - 1),
        "vocab" => format!("[{vocab}]"),
        "2^32" => "[4294967296]".into(),
        "[[]]" => "[[]]".into(),
        "past context" => many("5", context as usize + 1),
        other => panic!("no edge {other}"),
    }
}

fn fields(vocab: i128, max_tokens: i128) -> Vec<Field> {
    let seed_max = i64::MAX as i128;
    let f = |api, name, shape, max| Field {
        api,
        name,
        shape,
        max,
    };
    let mut out = Vec::new();
    use Shape::Number as N;
    for (name, max) in [
        ("max_tokens", Max::Int(max_tokens)),
        ("max_new_tokens", Max::Int(max_tokens)),
        ("min_tokens", Max::Int(max_tokens)),
        ("min_new_tokens", Max::Int(max_tokens)),
        ("temperature", Max::Num(5.0)),
        ("top_p", Max::Num(1.0)),
        ("top_k", Max::Int(vocab)),
        ("min_p", Max::Num(1.0)),
        ("presence_penalty", Max::Num(2.0)),
        ("frequency_penalty", Max::Num(2.0)),
        ("repetition_penalty", Max::Num(10.0)),
        ("seed", Max::Int(seed_max)),
    ] {
        out.push(f(Api::Replicate, name, N, max));
    }
    out.push(f(
        Api::Replicate,
        "stop_sequences",
        Shape::StopString,
        Max::Int(16),
    ));
    for api in [Api::Chat, Api::Completions] {
        for (name, max) in [
            ("max_tokens", Max::Int(max_tokens)),
            ("min_tokens", Max::Int(max_tokens)),
            ("temperature", Max::Num(2.0)),
            ("top_p", Max::Num(1.0)),
            ("top_k", Max::Int(vocab)),
            ("min_p", Max::Num(1.0)),
            ("presence_penalty", Max::Num(2.0)),
            ("frequency_penalty", Max::Num(2.0)),
            ("repetition_penalty", Max::Num(10.0)),
            ("seed", Max::Int(seed_max)),
            ("n", Max::Int(128)),
        ] {
            out.push(f(api, name, N, max));
        }
        out.push(f(api, "stop", Shape::StopList, Max::Int(16)));
    }
    out.push(f(
        Api::Chat,
        "max_completion_tokens",
        N,
        Max::Int(max_tokens),
    ));
    out.push(f(Api::Chat, "top_logprobs", N, Max::Int(20)));
    out.push(f(Api::Completions, "logprobs", N, Max::Int(20)));
    out.push(f(Api::Completions, "best_of", N, Max::Int(128)));
    out.push(f(
        Api::Completions,
        "prompt",
        Shape::TokenIds,
        Max::Int(vocab),
    ));
    out
}

/// One request: an API and the (field, edge) pairs it carries, each field's raw text.
struct Case {
    api: Api,
    set: Vec<(&'static str, &'static str, String)>,
    stream: bool,
}

impl Case {
    /// The request's path and body: a small normal request with the fields replaced.
    fn request(&self) -> (&'static str, String) {
        let (path, base) = match self.api {
            Api::Replicate => (
                "/v1/models/hearth/demo/predictions",
                json!({"input": {"prompt": "hi", "max_tokens": 2}}),
            ),
            Api::Chat => (
                "/v1/chat/completions",
                json!({"model": "hearth/demo", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2, "logprobs": true, "stream": self.stream}),
            ),
            Api::Completions => (
                "/v1/completions",
                json!({"model": "hearth/demo", "prompt": "hi", "max_tokens": 2, "stream": self.stream}),
            ),
        };
        let mut body = base;
        if self.set.iter().any(|(f, _, _)| *f == "max_new_tokens") {
            // Given both, the canonical name wins: the alias alone is what is tested.
            if let Some(input) = body["input"].as_object_mut() {
                input.remove("max_tokens");
            }
        }
        let target = match self.api {
            Api::Replicate => &mut body["input"],
            _ => &mut body,
        };
        for (i, (name, _, _)) in self.set.iter().enumerate() {
            target[*name] = Value::String(format!("@@EDGE{i}@@"));
        }
        let mut text = body.to_string();
        for (i, (_, _, raw)) in self.set.iter().enumerate() {
            text = text.replace(&format!("\"@@EDGE{i}@@\""), raw);
        }
        (path, text)
    }

    fn describe(&self) -> String {
        let set: Vec<String> = self
            .set
            .iter()
            .map(|(f, e, _)| format!("{f}={e}"))
            .collect();
        format!("{:?} {}", self.api, set.join(" "))
    }
}

/// A case's description, its answer, and the (field, edge) pairs it sent.
type Outcome = (
    String,
    Result<u16, String>,
    Vec<(Api, &'static str, &'static str)>,
);

/// Sends one case; Ok(status) or Err(why it broke the rule).
async fn send(s: &Server, case: &Case) -> Result<u16, String> {
    let (path, body) = case.request();
    let answer = async {
        let r = s
            .post(path)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        let status = r.status().as_u16();
        if case.stream && status == 200 {
            // Headers are the answer; dropping the body hangs up, which cancels it.
            return Ok::<_, String>((status, Value::Null));
        }
        let body: Value = r.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    };
    let (status, body) = tokio::time::timeout(ANSWER_BOUND, answer)
        .await
        .map_err(|_| format!("no answer within {ANSWER_BOUND:?}"))??;
    if !(200..300).contains(&status) && !(400..500).contains(&status) {
        return Err(format!("status {status}: {body}"));
    }
    if case.api == Api::Replicate && status == 201 {
        // Created: end it now so long ones (max_tokens at its maximum) free the engine.
        if let Some(id) = body["id"].as_str() {
            let _ = s.post(&format!("/v1/predictions/{id}/cancel")).send().await;
        }
    }
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_edge_of_every_field_gets_a_bounded_answer_and_the_server_serves_on() {
    let s = start_with(4 << 20, engine_default()).await;
    let schema = s.state.models.all()[0].openapi_schema();
    let input = &schema["components"]["schemas"]["Input"]["properties"];
    let vocab = input["top_k"]["maximum"]
        .as_i64()
        .expect("top_k has a maximum") as i128;
    let max_tokens = input["max_tokens"]["maximum"].as_i64().unwrap() as i128;
    let context = max_tokens + 1;
    let fields = fields(vocab, max_tokens);
    let seed = std::env::var("HEARTH_PROPTEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(18u64);
    let extra: usize = std::env::var("HEARTH_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut planned = BTreeSet::new();
    let mut cases = Vec::new();
    let pick_stream = |rng: &mut rand::rngs::StdRng, set: &[(&str, &str, String)]| {
        // A request that may generate thousands of tokens is streamed and hung up on.
        set.iter().any(|(f, _, _)| f.contains("tokens")) || rng.random_bool(0.5)
    };
    // Every pair alone once, so none is masked by another field's refusal.
    for f in &fields {
        for e in edges(f.shape) {
            planned.insert((f.api, f.name, e));
            let set = vec![(f.name, e, raw(f, e, vocab, context))];
            let stream = pick_stream(&mut rng, &set);
            cases.push(Case {
                api: f.api,
                set,
                stream,
            });
        }
    }
    // Then random combinations within one API.
    for _ in 0..extra {
        let api = [Api::Replicate, Api::Chat, Api::Completions][rng.random_range(0..3)];
        let mut mine: Vec<&Field> = fields.iter().filter(|f| f.api == api).collect();
        mine.shuffle(&mut rng);
        let set: Vec<_> = mine[..rng.random_range(2..=4)]
            .iter()
            .map(|f| {
                let all = edges(f.shape);
                let e = all[rng.random_range(0..all.len())];
                (f.name, e, raw(f, e, vocab, context))
            })
            .collect();
        let stream = pick_stream(&mut rng, &set);
        cases.push(Case { api, set, stream });
    }
    cases.shuffle(&mut rng);

    let results: Vec<Outcome> = stream::iter(cases.iter())
        .map(|c| {
            let s = &s;
            async move {
                let sent = c.set.iter().map(|(f, e, _)| (c.api, *f, *e)).collect();
                (c.describe(), send(s, c).await, sent)
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;

    let mut sent = BTreeSet::new();
    let (mut ok, mut refused) = (0, 0);
    let mut broken = Vec::new();
    for (what, result, pairs) in &results {
        sent.extend(pairs.iter().copied());
        match result {
            Ok(st) if *st < 300 => ok += 1,
            Ok(_) => refused += 1,
            Err(why) => broken.push(format!("{what}: {why}")),
        }
    }
    eprintln!(
        "request surface: {} requests (seed {seed}), {ok} accepted, {refused} refused, {} broken; {} (field, edge) pairs sent of {} planned",
        results.len(),
        broken.len(),
        sent.intersection(&planned).count(),
        planned.len()
    );
    assert!(
        broken.is_empty(),
        "answers outside 2xx/4xx:\n{}",
        broken.join("\n")
    );
    let missing: Vec<_> = planned.difference(&sent).collect();
    assert!(missing.is_empty(), "pairs never sent: {missing:?}");
    // Both kinds of answer happened: the edges reach past validation and into it.
    assert!(ok > 0 && refused > 0, "{ok} accepted, {refused} refused");

    // Still serving: a normal prediction runs to the end.
    let (st, p) = s
        .create(
            json!({"prompt": "after the storm", "max_tokens": 4, "temperature": 0.7, "top_k": 40}),
            Some("wait=30"),
        )
        .await;
    assert_eq!(st, 201, "{p}");
    let p = s.wait_terminal(p["id"].as_str().unwrap()).await;
    assert_eq!(p["status"], "succeeded", "{p}");
    assert!(s.state.models.all()[0].engine.is_alive());
}
