//! The JSON Schema keywords hearth can enforce, checked before compiling so a refusal
//! names the keyword and where it is (`/properties/tags/uniqueItems`). Keywords of the
//! JSON Schema drafts that llguidance does not implement are refused, never ignored;
//! names outside every draft (`x-…`, OpenAPI's `discriminator`) are annotations, as the
//! specification has it. `$ref`s must point into the schema itself: a remote one is
//! refused, never fetched.

use serde_json::Value;

/// What llguidance enforces (its `IMPLEMENTED` list) and what is only an annotation.
const SUPPORTED: &[&str] = &[
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "const",
    "enum",
    "type",
    "items",
    "additionalItems",
    "prefixItems",
    "minItems",
    "maxItems",
    "properties",
    "additionalProperties",
    "patternProperties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "$anchor",
    "$defs",
    "definitions",
    "$schema",
    "$id",
    "id",
    "$comment",
    "title",
    "description",
    "default",
    "readOnly",
    "writeOnly",
    "examples",
    "contentMediaType",
    "contentEncoding",
    "deprecated",
];

/// Keywords of drafts 4 to 2020-12 that constrain instances but are not enforced.
const UNSUPPORTED: &[&str] = &[
    "not",
    "if",
    "then",
    "else",
    "dependentSchemas",
    "dependentRequired",
    "dependencies",
    "contains",
    "minContains",
    "maxContains",
    "uniqueItems",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contentSchema",
    "$dynamicRef",
    "$dynamicAnchor",
    "$recursiveRef",
    "$recursiveAnchor",
    "$vocabulary",
];

/// Where in a schema subschemas sit: a map of them, a list of them, or one.
pub(crate) const SCHEMA_MAPS: &[&str] =
    &["properties", "patternProperties", "$defs", "definitions"];
pub(crate) const SCHEMA_LISTS: &[&str] = &["anyOf", "oneOf", "allOf", "prefixItems"];
pub(crate) const SCHEMA_ONES: &[&str] = &["additionalProperties", "additionalItems"];

/// Largest schema accepted, as JSON text; llguidance's own limits bound the rest.
pub const MAX_SCHEMA_BYTES: usize = 256 * 1024;

/// The first keyword hearth cannot enforce, as a sentence naming it and its path.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    let size = serde_json::to_string(schema).map_or(0, |s| s.len());
    if size > MAX_SCHEMA_BYTES {
        return Err(format!(
            "the schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are accepted"
        ));
    }
    check_at(schema, &mut String::new())
}

fn check_at(schema: &Value, path: &mut String) -> Result<(), String> {
    let obj = match schema {
        Value::Bool(_) => return Ok(()),
        Value::Object(o) => o,
        other => {
            return Err(format!(
                "the schema at {} is {}; a schema is an object or a boolean",
                shown(path),
                kind(other)
            ))
        }
    };
    for (key, value) in obj {
        if UNSUPPORTED.contains(&key.as_str()) {
            return Err(format!(
                "the JSON Schema keyword `{key}` at {} is not supported (hearth enforces: {})",
                shown(&format!("{path}/{key}")),
                SUPPORTED[..27].join(", ")
            ));
        }
        if key == "$ref" {
            let target = value.as_str().unwrap_or_default();
            if !target.starts_with('#') {
                return Err(format!(
                    "the $ref {value} at {} points outside the schema; only local references (\"#/$defs/…\") are supported, remote ones are never fetched",
                    shown(&format!("{path}/$ref"))
                ));
            }
        }
    }
    let mut descend = |sub: &Value, suffix: String| {
        let len = path.len();
        path.push_str(&suffix);
        let r = check_at(sub, path);
        path.truncate(len);
        r
    };
    for (key, value) in obj {
        let k = key.as_str();
        if SCHEMA_MAPS.contains(&k) {
            if let Value::Object(m) = value {
                for (name, sub) in m {
                    descend(sub, format!("/{k}/{}", pointer_escape(name)))?;
                }
            }
        } else if SCHEMA_LISTS.contains(&k) {
            if let Value::Array(items) = value {
                for (i, sub) in items.iter().enumerate() {
                    descend(sub, format!("/{k}/{i}"))?;
                }
            }
        } else if SCHEMA_ONES.contains(&k) || k == "items" {
            match value {
                Value::Array(items) if k == "items" => {
                    for (i, sub) in items.iter().enumerate() {
                        descend(sub, format!("/items/{i}"))?;
                    }
                }
                Value::Object(_) | Value::Bool(_) => descend(value, format!("/{k}"))?,
                _ => {}
            }
        }
    }
    Ok(())
}

fn shown(path: &str) -> String {
    if path.is_empty() {
        "the top level".into()
    } else {
        format!("`{path}`")
    }
}

fn pointer_escape(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_the_keyword_and_its_path() {
        let e = check_schema(&json!({"type": "object", "properties": {
            "a/b": {"type": "array", "items": {"type": "string", "not": {"const": "x"}}}}}))
        .unwrap_err();
        assert!(
            e.contains("`not`") && e.contains("`/properties/a~1b/items/not`"),
            "{e}"
        );
        let e = check_schema(&json!({"anyOf": [{"type": "string"}, {"uniqueItems": true}]}))
            .unwrap_err();
        assert!(e.contains("`/anyOf/1/uniqueItems`"), "{e}");
    }

    #[test]
    fn remote_refs_are_refused_and_local_ones_pass() {
        let e = check_schema(&json!({"$ref": "https://example.com/s.json"})).unwrap_err();
        assert!(e.contains("never fetched"), "{e}");
        let ok = json!({"$defs": {"p": {"type": "integer"}}, "$ref": "#/$defs/p", "x-note": 1});
        assert_eq!(check_schema(&ok), Ok(()));
    }

    #[test]
    fn non_schemas_and_huge_schemas_are_refused() {
        assert!(check_schema(&json!({"properties": {"a": 3}})).is_err());
        let big = json!({"enum": vec!["a".repeat(1000); 300]});
        assert!(check_schema(&big).unwrap_err().contains("bytes"));
    }
}
