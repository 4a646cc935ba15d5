//! The inputs a text model takes (Replicate's LLM inputs), their validation, and the
//! OpenAPI schema that describes them to clients.

use serde_json::{json, Map, Value};

use hearth_runtime::{PromptSpec, SamplingParams};

use crate::error::ApiError;

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Num,
    Bool,
}

struct Field {
    name: &'static str,
    kind: Kind,
    description: &'static str,
    min: Option<f64>,
    max: Option<f64>,
}

const fn f(
    name: &'static str,
    kind: Kind,
    description: &'static str,
    min: Option<f64>,
    max: Option<f64>,
) -> Field {
    Field {
        name,
        kind,
        description,
        min,
        max,
    }
}

/// In `x-order` order.
const FIELDS: &[Field] = &[
    f("prompt", Kind::Str, "Prompt", None, None),
    f("system_prompt", Kind::Str, "System prompt to send to the model (through its chat template).", None, None),
    f("max_tokens", Kind::Int, "The maximum number of tokens the model should generate as output.", Some(1.0), None),
    f("min_tokens", Kind::Int, "The minimum number of tokens the model should generate as output.", Some(0.0), None),
    f("temperature", Kind::Num, "The value used to modulate the next token probabilities. 0 is greedy.", Some(0.0), Some(5.0)),
    f("top_p", Kind::Num, "Sample from the smallest set of tokens whose cumulative probability reaches top_p.", Some(0.0), Some(1.0)),
    f("top_k", Kind::Int, "Sample from the top_k most likely tokens; 0 (or -1) turns it off.", Some(-1.0), None),
    f("min_p", Kind::Num, "Drop tokens less likely than min_p times the most likely one.", Some(0.0), Some(1.0)),
    f("presence_penalty", Kind::Num, "Presence penalty", Some(-2.0), Some(2.0)),
    f("frequency_penalty", Kind::Num, "Frequency penalty", Some(-2.0), Some(2.0)),
    f("repetition_penalty", Kind::Num, "Repetition penalty (1 is off).", Some(0.01), Some(10.0)),
    f("stop_sequences", Kind::Str, "A comma-separated list of sequences to stop generation at. For example, '<end>,<stop>' will stop generation at the first instance of 'end' or '<stop>'.", None, None),
    f("prompt_template", Kind::Str, "A template to format the prompt with: {prompt} and {system_prompt} are substituted. Empty uses the model's chat template.", None, None),
    f("seed", Kind::Int, "Random seed. Leave blank to randomize the seed.", Some(0.0), None),
    f("ignore_eos", Kind::Bool, "Keep generating past end-of-sequence tokens (for benchmarks).", None, None),
];

/// Aliases from the Llama 2 era.
const ALIASES: &[(&str, &str)] = &[
    ("max_new_tokens", "max_tokens"),
    ("min_new_tokens", "min_tokens"),
];

/// Input defaults, Replicate's for meta-llama-3-8b-instruct; a model card overrides them.
pub fn default_inputs() -> Map<String, Value> {
    let v = json!({
        "prompt": "", "system_prompt": "", "max_tokens": 512, "min_tokens": 0, "temperature": 0.6,
        "top_p": 0.9, "top_k": 50, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "repetition_penalty": 1.0, "stop_sequences": "", "prompt_template": "", "ignore_eos": false,
    });
    v.as_object().cloned().unwrap_or_default()
}

/// A validated request, ready for the engine.
pub struct ParsedInput {
    pub prompt: PromptSpec,
    pub params: SamplingParams,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks `input` against the schema (types, bounds), fills defaults, and builds the
/// engine's parameters. Errors name the field and the reason (HTTP 422).
pub fn parse_input(input: &Value, defaults: &Map<String, Value>) -> Result<ParsedInput, ApiError> {
    let obj = match input {
        Value::Object(o) => o.clone(),
        Value::Null => Map::new(),
        other => {
            return Err(ApiError::invalid(format!(
                "input: expected an object, got {}",
                type_name(other)
            )))
        }
    };
    let mut merged = defaults.clone();
    for (k, v) in obj {
        let key = ALIASES
            .iter()
            .find(|(a, _)| *a == k)
            .map(|(_, c)| c.to_string())
            .unwrap_or(k);
        if v.is_null() {
            continue;
        }
        merged.insert(key, v);
    }
    for field in FIELDS {
        let Some(v) = merged.get(field.name) else {
            continue;
        };
        let bad = |why: String| ApiError::invalid(format!("input.{}: {why}", field.name));
        let n = match field.kind {
            Kind::Str => {
                if !v.is_string() {
                    return Err(bad(format!("expected a string, got {}", type_name(v))));
                }
                None
            }
            Kind::Bool => {
                if !v.is_boolean() {
                    return Err(bad(format!("expected a boolean, got {}", type_name(v))));
                }
                None
            }
            Kind::Int => {
                let n = v
                    .as_i64()
                    .or_else(|| v.as_f64().filter(|x| x.fract() == 0.0).map(|x| x as i64));
                match n {
                    Some(n) => Some(n as f64),
                    None => {
                        return Err(bad(format!(
                            "expected an integer, got {}",
                            if v.is_number() {
                                "a fractional number".into()
                            } else {
                                type_name(v).to_string()
                            }
                        )))
                    }
                }
            }
            Kind::Num => match v.as_f64() {
                Some(x) => Some(x),
                None => return Err(bad(format!("expected a number, got {}", type_name(v)))),
            },
        };
        if let Some(x) = n {
            if let Some(min) = field.min {
                if x < min {
                    return Err(bad(format!(
                        "must be greater than or equal to {min}, got {x}"
                    )));
                }
            }
            if let Some(max) = field.max {
                if x > max {
                    return Err(bad(format!("must be less than or equal to {max}, got {x}")));
                }
            }
        }
    }
    let s = |k: &str| {
        merged
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    let i = |k: &str| merged.get(k).and_then(|v| v.as_f64()).map(|x| x as i64);
    let x = |k: &str, d: f64| merged.get(k).and_then(|v| v.as_f64()).unwrap_or(d) as f32;
    let prompt_template = s("prompt_template");
    let system_prompt = s("system_prompt");
    let stop: Vec<String> = s("stop_sequences")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let top_k = i("top_k").unwrap_or(0).max(0) as usize;
    let mut top_p = x("top_p", 1.0);
    if top_p <= 0.0 {
        // Replicate's models accept 0; it means "no nucleus" there in practice.
        top_p = 1.0;
    }
    let params = SamplingParams {
        temperature: x("temperature", 0.6),
        top_k,
        top_p,
        min_p: x("min_p", 0.0),
        repetition_penalty: x("repetition_penalty", 1.0),
        presence_penalty: x("presence_penalty", 0.0),
        frequency_penalty: x("frequency_penalty", 0.0),
        seed: i("seed").map(|s| s as u64),
        max_tokens: i("max_tokens").unwrap_or(512) as usize,
        min_tokens: i("min_tokens").unwrap_or(0) as usize,
        stop,
        ignore_eos: merged
            .get("ignore_eos")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        logprobs: None,
    };
    params.validate().map_err(|e| match e {
        hearth_runtime::RuntimeError::InvalidRequest { field, reason } => {
            ApiError::invalid(format!("input.{field}: {reason}"))
        }
        other => ApiError::invalid(other.to_string()),
    })?;
    Ok(ParsedInput {
        prompt: PromptSpec {
            prompt: s("prompt"),
            system_prompt: (!system_prompt.is_empty()).then_some(system_prompt),
            prompt_template: (!prompt_template.is_empty()).then_some(prompt_template),
            raw: false,
        },
        params,
    })
}

/// Cog's OpenAPI document for a text model, with `defaults` shown as the inputs' defaults.
pub fn openapi_schema(defaults: &Map<String, Value>, max_tokens_limit: usize) -> Value {
    let mut props = Map::new();
    for (order, field) in FIELDS.iter().enumerate() {
        let mut p = Map::new();
        let t = match field.kind {
            Kind::Str => "string",
            Kind::Int => "integer",
            Kind::Num => "number",
            Kind::Bool => "boolean",
        };
        p.insert("type".into(), t.into());
        p.insert("title".into(), title_case(field.name).into());
        p.insert("description".into(), field.description.into());
        p.insert("x-order".into(), order.into());
        if let Some(min) = field.min {
            p.insert("minimum".into(), num(min));
        }
        if let Some(max) = field.max {
            p.insert("maximum".into(), num(max));
        }
        if field.name == "max_tokens" {
            p.insert("maximum".into(), max_tokens_limit.into());
        }
        if let Some(d) = defaults.get(field.name) {
            p.insert("default".into(), d.clone());
        }
        props.insert(field.name.into(), Value::Object(p));
    }
    json!({
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {},
        "components": {"schemas": {
            "Input": {"type": "object", "title": "Input", "properties": props},
            "Output": {"type": "array", "title": "Output", "items": {"type": "string"},
                       "x-cog-array-type": "iterator", "x-cog-array-display": "concatenate"},
            "Status": {"type": "string", "title": "Status", "enum": ["starting", "processing", "succeeded", "canceled", "failed"]},
            "WebhookEvent": {"type": "string", "title": "WebhookEvent", "enum": ["start", "output", "logs", "completed"]},
            "PredictionRequest": {"type": "object", "title": "PredictionRequest", "properties": {
                "id": {"type": "string"}, "input": {"$ref": "#/components/schemas/Input"},
                "webhook": {"type": "string", "format": "uri"},
                "webhook_events_filter": {"type": "array", "items": {"$ref": "#/components/schemas/WebhookEvent"}}}},
            "PredictionResponse": {"type": "object", "title": "PredictionResponse", "properties": {
                "id": {"type": "string"}, "input": {"$ref": "#/components/schemas/Input"},
                "output": {"$ref": "#/components/schemas/Output"}, "status": {"$ref": "#/components/schemas/Status"},
                "error": {"type": "string"}, "logs": {"type": "string"}, "metrics": {"type": "object"}}},
        }}
    })
}

fn num(x: f64) -> Value {
    if x.fract() == 0.0 {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

fn title_case(s: &str) -> String {
    s.split('_')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(input: Value) -> String {
        match parse_input(&input, &default_inputs()) {
            Err(ApiError::Problem { status, detail, .. }) => {
                assert_eq!(status.as_u16(), 422);
                detail
            }
            Ok(_) => panic!("accepted {input}"),
        }
    }

    #[test]
    fn wrong_types_and_ranges_name_the_field() {
        assert!(
            err(json!({"max_tokens": "lots"})).contains("input.max_tokens: expected an integer")
        );
        assert!(err(json!({"max_tokens": 0})).contains("input.max_tokens"));
        assert!(err(json!({"temperature": 9}))
            .contains("input.temperature: must be less than or equal to 5"));
        assert!(err(json!({"prompt": 5})).contains("input.prompt: expected a string"));
        assert!(err(json!({"min_tokens": 10, "max_tokens": 5})).contains("min_tokens"));
        assert!(err(json!([1, 2])).contains("input: expected an object"));
    }

    #[test]
    fn aliases_defaults_and_comma_separated_stops() {
        let p = parse_input(
            &json!({"prompt": "hi", "max_new_tokens": 7, "stop_sequences": "<end>, <stop>"}),
            &default_inputs(),
        )
        .unwrap();
        assert_eq!(p.params.max_tokens, 7);
        assert_eq!(p.params.stop, vec!["<end>", "<stop>"]);
        assert_eq!(p.params.top_k, 50);
        assert!((p.params.temperature - 0.6).abs() < 1e-6);
        assert_eq!(p.prompt.prompt, "hi");
        assert!(p.prompt.system_prompt.is_none());
    }

    #[test]
    fn schema_lists_inputs_in_order_with_iterator_output() {
        let s = openapi_schema(&default_inputs(), 2048);
        let input = &s["components"]["schemas"]["Input"]["properties"];
        assert_eq!(input["prompt"]["x-order"], 0);
        assert_eq!(input["max_tokens"]["maximum"], 2048);
        assert_eq!(input["temperature"]["default"], 0.6);
        assert_eq!(
            s["components"]["schemas"]["Output"]["x-cog-array-type"],
            "iterator"
        );
    }
}
