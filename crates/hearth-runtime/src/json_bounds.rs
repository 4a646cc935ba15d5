//! Bounds for the numbers a JSON Schema leaves unbounded, added before the schema goes
//! to llguidance. An `integer` with no `maximum` lets a sampling model write digits
//! forever (SmolLM2-135M at temperature 1 does), which ends the request by length with
//! invalid JSON. So an `integer` or `number` without a lower or upper bound gets
//! ±(2^53 − 1): the range I-JSON (RFC 7493) says every JSON parser reads exactly, at
//! most 16 integer digits. (Not the full i64 range: llguidance reads bounds as f64, and
//! ±(2^63 − 1) rounds to 2^63, which overflows its integer-range regex builder.)
//!
//! The rewrite only adds bounds, so every output still validates against the caller's
//! schema: an explicit bound is never changed, and a missing one is added only where it
//! keeps the range non-empty. A number's fraction digits stay unbounded (llguidance
//! has no digit-count option); its integer part is bounded by the range.
//!
//! Work is bounded: each subschema is visited once (the schema's size is already
//! limited by schema_check) and nesting deeper than [`MAX_DEPTH`] is left as written.
//! `$ref`s need no resolving: their targets (`$defs`, `definitions`, properties) are
//! subschemas the walk reaches on its own.

use serde_json::{Map, Value};

/// 2^53 − 1, the largest integer an IEEE double holds exactly.
pub const SAFE_INTEGER: i64 = 9_007_199_254_740_991;

/// Subschemas nested deeper than this are left as written.
pub const MAX_DEPTH: usize = 64;

use crate::schema_check::{SCHEMA_LISTS, SCHEMA_MAPS, SCHEMA_ONES};

/// Adds the missing lower and upper bound to every `integer` and `number` subschema.
pub fn bound_numbers(schema: &mut Value) {
    bound_at(schema, 0);
}

fn bound_at(schema: &mut Value, depth: usize) {
    if depth > MAX_DEPTH {
        return;
    }
    let Value::Object(obj) = schema else { return };
    if is_numeric(obj) {
        add_bounds(obj);
    }
    for (key, value) in obj.iter_mut() {
        let k = key.as_str();
        match value {
            Value::Object(m) if SCHEMA_MAPS.contains(&k) => {
                for sub in m.values_mut() {
                    bound_at(sub, depth + 1);
                }
            }
            // `items` is one subschema or (draft 4-2019) a list of them.
            Value::Array(items) if SCHEMA_LISTS.contains(&k) || k == "items" => {
                for sub in items {
                    bound_at(sub, depth + 1);
                }
            }
            Value::Object(_) if SCHEMA_ONES.contains(&k) || k == "items" => {
                bound_at(value, depth + 1)
            }
            _ => {}
        }
    }
}

/// Whether the subschema's `type` names `integer` or `number`. Untyped subschemas are
/// left alone: a bound there is only a sibling of something else's type.
fn is_numeric(obj: &Map<String, Value>) -> bool {
    let numeric = |t: &Value| matches!(t.as_str(), Some("integer" | "number"));
    match obj.get("type") {
        Some(Value::Array(types)) => types.iter().any(numeric),
        Some(t) => numeric(t),
        None => false,
    }
}

fn add_bounds(obj: &mut Map<String, Value>) {
    let safe = SAFE_INTEGER as f64;
    // Draft 4's boolean `exclusiveMinimum` only qualifies `minimum`; a number is a bound.
    let lower = bound(obj, "minimum").or_else(|| bound(obj, "exclusiveMinimum"));
    let upper = bound(obj, "maximum").or_else(|| bound(obj, "exclusiveMaximum"));
    // A bound that is there but not a number is the caller's, left for llguidance to
    // refuse: never replaced.
    if lower.is_none() && upper.is_none_or(|u| u >= -safe) {
        obj.entry("minimum").or_insert(Value::from(-SAFE_INTEGER));
    }
    if upper.is_none() && lower.is_none_or(|l| l <= safe) {
        obj.entry("maximum").or_insert(Value::from(SAFE_INTEGER));
    }
}

fn bound(obj: &Map<String, Value>, key: &str) -> Option<f64> {
    obj.get(key).and_then(Value::as_f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bounded(mut v: Value) -> Value {
        bound_numbers(&mut v);
        v
    }

    const S: i64 = SAFE_INTEGER;

    #[test]
    fn unbounded_integers_and_numbers_get_the_safe_range_everywhere() {
        let int = json!({"type": "integer"});
        let int_b = json!({"type": "integer", "minimum": -S, "maximum": S});
        let schema = json!({
            "type": "object",
            "properties": {
                "a": int, "b": {"type": "number"}, "c": {"type": ["integer", "null"]},
                "d": {"type": "array", "items": int},
                "e": {"type": "array", "prefixItems": [int], "items": [int]},
                "f": {"anyOf": [int, {"type": "string"}]},
                "g": {"allOf": [int, {"oneOf": [int]}]},
                "h": {"$ref": "#/$defs/n"},
                "i": {"type": "object", "properties": {"j": {"type": "object",
                    "additionalProperties": int}}},
            },
            "patternProperties": {"^x": int},
            "additionalProperties": int,
            "$defs": {"n": int},
            "definitions": {"m": int},
        });
        let want = json!({
            "type": "object",
            "properties": {
                "a": int_b,
                "b": {"type": "number", "minimum": -S, "maximum": S},
                "c": {"type": ["integer", "null"], "minimum": -S, "maximum": S},
                "d": {"type": "array", "items": int_b},
                "e": {"type": "array", "prefixItems": [int_b], "items": [int_b]},
                "f": {"anyOf": [int_b, {"type": "string"}]},
                "g": {"allOf": [int_b, {"oneOf": [int_b]}]},
                "h": {"$ref": "#/$defs/n"},
                "i": {"type": "object", "properties": {"j": {"type": "object",
                    "additionalProperties": int_b}}},
            },
            "patternProperties": {"^x": int_b},
            "additionalProperties": int_b,
            "$defs": {"n": int_b},
            "definitions": {"m": int_b},
        });
        assert_eq!(bounded(schema), want);
    }

    #[test]
    fn explicit_bounds_are_left_alone_and_only_the_missing_side_is_added() {
        let both = json!({"type": "integer", "minimum": 5, "maximum": 1e30});
        assert_eq!(bounded(both.clone()), both);
        let excl = json!({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1});
        assert_eq!(bounded(excl.clone()), excl);
        assert_eq!(
            bounded(json!({"type": "integer", "minimum": 0})),
            json!({"type": "integer", "minimum": 0, "maximum": S})
        );
        assert_eq!(
            bounded(json!({"type": "integer", "exclusiveMaximum": 10})),
            json!({"type": "integer", "exclusiveMaximum": 10, "minimum": -S})
        );
        // Draft 4: the boolean qualifies the (missing) minimum; the range is still added.
        assert_eq!(
            bounded(json!({"type": "integer", "exclusiveMinimum": true, "maximum": 3})),
            json!({"type": "integer", "exclusiveMinimum": true, "maximum": 3, "minimum": -S})
        );
    }

    #[test]
    fn a_bound_outside_the_range_is_never_made_empty() {
        let big = json!({"type": "integer", "minimum": 1e20});
        assert_eq!(bounded(big.clone()), big);
        let small = json!({"type": "integer", "maximum": -1e20});
        assert_eq!(bounded(small.clone()), small);
    }

    #[test]
    fn untyped_strings_consts_and_annotations_are_untouched() {
        let s = json!({
            "properties": {"a": {"minimum": 0}, "b": {"type": "string"}, "c": {"const": 7},
                "d": {"enum": [1, 2]}},
            "x-note": {"type": "integer"},
            "default": {"type": "integer"},
        });
        assert_eq!(bounded(s.clone()), s);
    }

    #[test]
    fn nesting_past_the_depth_bound_is_left_as_written() {
        let mut deep = json!({"type": "integer"});
        for _ in 0..(MAX_DEPTH + 10) {
            deep = json!({"anyOf": [deep]});
        }
        let out = bounded(deep.clone());
        let mut node = &out;
        let mut levels = 0;
        while let Some(inner) = node.get("anyOf") {
            node = &inner[0];
            levels += 1;
        }
        assert_eq!(levels, MAX_DEPTH + 10);
        assert_eq!(node, &json!({"type": "integer"}));
        // Within the bound, the same leaf is bounded.
        let out = bounded(json!({"anyOf": [{"anyOf": [{"type": "integer"}]}]}));
        assert_eq!(out["anyOf"][0]["anyOf"][0]["maximum"], json!(S));
    }

    #[test]
    fn a_bound_that_is_not_a_number_is_never_replaced() {
        let out = bounded(json!({"type": "integer", "minimum": "5", "maximum": null}));
        assert_eq!(out["minimum"], json!("5"));
        assert_eq!(out["maximum"], Value::Null);
    }
}
