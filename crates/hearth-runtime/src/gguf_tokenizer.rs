//! A `tokenizers::Tokenizer` built from a GGUF file's own vocabulary (`tokenizer.ggml.*`):
//! byte-level BPE (`gpt2`) with the pre-tokenizer `tokenizer.ggml.pre` names, or a
//! SentencePiece-style vocabulary (`llama`) whose merges are recovered from the scores.
//! It is written as the tokenizer.json Hugging Face would ship for the same vocabulary.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};
use tokenizers::Tokenizer;

use crate::error::{Result, RuntimeError};
use crate::gguf::GgufFile;

const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` values understood, for error messages.
pub const SUPPORTED_PRE: &str = "gpt-2, smollm, llama-bpe (llama3, llama-v3), qwen2";

/// What a GGUF says about its tokenizer beyond the vocabulary.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The tokenizer.json it was built as (hashed into the model's version id).
    pub json: String,
}

fn tok_err(gguf: &GgufFile, reason: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Tokenizer(format!("{}: {reason}", gguf.path.display()))
}

fn strings(gguf: &GgufFile, key: &str) -> Result<Option<Vec<String>>> {
    match gguf.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(tok_err(gguf, format!("{key} holds a non-string"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(_) => Err(tok_err(gguf, format!("{key} is not an array"))),
    }
}

fn numbers(gguf: &GgufFile, key: &str) -> Option<Vec<f64>> {
    match gguf.get(key)? {
        Value::Array(a) => a
            .iter()
            .map(|v| match *v {
                Value::F32(x) => Some(x as f64),
                Value::F64(x) => Some(x),
                Value::I32(x) => Some(x as f64),
                Value::U32(x) => Some(x as f64),
                Value::I8(x) => Some(x as f64),
                Value::U8(x) => Some(x as f64),
                Value::I64(x) => Some(x as f64),
                Value::U64(x) => Some(x as f64),
                Value::I16(x) => Some(x as f64),
                Value::U16(x) => Some(x as f64),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(pattern: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

/// The pre-tokenizer llama.cpp applies for `tokenizer.ggml.pre`, as tokenizers spells it;
/// and whether merges are skipped for whole-word vocabulary hits (Llama 3).
fn bpe_pre_tokenizer(pre: &str) -> Option<(Json, bool)> {
    Some(match pre {
        "gpt-2" | "gpt2" => (byte_level(true), false),
        // llama.cpp isolates every digit first (`\p{N}`), as SmolLM2's tokenizer.json
        // does with `Digits(individual_digits)`.
        "smollm" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        "llama-bpe" | "llama3" | "llama-v3" => (
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            true,
        ),
        "qwen2" => (
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
            false,
        ),
        _ => return None,
    })
}

/// SentencePiece BPE merges recovered from the vocabulary: every way of cutting a piece
/// into two pieces of the vocabulary, best score first (ties: shorter left, then right
/// piece last), as Hugging Face's conversion of such vocabularies orders them.
fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        ids.entry(t.as_str()).or_insert(i);
    }
    let mut merges: Vec<(usize, usize, f64, usize, usize)> = Vec::new();
    for (t, &score) in tokens.iter().zip(scores) {
        let mut local = Vec::new();
        let cuts: Vec<usize> = t.char_indices().map(|(i, _)| i).skip(1).collect();
        for c in cuts {
            let (l, r) = t.split_at(c);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                local.push((li, ri, score, l.chars().count(), r.chars().count()));
            }
        }
        local.sort_by_key(|m| (m.0, m.1));
        merges.extend(local);
    }
    // Stable and descending on (score, left length, right length).
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.3.cmp(&a.3)).then(b.4.cmp(&a.4)));
    merges
        .into_iter()
        .map(|(l, r, ..)| (tokens[l].clone(), tokens[r].clone()))
        .collect()
}

fn token_name(tokens: &[String], gguf: &GgufFile, key: &str) -> Option<String> {
    gguf.get_u64(key)
        .and_then(|id| tokens.get(id as usize).cloned())
}

impl GgufTokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| {
                tok_err(
                    gguf,
                    "tokenizer.ggml.model is missing: the file has no tokenizer",
                )
            })?
            .to_string();
        let tokens = strings(gguf, "tokenizer.ggml.tokens")?
            .ok_or_else(|| tok_err(gguf, "tokenizer.ggml.tokens is missing"))?;
        let types: Vec<i64> = numbers(gguf, "tokenizer.ggml.token_type")
            .map(|v| v.into_iter().map(|x| x as i64).collect())
            .unwrap_or_else(|| vec![1; tokens.len()]);
        if types.len() != tokens.len() {
            return Err(tok_err(
                gguf,
                format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    types.len(),
                    tokens.len()
                ),
            ));
        }
        let bos = token_name(&tokens, gguf, "tokenizer.ggml.bos_token_id");
        let eos = token_name(&tokens, gguf, "tokenizer.ggml.eos_token_id");
        let unk = token_name(&tokens, gguf, "tokenizer.ggml.unknown_token_id");
        let mut vocab = serde_json::Map::new();
        for (i, t) in tokens.iter().enumerate() {
            if !vocab.contains_key(t) {
                vocab.insert(t.clone(), i.into());
            }
        }
        let (model_json, normalizer, pre_tokenizer, decoder, default_add_bos) = match model.as_str()
        {
            "gpt2" => {
                let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("gpt-2");
                let (pre_json, ignore_merges) = bpe_pre_tokenizer(pre).ok_or_else(|| {
                    tok_err(
                        gguf,
                        format!("tokenizer.ggml.pre {pre:?} is not supported (supported: {SUPPORTED_PRE})"),
                    )
                })?;
                let merges = strings(gguf, "tokenizer.ggml.merges")?
                    .ok_or_else(|| tok_err(gguf, "tokenizer.ggml.merges is missing"))?;
                let merges: Vec<Json> = merges
                    .iter()
                    .map(|m| match m.split_once(' ') {
                        Some((a, b)) => Ok(json!([a, b])),
                        None => Err(tok_err(gguf, format!("merge {m:?} is not two tokens"))),
                    })
                    .collect::<Result<_>>()?;
                let model = json!({
                    "type": "BPE", "dropout": null, "unk_token": null,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                    "vocab": vocab, "merges": merges,
                });
                let add_bos = matches!(pre, "llama-bpe" | "llama3" | "llama-v3");
                (model, Json::Null, pre_json, byte_level(true), add_bos)
            }
            "llama" => {
                let scores = numbers(gguf, "tokenizer.ggml.scores")
                    .ok_or_else(|| tok_err(gguf, "tokenizer.ggml.scores is missing"))?;
                if scores.len() != tokens.len() {
                    return Err(tok_err(
                        gguf,
                        "tokenizer.ggml.scores and tokens differ in length",
                    ));
                }
                let merges: Vec<Json> = match strings(gguf, "tokenizer.ggml.merges")? {
                    Some(m) => m
                        .iter()
                        .filter_map(|m| m.split_once(' ').map(|(a, b)| json!([a, b])))
                        .collect(),
                    None => merges_from_scores(&tokens, &scores)
                        .into_iter()
                        .map(|(a, b)| json!([a, b]))
                        .collect(),
                };
                let model = json!({
                    "type": "BPE", "dropout": null, "unk_token": unk,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                    "vocab": vocab, "merges": merges,
                });
                let prefix = gguf
                    .get_bool("tokenizer.ggml.add_space_prefix")
                    .unwrap_or(true);
                // SentencePiece (and llama.cpp) put "▁" before every piece of text, also
                // after a special token: the normalizer form of Llama 2's tokenizer.json.
                let replace =
                    json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
                let normalizer = if prefix {
                    json!({"type": "Sequence", "normalizers": [
                        {"type": "Prepend", "prepend": "\u{2581}"}, replace]})
                } else {
                    replace
                };
                let mut dec = vec![
                    json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if prefix {
                    dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                (
                    model,
                    normalizer,
                    Json::Null,
                    json!({"type": "Sequence", "decoders": dec}),
                    true,
                )
            }
            other => {
                return Err(tok_err(
                    gguf,
                    format!(
                        "tokenizer.ggml.model {other:?} is not supported (supported: gpt2, llama)"
                    ),
                ))
            }
        };
        // Control and unknown tokens (<|im_start|>, <s>, <unk>) are matched whole in text and
        // are special; user-defined ones are matched whole but kept in decoded text.
        let added: Vec<Json> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &ty))| ty == CONTROL || ty == UNKNOWN || ty == USER_DEFINED)
            .map(|(id, (t, &ty))| {
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": ty != USER_DEFINED})
            })
            .collect();
        let add_bos = gguf
            .get_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(default_add_bos);
        let post = match (&bos, add_bos) {
            (Some(b), true) => {
                let id = gguf.get_u64("tokenizer.ggml.bos_token_id").unwrap_or(0);
                json!({"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                             {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {b.as_str(): {"id": b, "ids": [id], "tokens": [b]}}})
            }
            _ => Json::Null,
        };
        let full = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added, "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
            "post_processor": post, "decoder": decoder, "model": model_json,
        });
        let text = full.to_string();
        let tokenizer: Tokenizer = text
            .parse()
            .map_err(|e| tok_err(gguf, format!("building the tokenizer: {e}")))?;
        Ok(Self {
            tokenizer,
            chat_template: gguf.get_str("tokenizer.chat_template").map(str::to_string),
            bos_token: bos,
            eos_token: eos,
            json: text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spm_merges_follow_scores() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0];
        let m = merges_from_scores(&tokens, &scores);
        let want: Vec<(String, String)> = [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(m, want);
    }

    #[test]
    fn every_supported_pre_tokenizer_parses() {
        for pre in ["gpt-2", "smollm", "llama-bpe", "qwen2"] {
            let (j, _) = bpe_pre_tokenizer(pre).unwrap();
            let _: tokenizers::PreTokenizerWrapper = serde_json::from_value(j).unwrap();
        }
        assert!(bpe_pre_tokenizer("falcon").is_none());
    }
}
