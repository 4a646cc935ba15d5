//! Checking a create's input against an upstream version's OpenAPI `Input` schema
//! before anything is sent, so a bad input is hearth's own 422 naming the field, with
//! nothing sent upstream and nothing stored.
//!
//! The upstream's schema is OpenAPI 3.0 (Cog writes 3.0.2), not plain JSON Schema,
//! and an upstream may use keywords hearth cannot evaluate as the upstream does. So
//! the schema is first reduced to the keywords whose meaning is the same in OpenAPI
//! 3.0, JSON Schema drafts 4 to 2020-12 and the hosted API's validator (type, enum,
//! const, numeric bounds, lengths, item and property counts, `properties`,
//! `required`, `additionalProperties`, `items`, `allOf`/`anyOf`/`oneOf`/`not`, and
//! `$ref`s into `#/components/schemas`, inlined). Everything else is dropped and the
//! validating keywords among them are named in `skipped`: `format` (the upstream
//! decides what a URI is), `pattern` (regex dialects differ), `if`/`then`/`else`,
//! `patternProperties` and the rest. Dropping a constraint only ever accepts more,
//! except under `not` and `oneOf`, which are kept only when nothing under them was
//! dropped. OpenAPI's `nullable: true` admits null; a top-level input given as null
//! is "use the default" on Replicate's routes and is never an error here. Whatever
//! passes here and still fails upstream comes back as the upstream's 422, unchanged.

use std::collections::BTreeSet;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use serde_json::{Map, Value};

use crate::error::{ApiError, FieldError};

/// Nested `$ref` expansions followed at most; deeper (a recursive schema) accepts anything.
const MAX_REF_DEPTH: usize = 16;
/// Schema nodes kept at most after inlining; a larger schema is not checked here.
const MAX_NODES: usize = 20_000;
/// Invalid fields named in one 422 at most.
const MAX_ERRORS: usize = 20;
/// A message's longest form (an `enum` can list many choices).
const MAX_MESSAGE: usize = 300;

/// Keywords kept as they are, their values being plain data (numbers, lists).
const DATA_KEYWORDS: &[&str] = &[
    "enum",
    "const",
    "minimum",
    "maximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
];

/// Keywords that describe and never constrain: dropped without a mention.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "example",
    "examples",
    "readOnly",
    "writeOnly",
    "deprecated",
    "$comment",
    "$schema",
    "$id",
    "externalDocs",
    "xml",
    "discriminator",
    "nullable",
];

const JSON_TYPES: &[&str] = &[
    "null", "boolean", "object", "array", "number", "integer", "string",
];

/// The `Input` component of one upstream version's schema, ready to check inputs.
pub struct InputCheck {
    validator: jsonschema::Validator,
    /// Validating keywords of the upstream's schema that are not checked here.
    pub skipped: Vec<String>,
}

impl std::fmt::Debug for InputCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputCheck")
            .field("skipped", &self.skipped)
            .finish()
    }
}

/// Reducing one schema: what was dropped, and how much was built.
struct Reducer<'a> {
    components: Option<&'a Map<String, Value>>,
    skipped: BTreeSet<String>,
    nodes: usize,
}

impl<'a> Reducer<'a> {
    /// `schema` with only exactly-checkable keywords, and whether anything was
    /// dropped (the result then accepts more than the original).
    fn reduce(&mut self, schema: &Value, refs: usize) -> Result<(Value, bool), String> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(format!(
                "more than {MAX_NODES} schema nodes once $refs are inlined"
            ));
        }
        let obj = match schema {
            Value::Bool(_) => return Ok((schema.clone(), false)),
            Value::Object(o) => o,
            // Not a schema: accept anything rather than guess.
            _ => return Ok((Value::Bool(true), true)),
        };
        if let Some(r) = obj.get("$ref") {
            // OpenAPI 3.0 ignores a `$ref`'s siblings; following the target alone
            // accepts at least what the upstream accepts under either reading.
            return self.follow(r, refs);
        }
        let mut out = Map::new();
        let mut loose = false;
        for (k, v) in obj {
            let kept = match k.as_str() {
                "type" => Some(valid_type(v)),
                k if DATA_KEYWORDS.contains(&k) => Some(valid_data(k, v)),
                // OpenAPI 3.0's `false`: the bound is inclusive, as without it.
                "exclusiveMinimum" | "exclusiveMaximum" if *v == Value::Bool(false) => None,
                "exclusiveMinimum" | "exclusiveMaximum" => Some(exclusive(obj, k, v)),
                "required" => Some(
                    v.as_array()
                        .filter(|a| a.iter().all(Value::is_string))
                        .map(|_| v.clone()),
                ),
                "properties" => match v.as_object() {
                    Some(props) => {
                        let mut p = Map::new();
                        for (name, s) in props {
                            let (s, l) = self.reduce(s, refs)?;
                            loose |= l;
                            p.insert(name.clone(), s);
                        }
                        Some(Some(Value::Object(p)))
                    }
                    None => Some(None),
                },
                "additionalProperties" | "items" if v.is_object() || v.is_boolean() => {
                    let (s, l) = self.reduce(v, refs)?;
                    loose |= l;
                    Some(Some(s))
                }
                "allOf" | "anyOf" => match v.as_array().filter(|a| !a.is_empty()) {
                    Some(list) => {
                        let mut reduced = Vec::with_capacity(list.len());
                        for s in list {
                            let (s, l) = self.reduce(s, refs)?;
                            loose |= l;
                            reduced.push(s);
                        }
                        Some(Some(Value::Array(reduced)))
                    }
                    None => Some(None),
                },
                // Loosening a branch of `oneOf` can make two branches match, and
                // loosening under `not` rejects more: kept only when exact.
                "oneOf" => match v.as_array().filter(|a| !a.is_empty()) {
                    Some(list) => {
                        let mut reduced = Vec::with_capacity(list.len());
                        let mut exact = true;
                        for s in list {
                            let (s, l) = self.reduce(s, refs)?;
                            exact &= !l;
                            reduced.push(s);
                        }
                        Some(exact.then_some(Value::Array(reduced)))
                    }
                    None => Some(None),
                },
                "not" => {
                    let (s, l) = self.reduce(v, refs)?;
                    Some((!l).then_some(s))
                }
                k if ANNOTATIONS.contains(&k) || k.starts_with("x-") => None,
                _ => Some(None),
            };
            match kept {
                Some(Some(v)) => {
                    out.insert(k.clone(), v);
                }
                Some(None) => {
                    self.skipped.insert(k.clone());
                    loose = true;
                }
                None => {}
            }
        }
        if obj.get("nullable") == Some(&Value::Bool(true)) {
            return Ok((nullable(out), loose));
        }
        Ok((Value::Object(out), loose))
    }

    fn follow(&mut self, r: &Value, refs: usize) -> Result<(Value, bool), String> {
        let target = r
            .as_str()
            .and_then(|r| r.strip_prefix("#/components/schemas/"))
            .and_then(|name| self.components?.get(name));
        match target {
            Some(t) if refs < MAX_REF_DEPTH => self.reduce(t, refs + 1),
            _ => {
                self.skipped.insert("$ref".into());
                Ok((Value::Bool(true), true))
            }
        }
    }
}

/// OpenAPI 3.0's `nullable: true`: null is allowed besides the rest (as a type
/// where there is one, so a wrong type is still reported as such).
fn nullable(mut out: Map<String, Value>) -> Value {
    let null = Value::from("null");
    let no_choices = out.get("enum").is_none() && out.get("const").is_none();
    match out.get_mut("type") {
        Some(Value::String(t)) if no_choices => {
            let t = Value::from(t.as_str());
            out.insert("type".into(), Value::Array(vec![t, null]));
            Value::Object(out)
        }
        Some(Value::Array(ts)) if no_choices => {
            if !ts.contains(&null) {
                ts.push(null);
            }
            Value::Object(out)
        }
        _ => serde_json::json!({"anyOf": [{"type": "null"}, Value::Object(out)]}),
    }
}

fn valid_type(v: &Value) -> Option<Value> {
    let known = |t: &Value| t.as_str().is_some_and(|t| JSON_TYPES.contains(&t));
    match v {
        Value::String(_) if known(v) => Some(v.clone()),
        Value::Array(a) if !a.is_empty() && a.iter().all(known) => Some(v.clone()),
        _ => None,
    }
}

fn valid_data(k: &str, v: &Value) -> Option<Value> {
    let ok = match k {
        "enum" => v.as_array().is_some_and(|a| !a.is_empty()),
        "const" => true,
        "minimum" | "maximum" => v.is_number(),
        "multipleOf" => v.as_f64().is_some_and(|x| x > 0.0),
        "uniqueItems" => v.is_boolean(),
        _ => v.is_u64(),
    };
    ok.then(|| v.clone())
}

/// `exclusiveMinimum`: a number (JSON Schema 6+), or OpenAPI 3.0's boolean that
/// makes `minimum` exclusive (then `minimum` itself is also kept, which is implied).
fn exclusive(obj: &Map<String, Value>, k: &str, v: &Value) -> Option<Value> {
    match v {
        Value::Number(_) => Some(v.clone()),
        Value::Bool(true) => {
            let bound = if k == "exclusiveMinimum" {
                "minimum"
            } else {
                "maximum"
            };
            obj.get(bound).filter(|b| b.is_number()).cloned()
        }
        _ => None,
    }
}

impl InputCheck {
    /// The check for `openapi`'s `components.schemas.Input`; None without one.
    pub fn from_openapi(openapi: &Value) -> Result<Option<Self>, String> {
        let components = openapi["components"]["schemas"].as_object();
        let Some(input) = components.and_then(|c| c.get("Input")) else {
            return Ok(None);
        };
        let mut r = Reducer {
            components,
            skipped: BTreeSet::new(),
            nodes: 0,
        };
        let (schema, _) = r.reduce(input, 0)?;
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(false)
            .build(&schema)
            .map_err(|e| format!("the reduced schema does not compile: {e}"))?;
        Ok(Some(Self {
            validator,
            skipped: r.skipped.into_iter().collect(),
        }))
    }

    /// A 422 naming each invalid field of `input` and why.
    pub fn check(&self, input: &Value) -> Result<(), ApiError> {
        let given_null = |key: &str| input.get(key).is_some_and(Value::is_null);
        let mut fields: Vec<FieldError> = Vec::new();
        for e in self.validator.iter_errors(input) {
            let mut loc: Vec<String> = vec!["input".into()];
            loc.extend(e.instance_path().iter().map(|s| s.to_string()));
            if loc.get(1).is_some_and(|k| given_null(k)) {
                continue;
            }
            let msg = match e.kind() {
                ValidationErrorKind::Required { property } => {
                    loc.push(property.as_str().unwrap_or_default().to_string());
                    "required".to_string()
                }
                ValidationErrorKind::AdditionalProperties { unexpected } => {
                    for name in unexpected {
                        let mut l = loc.clone();
                        l.push(name.clone());
                        fields.push(FieldError {
                            loc: l,
                            msg: "not an input of this model".into(),
                        });
                    }
                    continue;
                }
                _ => message(&e),
            };
            fields.push(FieldError { loc, msg });
            if fields.len() >= MAX_ERRORS {
                break;
            }
        }
        if fields.is_empty() {
            return Ok(());
        }
        fields.truncate(MAX_ERRORS);
        Err(ApiError::invalid_fields(fields))
    }
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Why the value failed, without quoting a large input back.
fn message(e: &jsonschema::ValidationError<'_>) -> String {
    let v: &Value = e.instance();
    let shown = |v: &Value| -> String {
        let s = v.to_string();
        if s.len() > 40 {
            type_of(v).to_string()
        } else {
            s
        }
    };
    let m = match e.kind() {
        ValidationErrorKind::Type { kind } => {
            let want = match kind {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(ts) => {
                    // Null last: "integer or null" reads as the nullable input it is.
                    let mut names: Vec<String> = ts.iter().map(|t| t.to_string()).collect();
                    names.sort_by_key(|t| t == "null");
                    names.join(" or ")
                }
            };
            format!("expected {want}, got {}", type_of(v))
        }
        ValidationErrorKind::Minimum { limit } => {
            format!("must be greater than or equal to {limit}, got {}", shown(v))
        }
        ValidationErrorKind::Maximum { limit } => {
            format!("must be less than or equal to {limit}, got {}", shown(v))
        }
        ValidationErrorKind::ExclusiveMinimum { limit } => {
            format!("must be greater than {limit}, got {}", shown(v))
        }
        ValidationErrorKind::ExclusiveMaximum { limit } => {
            format!("must be less than {limit}, got {}", shown(v))
        }
        ValidationErrorKind::Enum { options } => format!("must be one of {options}"),
        ValidationErrorKind::Constant { expected_value } => {
            format!("must be {expected_value}")
        }
        ValidationErrorKind::MinLength { limit } => {
            format!("must be at least {limit} characters long")
        }
        ValidationErrorKind::MaxLength { limit } => {
            format!("must be at most {limit} characters long")
        }
        ValidationErrorKind::MinItems { limit } => format!("must have at least {limit} items"),
        ValidationErrorKind::MaxItems { limit } => format!("must have at most {limit} items"),
        ValidationErrorKind::AnyOf { .. } | ValidationErrorKind::OneOfNotValid { .. } => {
            "matches none of the forms the model's schema allows".into()
        }
        _ => e.masked_with("the value").to_string(),
    };
    if m.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &m[..end])
    } else {
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What Cog writes for a predictor with a choice, a bounded float, an optional
    /// int and a file, plus keywords hearth does not check.
    fn cog_like() -> Value {
        json!({"openapi": "3.0.2", "components": {"schemas": {
            "Input": {"type": "object", "title": "Input", "required": ["prompt"], "properties": {
                "prompt": {"type": "string", "title": "Prompt", "x-order": 0, "pattern": "^[a-z]+$"},
                "temperature": {"type": "number", "minimum": 0, "maximum": 5, "default": 0.6},
                "steps": {"type": "integer", "minimum": 1, "exclusiveMaximum": true, "maximum": 50},
                "seed": {"type": "integer", "nullable": true},
                "image": {"type": "string", "format": "uri"},
                "mode": {"allOf": [{"$ref": "#/components/schemas/mode"}], "x-order": 4},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                "odd": {"if": {"type": "string"}, "then": {"minLength": 3}, "x-thing": 1},
                "either": {"oneOf": [{"type": "string", "format": "uri"}, {"type": "integer"}]},
                "tree": {"$ref": "#/components/schemas/Tree"},
            }},
            "mode": {"title": "mode", "description": "An enumeration.", "enum": ["fast", "slow"], "type": "string"},
            "Tree": {"type": "object", "properties": {"child": {"$ref": "#/components/schemas/Tree"}}},
        }}})
    }

    fn fields(r: Result<(), ApiError>) -> Vec<(String, String)> {
        match r {
            Ok(()) => Vec::new(),
            Err(e) => e
                .fields()
                .iter()
                .map(|f| (f.loc.join("."), f.msg.clone()))
                .collect(),
        }
    }

    #[test]
    fn valid_inputs_pass_whatever_the_schema_says_that_is_not_checked_here() {
        let c = InputCheck::from_openapi(&cog_like()).unwrap().unwrap();
        let ok = json!({
            "prompt": "Not Lowercase 123", "temperature": 5, "steps": 49, "seed": null,
            "image": "not a uri at all", "mode": "slow", "tags": ["a"], "odd": "x",
            "either": "also not a uri", "tree": {"child": {"child": {"child": {}}}},
        });
        assert_eq!(fields(c.check(&ok)), vec![]);
        // Null is "use the default" for any top-level input.
        assert_eq!(
            fields(c.check(&json!({"prompt": "a", "mode": null, "steps": null}))),
            vec![]
        );
        for k in ["format", "if", "pattern", "then"] {
            assert!(c.skipped.iter().any(|s| s == k), "{:?}", c.skipped);
        }
        assert!(!c
            .skipped
            .iter()
            .any(|s| s.starts_with("x-") || s == "title"));
    }

    #[test]
    fn bad_inputs_name_each_field_and_why() {
        let c = InputCheck::from_openapi(&cog_like()).unwrap().unwrap();
        let got = fields(c.check(&json!({
            "temperature": 7, "steps": 50, "seed": "x", "mode": "medium",
            "tags": ["a", "b", "c"], "either": 1.5,
        })));
        let want = [
            ("input.prompt", "required"),
            (
                "input.temperature",
                "must be less than or equal to 5, got 7",
            ),
            ("input.steps", "must be less than 50, got 50"),
            ("input.seed", "expected integer or null, got string"),
            ("input.mode", "must be one of [\"fast\",\"slow\"]"),
            ("input.tags", "must have at most 2 items"),
        ];
        for (loc, msg) in want {
            assert!(
                got.iter().any(|(l, m)| l == loc && m == msg),
                "{loc}: {msg} not in {got:?}"
            );
        }
        // `oneOf` lost a `format` in one branch: not checked, so 1.5 is not reported.
        assert!(!got.iter().any(|(l, _)| l == "input.either"), "{got:?}");
        let nested = fields(c.check(&json!({"prompt": "a", "tags": [1]})));
        assert_eq!(
            nested,
            vec![("input.tags.0".into(), "expected string, got integer".into())]
        );
        let e = c.check(&json!({"prompt": 3})).unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.to_string(), "input.prompt: expected string, got integer");
    }

    #[test]
    fn hearths_own_schema_checks_its_inputs() {
        let doc = crate::schema::openapi_schema(
            &crate::schema::default_inputs(),
            &hearth_runtime::RequestLimits {
                vocab_size: 256,
                max_model_len: 512,
                kv_capacity_tokens: 4096,
            },
        );
        let c = InputCheck::from_openapi(&doc).unwrap().unwrap();
        assert_eq!(
            fields(c.check(&json!({"prompt": "hi", "max_tokens": 8, "seed": null}))),
            vec![]
        );
        // json_schema as the object itself, as a string holding one, or a boolean schema.
        for schema in [
            json!({"type": "object"}),
            json!("{\"type\": \"object\"}"),
            json!(true),
        ] {
            assert_eq!(
                fields(c.check(&json!({"prompt": "hi", "json_schema": schema}))),
                vec![]
            );
        }
        assert_eq!(
            fields(c.check(&json!({"prompt": "hi", "json_schema": 5})))[0].0,
            "input.json_schema"
        );
        let got = fields(c.check(&json!({"prompt": "hi", "max_tokens": "many", "temperature": 9})));
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].0, "input.max_tokens");
        assert_eq!(
            got[1],
            (
                "input.temperature".into(),
                "must be less than or equal to 5, got 9".into()
            )
        );
    }

    #[test]
    fn a_schema_without_an_input_component_checks_nothing() {
        assert!(InputCheck::from_openapi(&json!({})).unwrap().is_none());
        assert!(
            InputCheck::from_openapi(&json!({"components": {"schemas": {"Output": {}}}}))
                .unwrap()
                .is_none()
        );
        // Garbage where schemas go is dropped, not a failure to build.
        let c = InputCheck::from_openapi(&json!({"components": {"schemas": {"Input": {
            "type": "file", "minimum": "x", "required": [1], "not": {"format": "uri"},
            "properties": {"a": 5, "b": {"$ref": "#/elsewhere"}}}}}}))
        .unwrap()
        .unwrap();
        assert_eq!(fields(c.check(&json!({"a": 1, "b": "x"}))), vec![]);
    }
}
