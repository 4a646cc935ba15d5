//! The inputs a text model takes (Replicate's LLM inputs), their validation, and the
//! OpenAPI schema that describes them to clients.

use serde_json::{json, Map, Value};

use hearth_runtime::limits::SEED_MAX;
use hearth_runtime::{PromptSpec, RequestLimits, SamplingParams};

use crate::error::{ApiError, FieldError};

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Num,
    Bool,
    /// A JSON document: a string holding JSON, or the value itself (`json_schema`).
    Json,
}

/// An upper bound: fixed, or the served model's (from `RequestLimits`).
#[derive(Clone, Copy)]
enum Max {
    None,
    Num(f64),
    Int(u64),
    /// The vocabulary size.
    Vocab,
    /// The most tokens one request can generate.
    Tokens,
}

struct Field {
    name: &'static str,
    kind: Kind,
    description: &'static str,
    /// Small numbers, exact in an f64 and an i128 alike.
    min: Option<f64>,
    max: Max,
}

const fn f(
    name: &'static str,
    kind: Kind,
    description: &'static str,
    min: Option<f64>,
    max: Max,
) -> Field {
    Field {
        name,
        kind,
        description,
        min,
        max,
    }
}

/// A bound's value for a model; None where it depends on a model and none is given.
#[derive(Clone, Copy)]
enum Bound {
    Num(f64),
    Int(i128),
}

impl Max {
    fn resolve(self, limits: Option<&RequestLimits>) -> Option<Bound> {
        match (self, limits) {
            (Max::None, _) => None,
            (Max::Num(x), _) => Some(Bound::Num(x)),
            (Max::Int(n), _) => Some(Bound::Int(n.into())),
            (Max::Vocab, Some(l)) => Some(Bound::Int(l.max_top_k() as i128)),
            (Max::Tokens, Some(l)) => Some(Bound::Int(l.max_tokens() as i128)),
            (Max::Vocab | Max::Tokens, None) => None,
        }
    }
}

/// In `x-order` order.
const FIELDS: &[Field] = &[
    f("prompt", Kind::Str, "Prompt", None, Max::None),
    f("system_prompt", Kind::Str, "System prompt to send to the model (through its chat template).", None, Max::None),
    f("max_tokens", Kind::Int, "The maximum number of tokens the model should generate as output.", Some(1.0), Max::Tokens),
    f("min_tokens", Kind::Int, "The minimum number of tokens the model should generate as output.", Some(0.0), Max::None),
    f("temperature", Kind::Num, "The value used to modulate the next token probabilities. 0 is greedy.", Some(0.0), Max::Num(5.0)),
    f("top_p", Kind::Num, "Sample from the smallest set of tokens whose cumulative probability reaches top_p.", Some(0.0), Max::Num(1.0)),
    f("top_k", Kind::Int, "Sample from the top_k most likely tokens; 0 (or -1) turns it off.", Some(-1.0), Max::Vocab),
    f("min_p", Kind::Num, "Drop tokens less likely than min_p times the most likely one.", Some(0.0), Max::Num(1.0)),
    f("presence_penalty", Kind::Num, "Presence penalty", Some(-2.0), Max::Num(2.0)),
    f("frequency_penalty", Kind::Num, "Frequency penalty", Some(-2.0), Max::Num(2.0)),
    f("repetition_penalty", Kind::Num, "Repetition penalty (1 is off).", Some(0.01), Max::Num(10.0)),
    f("stop_sequences", Kind::Str, "A comma-separated list of sequences to stop generation at. For example, '<end>,<stop>' will stop generation at the first instance of 'end' or '<stop>'.", None, Max::None),
    f("prompt_template", Kind::Str, "A template to format the prompt with: {prompt} and {system_prompt} are substituted. Empty uses the model's chat template.", None, Max::None),
    f("seed", Kind::Int, "Random seed. Leave blank to randomize the seed.", Some(0.0), Max::Int(SEED_MAX)),
    f("ignore_eos", Kind::Bool, "Keep generating past end-of-sequence tokens (for benchmarks).", None, Max::None),
    f("json_schema", Kind::Json, "Structured output: a JSON Schema (as an object, or a string holding one) the output must match. Keywords hearth cannot enforce are refused (422), never ignored; see the README.", None, Max::None),
    f("regex", Kind::Str, "Structured output: a regular expression (Rust regex syntax) the whole output must match.", None, Max::None),
    f("grammar", Kind::Str, "Structured output: a grammar in llguidance's Lark syntax the output must match.", None, Max::None),
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
        "json_schema": "", "regex": "", "grammar": "",
    });
    v.as_object().cloned().unwrap_or_default()
}

/// A validated request, ready for the engine.
pub struct ParsedInput {
    pub prompt: PromptSpec,
    pub params: SamplingParams,
    /// A structured-output constraint and its input's name, compiled at create.
    pub constraint: Option<(hearth_runtime::ConstraintSpec, &'static str)>,
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

/// Inputs whose schema says `nullable`: `null` is "not given" for them.
const NULLABLE: &[&str] = &["seed"];

fn canonical(key: &str) -> &str {
    ALIASES
        .iter()
        .find(|(a, _)| *a == key)
        .map(|(_, c)| *c)
        .unwrap_or(key)
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Str => "a string",
        Kind::Int => "an integer",
        Kind::Num => "a number",
        Kind::Bool => "a boolean",
        Kind::Json => "a JSON Schema (an object or a string)",
    }
}

/// Why a JSON value is not an exact integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntError {
    NotNumber,
    Fraction,
    /// An integer written as a float beyond 2^53, where floats skip integers: no
    /// bound hearth has is that large, so it is too large (or too small) for any.
    TooLarge,
    TooSmall,
}

/// An integer from JSON, exactly: every i64 and u64 as written (never through an f64,
/// which changes integers above 2^53), and a float only where it is a whole number an
/// f64 holds exactly (`5.0`, `1e3`).
pub fn exact_integer(v: &Value) -> Result<i128, IntError> {
    if let Some(i) = v.as_i64() {
        return Ok(i.into());
    }
    if let Some(u) = v.as_u64() {
        return Ok(u.into());
    }
    const EXACT: f64 = (1u64 << 53) as f64;
    match v.as_f64() {
        None => Err(IntError::NotNumber),
        Some(x) if x.fract() != 0.0 => Err(IntError::Fraction),
        Some(x) if x > EXACT => Err(IntError::TooLarge),
        Some(x) if x < -EXACT => Err(IntError::TooSmall),
        Some(x) => Ok(x as i128),
    }
}

fn show(x: f64) -> String {
    num(x).to_string()
}

/// Why `v` is not a valid value for `field`, if it is not.
fn check_field(field: &Field, v: &Value, limits: Option<&RequestLimits>) -> Option<String> {
    let max = field.max.resolve(limits);
    match field.kind {
        Kind::Json => (!matches!(v, Value::String(_) | Value::Object(_) | Value::Bool(_)))
            .then(|| format!("expected {}, got {}", kind_name(field.kind), type_name(v))),
        Kind::Str | Kind::Bool => {
            let ok = matches!(
                (field.kind, v),
                (Kind::Str, Value::String(_)) | (Kind::Bool, Value::Bool(_))
            );
            (!ok).then(|| format!("expected {}, got {}", kind_name(field.kind), type_name(v)))
        }
        Kind::Int => {
            let too_small =
                |min: f64| format!("must be greater than or equal to {}, got {v}", show(min));
            let why = match field.max {
                Max::Vocab => " (the model's vocabulary size)",
                Max::Tokens => " (what the model's context and KV cache hold)",
                _ => "",
            };
            let too_large =
                |max: i128| format!("must be less than or equal to {max}{why}, got {v}");
            let n = match exact_integer(v) {
                Ok(n) => n,
                Err(IntError::NotNumber) => {
                    return Some(format!("expected an integer, got {}", type_name(v)))
                }
                Err(IntError::Fraction) => {
                    return Some("expected an integer, got a fractional number".into())
                }
                Err(IntError::TooLarge) => {
                    return Some(match max {
                        Some(Bound::Int(m)) => too_large(m),
                        _ => format!("{v} is too large to be an exact integer; write it without a fraction or exponent"),
                    })
                }
                Err(IntError::TooSmall) => {
                    return Some(too_small(field.min.unwrap_or(f64::MIN)))
                }
            };
            if let Some(min) = field.min.filter(|m| n < *m as i128) {
                return Some(too_small(min));
            }
            match max {
                Some(Bound::Int(m)) if n > m => Some(too_large(m)),
                _ => None,
            }
        }
        Kind::Num => {
            let Some(x) = v.as_f64() else {
                return Some(format!("expected a number, got {}", type_name(v)));
            };
            if let Some(min) = field.min.filter(|min| x < *min) {
                return Some(format!(
                    "must be greater than or equal to {}, got {v}",
                    show(min)
                ));
            }
            match max {
                Some(Bound::Num(m)) if x > m => Some(format!(
                    "must be less than or equal to {}, got {v}",
                    show(m)
                )),
                _ => None,
            }
        }
    }
}

/// Cog's rule for `null`: only a `nullable` input may be null. (Replicate's routes
/// read `null` as "use the default" for every input.)
pub fn null_errors(input: &Value) -> Vec<FieldError> {
    let Value::Object(obj) = input else {
        return Vec::new();
    };
    obj.iter()
        .filter(|(_, v)| v.is_null())
        .filter_map(|(k, _)| {
            let name = canonical(k);
            let field = FIELDS.iter().find(|f| f.name == name)?;
            (!NULLABLE.contains(&name)).then(|| {
                FieldError::new(
                    &["input", k],
                    format!("expected {}, got null", kind_name(field.kind)),
                )
            })
        })
        .collect()
}

/// Checks `input` against the schema (types, bounds), fills defaults, and builds the
/// engine's parameters. A 422 names every invalid field and why. `limits`: the served
/// model's; None checks only what no model decides (a card's defaults, before its
/// model is loaded).
pub fn parse_input(
    input: &Value,
    defaults: &Map<String, Value>,
    limits: Option<&RequestLimits>,
) -> Result<ParsedInput, ApiError> {
    let obj = match input {
        Value::Object(o) => o.clone(),
        Value::Null => Map::new(),
        other => {
            return Err(ApiError::invalid_at(
                &["input"],
                format!("expected an object, got {}", type_name(other)),
            ))
        }
    };
    let mut merged = defaults.clone();
    // What the caller sent, by canonical name, for the error's location.
    let mut sent_as: Vec<(String, String)> = Vec::new();
    for (k, v) in obj {
        let key = canonical(&k).to_string();
        if v.is_null() {
            continue;
        }
        sent_as.push((key.clone(), k));
        merged.insert(key, v);
    }
    let errors: Vec<FieldError> = FIELDS
        .iter()
        .filter_map(|field| {
            let why = check_field(field, merged.get(field.name)?, limits)?;
            let name = sent_as
                .iter()
                .find(|(c, _)| c == field.name)
                .map(|(_, k)| k.as_str())
                .unwrap_or(field.name);
            Some(FieldError::new(&["input", name], why))
        })
        .collect();
    if !errors.is_empty() {
        return Err(ApiError::invalid_fields(errors));
    }
    let s = |k: &str| {
        merged
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    // In range by now (checked above): exact, and within what each type holds.
    let i = |k: &str| merged.get(k).and_then(|v| exact_integer(v).ok());
    let size =
        |k: &str, d: usize| i(k).map_or(d, |n| usize::try_from(n.max(0)).unwrap_or(usize::MAX));
    let x = |k: &str, d: f64| merged.get(k).and_then(|v| v.as_f64()).unwrap_or(d) as f32;
    let prompt_template = s("prompt_template");
    let system_prompt = s("system_prompt");
    let stop: Vec<String> = s("stop_sequences")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let top_k = size("top_k", 0);
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
        seed: i("seed").map(|s| u64::try_from(s).unwrap_or(u64::MAX)),
        max_tokens: size("max_tokens", 512),
        min_tokens: size("min_tokens", 0),
        stop,
        ignore_eos: merged
            .get("ignore_eos")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        logprobs: None,
        constraint: None,
    };
    let checked = match limits {
        Some(l) => l.check_params(&params),
        None => params.validate(),
    };
    checked.map_err(|e| match e {
        hearth_runtime::RuntimeError::InvalidRequest { field, reason } => {
            ApiError::invalid_at(&["input", field], reason)
        }
        other => ApiError::invalid(other.to_string()),
    })?;
    Ok(ParsedInput {
        prompt: PromptSpec {
            prompt: s("prompt"),
            system_prompt: (!system_prompt.is_empty()).then_some(system_prompt),
            prompt_template: (!prompt_template.is_empty()).then_some(prompt_template),
            ..Default::default()
        },
        params,
        constraint: crate::constraint_input::requested(&merged)?,
    })
}

/// The Cog version whose container API hearth speaks: `GET /`'s `cog_version`, the
/// OpenAPI document's `info.version`, the webhooks' `user-agent`.
pub const COG_VERSION: &str = "0.23.1";

/// The `Input` schema: every field in `x-order` order, `defaults` as the defaults.
fn input_schema(defaults: &Map<String, Value>, limits: &RequestLimits) -> Value {
    let mut props = Map::new();
    for (order, field) in FIELDS.iter().enumerate() {
        let mut p = Map::new();
        let t = match field.kind {
            Kind::Str => "string",
            Kind::Int => "integer",
            Kind::Num => "number",
            Kind::Bool => "boolean",
            // What `check` accepts, so a front that validates against this document
            // (another hearth routing upstream) lets the object form through.
            Kind::Json => {
                p.insert(
                    "anyOf".into(),
                    json!([{"type": "string"}, {"type": "object"}, {"type": "boolean"}]),
                );
                ""
            }
        };
        if !t.is_empty() {
            p.insert("type".into(), t.into());
        }
        p.insert("title".into(), title_case(field.name).into());
        p.insert("description".into(), field.description.into());
        p.insert("x-order".into(), order.into());
        if let Some(min) = field.min {
            p.insert("minimum".into(), num(min));
        }
        match field.max.resolve(Some(limits)) {
            Some(Bound::Num(max)) => {
                p.insert("maximum".into(), num(max));
            }
            Some(Bound::Int(max)) => {
                p.insert("maximum".into(), int_value(max));
            }
            None => {}
        }
        if let Some(d) = defaults.get(field.name) {
            p.insert("default".into(), d.clone());
        }
        // `Optional[int] = None` in a predictor: nullable, with a null default.
        if NULLABLE.contains(&field.name) {
            p.insert("nullable".into(), true.into());
            p.entry("default").or_insert(Value::Null);
        }
        props.insert(field.name.into(), Value::Object(p));
    }
    json!({"type": "object", "title": "Input", "properties": props})
}

fn ok_response(schema: Value) -> Value {
    json!({"description": "Successful Response", "content": {"application/json": {"schema": schema}}})
}

/// The OpenAPI document a Cog build (0.23.1) writes for a text model that streams a
/// concatenate iterator: Cog's paths and components, `defaults` as the inputs' defaults.
pub fn openapi_schema(defaults: &Map<String, Value>, limits: &RequestLimits) -> Value {
    let s = |title: &str| json!({"title": title, "type": "string"});
    let time = |title: &str| json!({"title": title, "type": "string", "format": "date-time"});
    let invalid = json!({"description": "Validation Error", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}});
    json!({
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": COG_VERSION},
        "paths": {
            "/": {"get": {"summary": "Root", "operationId": "root__get",
                          "responses": {"200": ok_response(json!({}))}}},
            "/health-check": {"get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get",
                                      "responses": {"200": ok_response(json!({}))}}},
            "/predictions": {"post": {
                "summary": "Predict", "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}},
                "responses": {"200": ok_response(json!({"$ref": "#/components/schemas/PredictionResponse"})), "422": invalid},
                "x-cog-streaming": true,
            }},
            "/predictions/{prediction_id}/cancel": {"post": {
                "summary": "Cancel", "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [{"required": true, "schema": s("Prediction Id"), "name": "prediction_id", "in": "path"}],
                "responses": {"200": ok_response(json!({})), "422": invalid},
            }},
        },
        "components": {"schemas": {
            "Input": input_schema(defaults, limits),
            "Output": {"type": "array", "title": "Output", "items": {"type": "string"},
                       "x-cog-array-type": "iterator", "x-cog-array-display": "concatenate"},
            "PredictionRequest": {"type": "object", "title": "PredictionRequest", "properties": {
                "id": s("Id"), "input": {"$ref": "#/components/schemas/Input"}}},
            "PredictionResponse": {"type": "object", "title": "PredictionResponse", "properties": {
                "input": {"$ref": "#/components/schemas/Input"}, "output": {"$ref": "#/components/schemas/Output"},
                "id": s("Id"), "version": s("Version"), "created_at": time("Created At"),
                "started_at": time("Started At"), "completed_at": time("Completed At"), "status": s("Status"),
                "error": s("Error"), "logs": s("Logs"), "metrics": {"title": "Metrics", "type": "object"}}},
            "Status": {"type": "string", "title": "Status", "description": "An enumeration.",
                       "enum": ["starting", "processing", "succeeded", "canceled", "failed"]},
            "HTTPValidationError": {"type": "object", "title": "HTTPValidationError", "properties": {
                "detail": {"title": "Detail", "type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}}},
            "ValidationError": {"type": "object", "title": "ValidationError", "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"title": "Location", "type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": s("Message"), "type": s("Error Type")}},
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

fn int_value(n: i128) -> Value {
    i64::try_from(n)
        .map(Value::from)
        .or_else(|_| u64::try_from(n).map(Value::from))
        .unwrap_or(Value::Null)
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
#[path = "schema_tests.rs"]
mod tests;
