//! The real SmolLM2-135M-Instruct Q4_1 GGUF (scripts/fetch-smollm2.sh downloads it once):
//! quantized weights must predict what their dequantized f32 copy predicts. Its greedy
//! output and chat template against llama.cpp's on the same file: llama_cpp_goldens.rs.

mod common;

use hearth_runtime::kv_cache::KvCacheTensors;
use hearth_runtime::model::ForwardBatch;
use hearth_runtime::{EngineConfig, EngineHandle, ModelSpec};

const ENGLISH: &str = "The old lighthouse stood at the end of a narrow road that wound along the \
cliffs. For more than a hundred years it had warned ships away from the rocks below, and the \
people of the village still climbed its stairs on summer evenings to watch the sun go down. \
Inside, the walls were painted white, and a small museum told the story of the keepers who had \
lived there with their families. One of them, a woman named Margaret, kept the light burning \
through a storm that lasted three days, when the supply boat could not reach the shore. Her \
diary, which is displayed in a glass case near the entrance, describes how she rationed oil and \
slept in short naps beside the lamp. Today the light is automatic, and the building belongs to a \
local charity that repairs the roof, replaces broken windows, and organizes guided tours for \
schools. Visitors often say that the view from the top is worth the effort of the climb. On a \
clear day you can see the islands to the north, the fishing boats returning to the harbor, and \
the long line of hills that marks the edge of the county. In the autumn, birds gather on the \
rocks before they fly south, and volunteers count them for a national survey that has run for \
decades. The results help scientists understand how the changing climate affects the timing of \
migration, the size of the colonies, and the health of the fish they depend on.";

fn engine(dequantize: bool) -> EngineHandle {
    let mut spec = ModelSpec::new(common::smollm2().to_string_lossy());
    spec.device = "cpu".into();
    spec.dtype = "f32".into();
    spec.dequantize = dequantize;
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

/// The model's top-1 next token after every prefix of `tokens` (teacher forcing), in one
/// forward pass: each position is a one-token sequence whose context is the positions
/// before it, so all keys and values are written before any attention reads them.
fn next_tokens(dequantize: bool, tokens: &[u32]) -> Vec<u32> {
    let mut spec = ModelSpec::new(common::smollm2().to_string_lossy());
    spec.device = "cpu".into();
    spec.dtype = "f32".into();
    spec.dequantize = dequantize;
    let (_, model) = hearth_runtime::loader::load_model(&spec).unwrap();
    let t = tokens.len();
    let cache = KvCacheTensors::new(model.config(), t, 1, model.dtype(), model.device()).unwrap();
    // Block size 1: every sequence's block table is its slots 0..=i.
    let mut batch = ForwardBatch::new(1);
    let table: Vec<u32> = (0..t as u32).collect();
    for (i, tok) in tokens.iter().enumerate() {
        batch.push(&[*tok], i, &table[..=i], true);
    }
    let logits = model
        .forward(&batch, &cache)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    logits
        .iter()
        .map(|row| hearth_runtime::sampler::argmax(row))
        .collect()
}

#[test]
fn q4_1_agrees_with_its_dequantized_weights_on_english() {
    let tokens = engine(false).tokenizer().encode(ENGLISH, false).unwrap();
    assert!(tokens.len() >= 250, "only {} tokens", tokens.len());
    let q = next_tokens(false, &tokens);
    let f = next_tokens(true, &tokens);
    assert_eq!(q.len(), tokens.len());
    let agree = q.iter().zip(&f).filter(|(a, b)| a == b).count();
    let rate = agree as f64 / q.len() as f64;
    eprintln!(
        "top-1 agreement Q4_1 vs dequantized f32: {agree}/{} = {rate:.4}",
        q.len()
    );
    assert!(
        rate >= 0.95,
        "top-1 agreement {rate:.4} < 0.95 ({agree}/{})",
        q.len()
    );
    // The text is ordinary English the model mostly predicts; a broken model would not.
    let hits = tokens[1..].iter().zip(&q).filter(|(a, b)| a == b).count();
    assert!(
        hits * 3 > tokens.len(),
        "the model predicts only {hits} of {} tokens",
        tokens.len()
    );
}
