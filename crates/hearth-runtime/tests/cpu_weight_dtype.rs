//! Dense CPU weights are packed at load (packed_linear.rs) for every projection, the
//! output layer included (f32 where the AVX-512 kernel runs), and `cpu_weight_dtype = bf16` stores them as bf16: its logits
//! stay within bf16's rounding of the f32 model's, on every fixture family (a tied
//! output layer, biases, q/k norms, safetensors and GGUF f32). The f32 model's own
//! tokens and logits against transformers are goldens.rs's.

mod common;

use std::path::PathBuf;

use common::fixtures;
use hearth_kernels::dense::{Isa, WeightDtype};
use hearth_runtime::model::{ForwardBatch, Transformer};
use hearth_runtime::ModelSpec;

fn spec(model: PathBuf, weight_dtype: &str) -> ModelSpec {
    let mut s = ModelSpec::new(model.to_string_lossy().into_owned());
    s.device = "cpu".into();
    s.dtype = "f32".into();
    s.cpu_weight_dtype = weight_dtype.into();
    s
}

/// The last-token logits of two prompts run as one batch.
fn logits(model: &Transformer) -> Vec<f32> {
    let prompts: [&[u32]; 2] = [&[1, 17, 99, 3, 250, 7], &[5, 300, 42]];
    let cache = hearth_runtime::kv_cache::KvCacheTensors::new(
        model.config(),
        16,
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

fn layers(name: &str) -> usize {
    let path = fixtures().join(name).join("config.json");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    cfg["num_hidden_layers"].as_u64().unwrap() as usize
}

#[test]
fn every_projection_is_packed_and_bf16_stays_within_its_rounding() {
    let gguf = fixtures().join("gguf");
    for name in ["llama", "mistral", "qwen2", "qwen3"] {
        for model in [fixtures().join(name), gguf.join(format!("{name}.gguf"))] {
            let (_, f32_model) = hearth_runtime::loader::load_model(&spec(model.clone(), "f32"))
                .unwrap_or_else(|e| panic!("{}: {e}", model.display()));
            let (_, bf16_model) =
                hearth_runtime::loader::load_model(&spec(model.clone(), "bf16")).unwrap();
            // Fused Q/K/V, o, fused gate/up, down per layer, and the output layer; f32
            // is packed by default where the AVX-512 kernel runs (linear.rs).
            let want = 4 * layers(name) + 1;
            let avx512 = Isa::detected(WeightDtype::F32) == Isa::Avx512;
            let want_f32 = if avx512 { want } else { 0 };
            assert_eq!(
                f32_model.packed_projections(),
                want_f32,
                "{}",
                model.display()
            );
            assert_eq!(bf16_model.packed_projections(), want, "{}", model.display());
            let (a, b) = (logits(&f32_model), logits(&bf16_model));
            assert_eq!(a.len(), b.len());
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            eprintln!(
                "{}: bf16 weights move the logits by {diff} (largest {scale})",
                model.display()
            );
            // bf16 keeps 8 bits: a few parts in a thousand per product, a few percent
            // over the layers; a misread panel or pair is of the logits' own size.
            assert!(
                diff <= 0.05 * scale.max(1.0),
                "{}: bf16 logits differ by {diff}",
                model.display()
            );
            assert!(diff > 0.0, "{}: bf16 changed nothing", model.display());
        }
    }
}

#[test]
fn bad_cpu_weight_dtypes_are_refused_with_the_field() {
    let llama = fixtures().join("llama");
    let err = hearth_runtime::loader::load_model(&spec(llama.clone(), "f16"))
        .err()
        .expect("f16 is refused")
        .to_string();
    assert!(
        err.contains("cpu_weight_dtype") && err.contains("f16"),
        "{err}"
    );
    let mut half = spec(llama, "bf16");
    half.dtype = "bf16".into();
    let err = hearth_runtime::loader::load_model(&half)
        .err()
        .expect("bf16 weights under bf16 compute are refused")
        .to_string();
    assert!(
        err.contains("cpu_weight_dtype") && err.contains("f32 compute"),
        "{err}"
    );
}
