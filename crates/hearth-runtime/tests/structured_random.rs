//! A property test of the constraint engine: JSON Schemas drawn by a small seeded
//! generator (objects with required and optional properties, closed or not; arrays with
//! item bounds; strings with enums, lengths and patterns; bounded integers and numbers;
//! booleans, nulls, `anyOf`, `$ref` to `$defs`; nested up to depth 3) run through the real
//! SmolLM2-135M-Instruct at temperature 1. Every output that finishes by the grammar must
//! parse and validate with an independent validator (the `jsonschema` crate); every
//! generated schema must compile (the generator only uses keywords hearth enforces).
//! HEARTH_RANDOM_SCHEMAS sets how many schemas (default 12), HEARTH_RANDOM_SCHEMA_SEED the
//! generator's seed (default fixed, so a failure reproduces).

mod common;

use hearth_runtime::{
    ConstraintSpec, EngineConfig, EngineHandle, FinishReason, GenerationEvent, GenerationRequest,
    ModelSpec, PromptSpec, SamplingParams,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Short words, so sampled strings end quickly and enums stay readable.
const WORDS: &[&str] = &[
    "red", "green", "blue", "alpha", "beta", "north", "south", "x1",
];

struct Gen {
    rng: StdRng,
    /// `$defs` of the schema being built (filled by `leaf` now and then).
    defs: Map<String, Value>,
}

impl Gen {
    fn schema(&mut self) -> Value {
        self.defs.clear();
        let mut root = self.object(0);
        if !self.defs.is_empty() {
            root["$defs"] = Value::Object(std::mem::take(&mut self.defs));
        }
        root
    }

    fn any(&mut self, depth: u32) -> Value {
        let pick = if depth >= 3 {
            self.rng.random_range(0..6)
        } else {
            self.rng.random_range(0..9)
        };
        match pick {
            0 | 1 => self.string(),
            2 => self.integer(),
            3 => self.number(),
            4 => json!({"type": "boolean"}),
            5 => self.reference(),
            6 => self.object(depth + 1),
            7 => self.array(depth + 1),
            _ => {
                let (a, b) = (self.any(depth + 1), self.any(depth + 1));
                json!({"anyOf": [a, b]})
            }
        }
    }

    fn object(&mut self, depth: u32) -> Value {
        let n = self.rng.random_range(1..=4);
        let mut props = Map::new();
        let mut required = Vec::new();
        for i in 0..n {
            let name = format!("{}_{i}", WORDS[self.rng.random_range(0..WORDS.len())]);
            let mut s = self.any(depth);
            if self.rng.random_bool(0.15) {
                s = json!({"anyOf": [s, {"type": "null"}]});
            }
            if self.rng.random_bool(0.7) {
                required.push(Value::String(name.clone()));
            }
            props.insert(name, s);
        }
        let mut o = json!({"type": "object", "properties": props, "required": required});
        // Closed objects mostly: an open one lets the model add keys of its own.
        o["additionalProperties"] = Value::Bool(!self.rng.random_bool(0.8));
        o
    }

    fn array(&mut self, depth: u32) -> Value {
        let min = self.rng.random_range(0..=2);
        let max = min + self.rng.random_range(0..=3);
        json!({"type": "array", "items": self.any(depth), "minItems": min, "maxItems": max})
    }

    fn string(&mut self) -> Value {
        match self.rng.random_range(0..4) {
            0 => {
                let k = self.rng.random_range(1..=4);
                let mut words: Vec<&str> = (0..k)
                    .map(|_| WORDS[self.rng.random_range(0..WORDS.len())])
                    .collect();
                words.sort_unstable();
                words.dedup();
                json!({"type": "string", "enum": words})
            }
            1 => json!({"type": "string", "pattern": "^[a-z]{2,6}-[0-9]{1,3}$"}),
            _ => {
                let min = self.rng.random_range(0..=3);
                let max = min + self.rng.random_range(1..=12);
                json!({"type": "string", "minLength": min, "maxLength": max})
            }
        }
    }

    fn integer(&mut self) -> Value {
        let lo: i64 = self.rng.random_range(-1000..=1000);
        let hi = lo + self.rng.random_range(0..=5000);
        json!({"type": "integer", "minimum": lo, "maximum": hi})
    }

    fn number(&mut self) -> Value {
        let lo: i64 = self.rng.random_range(-100..=100);
        json!({"type": "number", "minimum": lo, "maximum": lo + 50})
    }

    /// A `$ref` to a small definition shared by the schema.
    fn reference(&mut self) -> Value {
        let name = format!("d{}", self.defs.len());
        let def = match self.rng.random_range(0..3) {
            0 => self.string(),
            1 => self.integer(),
            _ => {
                json!({"type": "object", "properties": {"id": self.integer()}, "required": ["id"], "additionalProperties": false})
            }
        };
        self.defs.insert(name.clone(), def);
        json!({"$ref": format!("#/$defs/{name}")})
    }
}

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

#[test]
fn random_schemas_hold_every_finished_output() {
    let count = env_u64("HEARTH_RANDOM_SCHEMAS", 12);
    let seed = env_u64("HEARTH_RANDOM_SCHEMA_SEED", 0x5EED_2026);
    let mut gen = Gen {
        rng: StdRng::seed_from_u64(seed),
        defs: Map::new(),
    };
    let engine = engine();
    let mut streams = Vec::new();
    for i in 0..count {
        let schema = gen.schema();
        let spec = ConstraintSpec::JsonSchema(schema.clone());
        let constraint = match engine.constraints().compile(&spec, "json_schema") {
            Ok(c) => c,
            Err(e) => panic!("schema {i} (seed {seed:#x}) was refused: {e}\n{schema}"),
        };
        let prompt = engine
            .tokenizer()
            .prompt_tokens(&PromptSpec {
                prompt: format!("Reply with JSON only, matching this JSON Schema:\n{schema}"),
                ..Default::default()
            })
            .unwrap();
        let stream = engine
            .submit(GenerationRequest {
                prompt,
                params: SamplingParams {
                    temperature: 1.0,
                    seed: Some(i),
                    max_tokens: 384,
                    constraint: Some(constraint),
                    ..Default::default()
                },
            })
            .unwrap();
        streams.push((i, schema, stream));
    }
    let (mut finished, mut invalid, mut ran_out) = (0u64, Vec::new(), 0u64);
    for (i, schema, mut stream) in streams {
        let (mut text, mut reason, mut error) = (String::new(), FinishReason::Error, None);
        while let Some(ev) = stream.blocking_next() {
            match ev {
                GenerationEvent::Token { text: t, .. } => text.push_str(&t),
                GenerationEvent::Finished(c) => {
                    text.push_str(&c.trailing_text);
                    (reason, error) = (c.reason, c.error);
                    break;
                }
                GenerationEvent::Started { .. } => {}
            }
        }
        assert!(error.is_none(), "schema {i}: {error:?}");
        if reason != FinishReason::Stop {
            assert_eq!(reason, FinishReason::Length, "schema {i}");
            ran_out += 1;
            continue;
        }
        finished += 1;
        let validator = jsonschema::options().build(&schema).unwrap();
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => {
                if let Err(e) = validator.validate(&v) {
                    invalid.push(format!(
                        "schema {i}: {e}\n  schema: {schema}\n  output: {text}"
                    ));
                }
            }
            Err(e) => invalid.push(format!("schema {i}: not JSON ({e}): {text}")),
        }
    }
    eprintln!(
        "{finished} of {count} finished by the grammar, {ran_out} ran out, {} invalid",
        invalid.len()
    );
    assert!(
        invalid.is_empty(),
        "seed {seed:#x}: outputs that break their schema:\n{}",
        invalid.join("\n")
    );
    // Running out of tokens is allowed (and reported as length), but a test where
    // nothing finishes would check nothing.
    assert!(
        finished * 4 >= count * 3,
        "only {finished} of {count} finished by the grammar ({ran_out} ran out)"
    );
}
