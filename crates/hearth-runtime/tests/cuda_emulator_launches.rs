//! The launch counter (launch_count.rs) against the launch plans: a step of an N-layer
//! model, run through the emulated kernels as the CUDA path launches them (per layer the
//! fused RoPE + cache write, the attention call's plan, the fused add + norm, SiLU·mul
//! and add + norm; then the sampling kernel),
//! counts what `launch_count::per_step` computes from the plan, for decode-only,
//! prefill-only and mixed batches.
#![cfg(hearth_cuda_emulator)]

use candle_core::{DType, Device, Tensor};
use hearth_runtime::config::{Architecture, ModelConfig, RopeScaling};
use hearth_runtime::cuda_emulator::Emulator;
use hearth_runtime::device_sampler::RowSampling;
use hearth_runtime::launch_count;
use hearth_runtime::layer_kernels::{add_rms_norm_emulated, launches_per_layer, silu_mul_emulated};
use hearth_runtime::paged_attention::{
    cuda_launches, paged_attention_emulated, rope_cache_emulated, AttentionMetadata,
    RopeCacheInputs,
};
use hearth_runtime::rope::RotaryTables;
use hearth_runtime::sample_kernel::sample_emulated;
use hearth_runtime::sampler::SamplingParams;
use rand::{rngs::StdRng, Rng, SeedableRng};

const LAYERS: usize = 3;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const BLOCK_SIZE: usize = 16;
const NUM_BLOCKS: usize = 64;
const VOCAB: usize = 50;
const HIDDEN: usize = HEADS * HEAD_DIM;
const INTER: usize = 72;

fn config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: VOCAB,
        hidden_size: HIDDEN,
        intermediate_size: INTER,
        num_hidden_layers: LAYERS,
        num_attention_heads: HEADS,
        num_key_value_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: NUM_BLOCKS * BLOCK_SIZE,
        tie_word_embeddings: false,
        attention_bias: false,
        qk_norm: false,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn random(rng: &mut StdRng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

/// One step over sequences of (new tokens, keys after the step): the emulated
/// launches it makes, and what the plan says they are.
fn step(seqs: &[(usize, usize)], rng: &mut StdRng) -> (u64, u64) {
    let mut meta = AttentionMetadata::new(BLOCK_SIZE);
    let mut positions = Vec::new();
    let mut next_block = 0u32;
    for &(q, len) in seqs {
        let blocks: Vec<u32> = (0..len.div_ceil(BLOCK_SIZE) as u32)
            .map(|b| next_block + b)
            .collect();
        next_block += blocks.len() as u32;
        meta.push(q, len, &blocks);
        positions.extend((len - q) as u32..len as u32);
    }
    let t = meta.num_tokens();
    let tables = RotaryTables::new(&config(), NUM_BLOCKS * BLOCK_SIZE, DType::F32, &Device::Cpu)
        .expect("tables");
    let cache = [NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM];
    let (mut k_cache, mut v_cache) = (random(rng, &cache), random(rng, &cache));
    let emu = Emulator::default();
    launch_count::take();
    for _ in 0..LAYERS {
        let q = random(rng, &[t, HEADS, HEAD_DIM]);
        let k = random(rng, &[t, KV_HEADS, HEAD_DIM]);
        let v = random(rng, &[t, KV_HEADS, HEAD_DIM]);
        let inputs = RopeCacheInputs {
            q: &q,
            k: &k,
            v: &v,
            cos: &tables.cos,
            sin: &tables.sin,
            norms: None,
            positions: &positions,
            slots: &meta.slots,
        };
        let (q, kc, vc) = rope_cache_emulated(&inputs, &k_cache, &v_cache, &emu).expect("rope");
        (k_cache, v_cache) = (kc, vc);
        let o = paged_attention_emulated(&q, &k_cache, &v_cache, &meta, 0.25, &emu)
            .expect("attention")
            .reshape((t, HEADS * HEAD_DIM))
            .expect("o");
        // The layer's element-wise ops (o_proj, gate/up and down are candle's matmuls:
        // stood in for by random rows of their widths).
        let residual = random(rng, &[t, HIDDEN]);
        let w = random(rng, &[HIDDEN]);
        let (x1, _) = add_rms_norm_emulated(&residual, &o, &w, 1e-6, &emu).expect("norm");
        let act = silu_mul_emulated(&random(rng, &[t, 2 * INTER]), INTER, &emu).expect("silu");
        add_rms_norm_emulated(&x1, &random(rng, &[t, HIDDEN]), &w, 1e-6, &emu).expect("norm");
        assert_eq!(act.dims(), [t, INTER]);
    }
    let params = SamplingParams {
        temperature: 0.7,
        ..SamplingParams::default()
    };
    let rows: Vec<RowSampling> = (0..seqs.len())
        .map(|i| RowSampling {
            params: &params,
            seed: i as u64,
            position: 0,
            seen: None,
            output_counts: None,
            banned: &[],
            allowed: None,
            table: None,
        })
        .collect();
    let logits: Vec<f32> = (0..seqs.len() * VOCAB).map(|i| (i % 7) as f32).collect();
    sample_emulated(&logits, VOCAB, &rows, &emu).expect("sample");
    let counted = launch_count::take();
    let per_layer =
        cuda_launches(&meta, HEADS, KV_HEADS, HEAD_DIM, NUM_BLOCKS, DType::F32).expect("plan");
    (
        counted,
        launch_count::per_step(
            LAYERS,
            per_layer,
            launches_per_layer(true),
            rows.iter().any(|r| r.params.temperature > 0.0),
        ),
    )
}

#[test]
fn a_step_launches_what_its_plan_says() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut seen = Vec::new();
    for seqs in [
        // Decodes only: split-key and combine.
        vec![(1, 40), (1, 300)],
        // A prefill chunk only: the per-token kernel.
        vec![(12, 12)],
        // Both.
        vec![(1, 40), (9, 70), (1, 513)],
    ] {
        let (counted, planned) = step(&seqs, &mut rng);
        assert_eq!(counted, planned, "batch {seqs:?}");
        seen.push(counted);
    }
    // The three batches differ in launches per layer (2, 1, 3 attention kernels):
    // the count follows the plan rather than a constant.
    assert_eq!(seen.len(), 3);
    assert!(
        seen[0] != seen[1] && seen[1] != seen[2] && seen[0] != seen[2],
        "{seen:?}"
    );
}
