//! Q/K/V and gate/up fused into one matmul each (fused.rs) must not change the model:
//! on every fixture family (biases, q/k norms, grouped KV heads) and storage (safetensors
//! f32, GGUF f32, GGUF quantized with one type per group or a mix), the fused model's
//! logits equal the unfused model's within f32 rounding.

mod common;

use std::path::PathBuf;

use common::fixtures;
use hearth_runtime::model::{ForwardBatch, Transformer};
use hearth_runtime::ModelSpec;

fn spec(model: PathBuf) -> ModelSpec {
    let mut s = ModelSpec::new(model.to_string_lossy().into_owned());
    s.device = std::env::var("HEARTH_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    s.dtype = "f32".into();
    s
}

fn prompts(name: &str) -> Vec<Vec<u32>> {
    let path = fixtures().join(name).join("golden.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

/// The last-token logits of every prompt, the prompts run as one batch (every row goes
/// through each projection, so a wrong split shows up in all of them).
fn logits(model: &Transformer, prompts: &[Vec<u32>]) -> Vec<f32> {
    let total: usize = prompts.iter().map(Vec::len).sum();
    let cache = hearth_runtime::kv_cache::KvCacheTensors::new(
        model.config(),
        total,
        1,
        model.dtype(),
        model.device(),
    )
    .unwrap();
    let mut batch = ForwardBatch::new(1);
    let mut next = 0u32;
    for p in prompts {
        let table: Vec<u32> = (next..next + p.len() as u32).collect();
        next += p.len() as u32;
        batch.push(p, 0, &table, true);
    }
    model
        .forward(&batch, &cache)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Returns how many groups the fused model fused.
fn check(name: &str, model: PathBuf, min_fused: usize) -> usize {
    let prompts = prompts(name);
    let s = spec(model);
    let (_, fused) = hearth_runtime::loader::load_model_fused(&s, true).unwrap();
    let (_, separate) = hearth_runtime::loader::load_model_fused(&s, false).unwrap();
    assert_eq!(separate.fused_projections(), 0, "{name}");
    assert!(
        fused.fused_projections() >= min_fused,
        "{name}: {} groups fused, expected at least {min_fused}",
        fused.fused_projections()
    );
    let (a, b) = (logits(&fused, &prompts), logits(&separate, &prompts));
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    // Same products in another grouping: f32 rounding of the sums, not a shifted column.
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "{name}: fused logits differ by {diff} (largest logit {scale})"
    );
    eprintln!(
        "{name}: {} groups fused, max difference {diff}",
        fused.fused_projections()
    );
    fused.fused_projections()
}

fn layers(name: &str) -> usize {
    let path = fixtures().join(name).join("config.json");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    cfg["num_hidden_layers"].as_u64().unwrap() as usize
}

#[test]
fn fused_safetensors_models_equal_unfused() {
    for name in ["llama", "mistral", "qwen2", "qwen3"] {
        check(name, fixtures().join(name), 2 * layers(name));
    }
}

#[test]
fn fused_gguf_models_equal_unfused() {
    for name in ["llama", "mistral", "qwen2", "qwen3"] {
        let gguf = fixtures().join("gguf");
        check(name, gguf.join(format!("{name}.gguf")), 2 * layers(name));
        // Quantized: groups whose parts share a type fuse; llama-q.gguf gives each of
        // Q/K/V and gate/up a different type (models/fixtures/gguf/README.md), so none
        // of its groups may fuse and the separate path is what runs.
        let quantized = check(name, gguf.join(format!("{name}-q.gguf")), 0);
        if name == "llama" {
            assert_eq!(quantized, 0, "llama-q: a group of mixed types fused");
        } else {
            assert!(quantized > 0, "{name}-q: nothing fused");
        }
    }
}
