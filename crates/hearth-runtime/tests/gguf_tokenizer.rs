//! The tokenizer hearth builds from a GGUF file's own vocabulary must tokenize like the
//! same vocabulary's `tokenizers` JSON (transformers' GGUF conversion; llama.cpp agreed on
//! every string when the goldens were made: scripts/gguf_tokenizer_goldens.py), on a few
//! hundred strings: unicode, digits, whitespace runs, special tokens, chat markup.

mod common;

use std::path::Path;

use hearth_runtime::ModelSpec;

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check(gguf: &Path, golden_name: &str) {
    let path = common::fixtures().join("gguf/tokenizer").join(golden_name);
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let files = hearth_runtime::loader::resolve(&ModelSpec::new(gguf.to_string_lossy())).unwrap();
    let tok = files.load_tokenizer().unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert!(
        cases.len() >= 300,
        "{golden_name}: only {} strings",
        cases.len()
    );
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        let got = tok.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
            continue;
        }
        let want_special = case.get("ids_with_special").map_or(want.clone(), ids);
        let got_special = tok.encode(text, true).unwrap();
        if got_special != want_special {
            failures.push(format!(
                "{text:?} with special tokens: got {got_special:?}, want {want_special:?}"
            ));
        }
        let want_text = case.get("decoded").and_then(|d| d.as_str()).unwrap_or(text);
        let decoded = tok.decode(&want).unwrap();
        if decoded != want_text {
            failures.push(format!(
                "decode of {text:?}: got {decoded:?}, want {want_text:?}"
            ));
        }
        // Log-prob listings show each token's own bytes: together they are the text
        // (after SentencePiece's leading space), split multi-byte characters included.
        let pieces: Vec<u8> = want
            .iter()
            .flat_map(|&id| tok.token_piece(id).bytes)
            .collect();
        let spm_text = format!(" {want_text}");
        if case.get("decoded").is_none()
            && pieces != want_text.as_bytes()
            && pieces != spm_text.as_bytes()
        {
            failures.push(format!(
                "token pieces of {text:?}: got {:?}",
                String::from_utf8_lossy(&pieces)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{golden_name}: {} of {} strings differ:\n{}",
        failures.len(),
        cases.len(),
        failures[..failures.len().min(10)].join("\n")
    );
}

#[test]
fn smollm2_gguf_tokenizer_matches_its_tokenizers_json() {
    check(&common::smollm2(), "smollm2-135m-instruct.json");
}

#[test]
fn byte_level_llama_bpe_vocabulary_matches() {
    check(&common::fixtures().join("gguf/llama.gguf"), "llama.json");
}

#[test]
fn sentencepiece_vocabulary_without_merges_matches() {
    check(
        &common::fixtures().join("gguf/mistral.gguf"),
        "mistral.json",
    );
}

#[test]
fn qwen2_pre_tokenizer_matches() {
    check(&common::fixtures().join("gguf/qwen2.gguf"), "qwen2.json");
}

#[test]
fn unsupported_tokenizers_are_named() {
    // A GGUF whose pre-tokenizer hearth does not know fails with the key and the value.
    let dir = std::env::temp_dir().join(format!("hearth-gguf-pre-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = std::fs::read(common::fixtures().join("gguf/qwen2.gguf")).unwrap();
    // Same length as "qwen2", so offsets stay valid.
    let needle = b"tokenizer.ggml.pre";
    let at = src.windows(needle.len()).position(|w| w == needle).unwrap();
    let value_at = src[at..].windows(5).position(|w| w == b"qwen2").unwrap() + at;
    let mut bad = src.clone();
    bad[value_at..value_at + 5].copy_from_slice(b"xyzzy");
    let path = dir.join("bad.gguf");
    std::fs::write(&path, bad).unwrap();
    let files = hearth_runtime::loader::resolve(&ModelSpec::new(path.to_string_lossy())).unwrap();
    let err = files.load_tokenizer().err().unwrap().to_string();
    assert!(
        err.contains("tokenizer.ggml.pre") && err.contains("xyzzy"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
