//! The launch counter (launch_count.rs) against the launch plans: a step of an N-layer
//! model, run through the emulated kernels as the CUDA path launches them, counts what
//! `launch_count::per_step` computes from the plan, for decode-only, prefill-only and
//! mixed batches. At most gemv::MAX_ROWS rows, per layer: the Q/K/V GEMV (the add +
//! norm fused in after the first layer), the fused RoPE + cache write, the attention
//! call's plan, the o_proj GEMV, the gate/up GEMV (add + norm fused in), the down_proj
//! GEMV (SiLU·mul fused in); then the LM head's GEMV (final add + norm fused in) and the
//! sampling kernel: the whole decode layer runs on emulated kernels, real shapes through.
//! Above: RoPE + cache, attention, the fused add + norm, SiLU·mul and add + norm (the
//! matmuls are candle's, stood in for by random rows).
#![cfg(hearth_cuda_emulator)]

use candle_core::{DType, Device, Tensor};
use hearth_runtime::config::{Architecture, ModelConfig, RopeScaling};
use hearth_runtime::cuda_emulator::Emulator;
use hearth_runtime::device_sampler::RowSampling;
use hearth_runtime::gemv::{gemv_emulated, GemvInput, GemvOutput, GemvWeights, MAX_ROWS};
use hearth_runtime::launch_count;
use hearth_runtime::layer_kernels::{
    add_rms_norm_emulated, launches_after_layers, launches_per_layer, silu_mul_emulated,
};
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

/// One emulated GEMV launch of `w` (no bias) split in `parts`.
fn project(emu: &Emulator, w: &Tensor, parts: &[usize], input: GemvInput<'_>) -> GemvOutput {
    let weights = GemvWeights {
        weight: w,
        bias: None,
        parts,
    };
    gemv_emulated(&weights, &input, emu).expect("gemv")
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
    // At most gemv::MAX_ROWS rows the model runs its projections as hearth's GEMV, the
    // add + norms and SiLU·mul fused in; above, candle's matmuls (stood in for by
    // random rows of their widths) and the fused element-wise kernels.
    let gemv = t <= MAX_ROWS;
    let qkv_w = random(rng, &[HIDDEN + 2 * KV_HEADS * HEAD_DIM, HIDDEN]);
    let qkv_parts = [HIDDEN, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM];
    let o_w = random(rng, &[HIDDEN, HEADS * HEAD_DIM]);
    let gate_up_w = random(rng, &[2 * INTER, HIDDEN]);
    let down_w = random(rng, &[HIDDEN, INTER]);
    let head_w = random(rng, &[VOCAB, HIDDEN]);
    let nw = random(rng, &[HIDDEN]);
    let mut x = random(rng, &[t, HIDDEN]);
    let mut delta: Option<Tensor> = None;
    launch_count::take();
    for _ in 0..LAYERS {
        let (q, k, v) = if gemv {
            let out = match &delta {
                None => project(&emu, &qkv_w, &qkv_parts, GemvInput::Plain(&x)),
                Some(d) => project(
                    &emu,
                    &qkv_w,
                    &qkv_parts,
                    GemvInput::AddNorm {
                        residual: &x,
                        delta: d,
                        norm_weight: &nw,
                        eps: 1e-6,
                    },
                ),
            };
            if let Some(r) = out.residual {
                x = r;
            }
            let [q, k, v]: [Tensor; 3] = out.parts.try_into().expect("three parts");
            (
                q.reshape((t, HEADS, HEAD_DIM)).expect("q"),
                k.reshape((t, KV_HEADS, HEAD_DIM)).expect("k"),
                v.reshape((t, KV_HEADS, HEAD_DIM)).expect("v"),
            )
        } else {
            (
                random(rng, &[t, HEADS, HEAD_DIM]),
                random(rng, &[t, KV_HEADS, HEAD_DIM]),
                random(rng, &[t, KV_HEADS, HEAD_DIM]),
            )
        };
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
        if gemv {
            let [a]: [Tensor; 1] = project(&emu, &o_w, &[HIDDEN], GemvInput::Plain(&o))
                .parts
                .try_into()
                .expect("one part");
            let out = project(
                &emu,
                &gate_up_w,
                &[INTER, INTER],
                GemvInput::AddNorm {
                    residual: &x,
                    delta: &a,
                    norm_weight: &nw,
                    eps: 1e-6,
                },
            );
            x = out.residual.expect("residual");
            let [gate, up]: [Tensor; 2] = out.parts.try_into().expect("two parts");
            let [m]: [Tensor; 1] = project(
                &emu,
                &down_w,
                &[HIDDEN],
                GemvInput::Silu {
                    gate: &gate,
                    up: &up,
                },
            )
            .parts
            .try_into()
            .expect("one part");
            delta = Some(m);
        } else {
            let (x1, _) = add_rms_norm_emulated(&x, &o, &nw, 1e-6, &emu).expect("norm");
            let act = silu_mul_emulated(&random(rng, &[t, 2 * INTER]), INTER, &emu).expect("silu");
            (x, _) = add_rms_norm_emulated(&x1, &random(rng, &[t, HIDDEN]), &nw, 1e-6, &emu)
                .expect("norm");
            assert_eq!(act.dims(), [t, INTER]);
        }
    }
    if let (true, Some(d)) = (gemv, &delta) {
        let logits = project(
            &emu,
            &head_w,
            &[VOCAB],
            GemvInput::AddNorm {
                residual: &x,
                delta: d,
                norm_weight: &nw,
                eps: 1e-6,
            },
        );
        assert_eq!(logits.parts[0].dims(), [t, VOCAB]);
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
            launches_per_layer(true, gemv),
            launches_after_layers(gemv),
            rows.iter().any(|r| r.params.temperature > 0.0),
        ),
    )
}

#[test]
fn a_step_launches_what_its_plan_says() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut seen = Vec::new();
    for seqs in [
        // Decodes only (2 rows: the GEMV path): split-key and combine.
        vec![(1, 40), (1, 300)],
        // A prefill chunk only (12 rows: candle's matmuls): the per-token kernel.
        vec![(12, 12)],
        // Both, 11 rows.
        vec![(1, 40), (9, 70), (1, 513)],
        // Both, 5 rows: the GEMV path with all three attention kernels.
        vec![(1, 40), (4, 20)],
    ] {
        let (counted, planned) = step(&seqs, &mut rng);
        assert_eq!(counted, planned, "batch {seqs:?}");
        seen.push(counted);
    }
    // The batches differ in launches per layer (attention kernels 2, 1, 3, 3; GEMVs or
    // element-wise ops): the count follows the plan rather than a constant.
    assert_eq!(seen.len(), 4);
    for i in 0..seen.len() {
        for j in i + 1..seen.len() {
            assert_ne!(seen[i], seen[j], "{seen:?}");
        }
    }
}

/// Llama-3.1-8B (32 layers, 32 heads, 8 KV heads, head_dim 128) decoding one sequence
/// at 2k context with a sampled (temperature > 0) token: hearth's launches per step.
#[test]
fn a_batch_1_llama_8b_decode_step_launches_194_kernels() {
    let mut meta = AttentionMetadata::new(16);
    let blocks: Vec<u32> = (0..128).collect();
    meta.push(1, 2048, &blocks);
    let attention = cuda_launches(&meta, 32, 8, 128, 128, DType::BF16).expect("plan");
    // One row: within the GEMV's MAX_ROWS.
    let gemv = true;
    let per_step = launch_count::per_step(
        32,
        attention,
        launches_per_layer(true, gemv),
        launches_after_layers(gemv),
        true,
    );
    // Per layer: RoPE + cache, split-key attention (its combine folded in), and the
    // four GEMVs (qkv with the add + norm, o_proj, gate/up with the add + norm, down
    // with SiLU·mul); then the LM head's GEMV with the final norm, and sampling. Before
    // the GEMV: 32 × 7 + 1 = 225 of hearth's and 100 of candle's (4 cuBLAS calls per
    // layer and the LM head).
    assert_eq!((attention, per_step), (1, 194));
}
