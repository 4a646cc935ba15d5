//! Structured outputs on the real SmolLM2-135M-Instruct: every schema of the corpus in
//! tests/json_schemas sampled at temperature 1; what finishes by the grammar must parse
//! and validate with an independent validator (the `jsonschema` crate), and nearly all
//! samples must finish by the grammar rather than by length. Schemas and regexes that
//! cannot be enforced are refused at compile time, naming the keyword and its path.
//! `cargo test` runs 2 samples per schema; the issue's full run, 5 per schema, is
//! `--ignored` (CI runs it: .ci/run). HEARTH_STRUCTURED_SAMPLES overrides either.

mod common;

use std::path::PathBuf;

use hearth_runtime::{
    ConstraintSpec, EngineConfig, EngineHandle, FinishReason, GenerationEvent, GenerationRequest,
    ModelSpec, PromptSpec, RuntimeError, SamplingParams,
};
use serde_json::{json, Value};

fn engine() -> EngineHandle {
    let mut spec = ModelSpec::new(common::smollm2().to_string_lossy());
    spec.device = "cpu".into();
    spec.dtype = "f32".into();
    hearth_runtime::load(
        &spec,
        &EngineConfig {
            kv_cache_memory: Some(256 << 20),
            ..Default::default()
        },
    )
    .unwrap()
    .engine
}

fn corpus() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/json_schemas");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            (name, serde_json::from_str(&text).unwrap())
        })
        .collect()
}

struct Outcome {
    text: String,
    reason: FinishReason,
    error: Option<String>,
    logprobs: Vec<f32>,
}

fn run(
    engine: &EngineHandle,
    user: &str,
    spec: &ConstraintSpec,
    seed: u64,
    max_tokens: usize,
) -> hearth_runtime::RequestStream {
    let constraint = engine.constraints().compile(spec, "json_schema").unwrap();
    let prompt = engine
        .tokenizer()
        .prompt_tokens(&PromptSpec {
            prompt: user.into(),
            ..Default::default()
        })
        .unwrap();
    engine
        .submit(GenerationRequest {
            prompt,
            params: SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                max_tokens,
                min_tokens: max_tokens,
                logprobs: Some(0),
                constraint: Some(constraint),
                ..Default::default()
            },
        })
        .unwrap()
}

fn collect(mut s: hearth_runtime::RequestStream) -> Outcome {
    let mut out = Outcome {
        text: String::new(),
        reason: FinishReason::Error,
        error: None,
        logprobs: Vec::new(),
    };
    while let Some(ev) = s.blocking_next() {
        match ev {
            GenerationEvent::Token { text, logprobs, .. } => {
                out.text.push_str(&text);
                out.logprobs.extend(logprobs.map(|l| l.logprob));
            }
            GenerationEvent::Finished(c) => {
                out.text.push_str(&c.trailing_text);
                out.reason = c.reason;
                out.error = c.error;
                break;
            }
            GenerationEvent::Started { .. } => {}
        }
    }
    out
}

#[test]
fn smollm2_output_matches_every_schema_of_the_corpus() {
    check_corpus(2, 95);
}

/// The issue's figure: 5 samples per schema, every finished output valid, and the
/// share finished by the grammar printed against the goal (95%), which is the floor
/// asserted. Since integers and numbers without bounds are held to ±(2^53 − 1)
/// (json_bounds.rs) these fixed seeds give 153 of 160 (95.62%, 2026-12-02; 150 of 160
/// before). The seven that run out: four recursive `$ref`s nesting past `max_tokens`
/// (`{"v": 0, "next": …`; llguidance has no depth bound), two fraction-digit runs (a
/// `number` in (0, 1), a date-time's fractional seconds; llguidance has no digit bound)
/// and one long free-text key: loops of SmolLM2-135M at temperature 1 that a larger
/// `max_tokens` only makes longer.
/// Slow on 2 shared cores (CI runs it with `--ignored`).
#[test]
#[ignore]
fn smollm2_five_samples_per_schema_of_the_corpus() {
    check_corpus(5, 95);
}

fn check_corpus(default_samples: u64, floor_percent: usize) {
    let engine = engine();
    let samples: u64 = std::env::var("HEARTH_STRUCTURED_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_samples);
    let corpus = corpus();
    assert!(
        corpus.len() >= 30,
        "the corpus has {} schemas",
        corpus.len()
    );
    // All at once: the engine batches them, as it would a server's load.
    let mut streams = Vec::new();
    for (name, schema) in &corpus {
        let spec = ConstraintSpec::JsonSchema(schema.clone());
        let user = format!(
            "Reply with JSON only, matching this JSON Schema:\n{schema}\nMake up plausible values."
        );
        for seed in 0..samples {
            streams.push((
                name.clone(),
                schema.clone(),
                run(&engine, &user, &spec, seed, 320),
            ));
        }
    }
    let total = streams.len();
    let (mut by_grammar, mut failures, mut ran_out) = (0, Vec::new(), Vec::new());
    for (name, schema, stream) in streams {
        let o = collect(stream);
        assert!(o.error.is_none(), "{name}: {:?}", o.error);
        // min_tokens yields to the grammar; log-probs come from the masked distribution,
        // so a forced token (one allowed) has log-prob 0.
        assert!(o.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
        if o.reason != FinishReason::Stop {
            assert_eq!(o.reason, FinishReason::Length, "{name}");
            let tail: String = o
                .text
                .chars()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            ran_out.push(format!("{name}: …{tail}"));
            continue;
        }
        by_grammar += 1;
        let parsed: Value = match serde_json::from_str(&o.text) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!("{name}: {e}: {}", o.text));
                continue;
            }
        };
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap();
        if let Err(e) = validator.validate(&parsed) {
            failures.push(format!("{name}: {e}: {}", o.text));
        }
        assert!(
            !o.text.contains("  ") && !o.text.contains('\n'),
            "{name}: whitespace is bounded: {:?}",
            o.text
        );
    }
    assert!(
        failures.is_empty(),
        "invalid outputs:\n{}",
        failures.join("\n")
    );
    eprintln!(
        "{by_grammar} of {total} samples finished by the grammar ({:.2}%; goal 95%), all valid; ran out:\n{}",
        by_grammar as f64 * 100.0 / total as f64,
        ran_out.join("\n")
    );
    assert!(
        by_grammar * 100 >= total * floor_percent,
        "{by_grammar} of {total} samples finished by the grammar (floor {floor_percent}%); ran out:\n{}",
        ran_out.join("\n")
    );
}

#[test]
fn regex_and_choice_constraints_shape_the_output() {
    let engine = engine();
    let rx = ConstraintSpec::Regex(r"[0-9]{3}-[0-9]{4}".into());
    let o = collect(run(&engine, "Give a phone number.", &rx, 1, 40));
    assert_eq!(o.reason, FinishReason::Stop);
    assert!(
        o.text.len() == 8 && o.text.as_bytes()[3] == b'-',
        "{:?}",
        o.text
    );
    let choice = ConstraintSpec::Choice(vec!["left".into(), "right".into()]);
    let o = collect(run(&engine, "Which way?", &choice, 2, 40));
    assert!(o.text == "left" || o.text == "right", "{:?}", o.text);
    // Stopped by length before the grammar accepts: said so, never "stop".
    let long = ConstraintSpec::Regex("a{50}".into());
    let o = collect(run(&engine, "Say a.", &long, 3, 5));
    assert_eq!(o.reason, FinishReason::Length);
    assert_eq!(o.text, "a".repeat(o.text.len()));
}

#[test]
fn what_cannot_be_enforced_is_refused_naming_the_keyword() {
    let engine = engine();
    let refused = |spec: ConstraintSpec| match engine.constraints().compile(&spec, "json_schema") {
        Err(RuntimeError::InvalidRequest { field, reason }) => {
            assert_eq!(field, "json_schema");
            reason
        }
        other => panic!("{spec:?} was not refused: {other:?}"),
    };
    for keyword in [
        "not",
        "if",
        "uniqueItems",
        "contains",
        "propertyNames",
        "dependentRequired",
        "unevaluatedProperties",
    ] {
        let schema = json!({"type": "object", "properties": {"a": {"type": "array", keyword: {}}}});
        let reason = refused(ConstraintSpec::JsonSchema(schema));
        assert!(
            reason.contains(&format!("`{keyword}`"))
                && reason.contains(&format!("/properties/a/{keyword}")),
            "{reason}"
        );
    }
    let reason = refused(ConstraintSpec::JsonSchema(
        json!({"$ref": "http://example.com/schema"}),
    ));
    assert!(reason.contains("never fetched"), "{reason}");
    let reason = refused(ConstraintSpec::JsonSchema(
        json!({"type": "string", "format": "no-such-format"}),
    ));
    assert!(reason.contains("no-such-format"), "{reason}");
    refused(ConstraintSpec::Regex("(unclosed".into()));
    refused(ConstraintSpec::Lark("start: undefined_rule".into()));
    refused(ConstraintSpec::Choice(Vec::new()));
    // Bounded before any grammar is built from them: count, then bytes.
    let many = refused(ConstraintSpec::Choice(vec!["a".into(); 5000]));
    assert!(many.contains("at most 1024"), "{many}");
    let long = refused(ConstraintSpec::Choice(vec!["x".repeat(70_000)]));
    assert!(long.contains("byte grammar"), "{long}");
    // The same source compiles once.
    let spec = ConstraintSpec::Regex("[a-z]+".into());
    let a = engine.constraints().compile(&spec, "regex").unwrap();
    let b = engine.constraints().compile(&spec, "regex").unwrap();
    assert_eq!(a, b, "the second compile is the cached grammar");
}
