//! The fused RoPE + cache-write kernel (kernels/rope_cache.cu), compiled for the CPU
//! emulator and launched as the CUDA path launches it, against the CPU path's own
//! q/k norm, RoPE and cache write (cpu_ops) on random shapes: every head dim, GQA
//! ratios, the three RoPE tables (plain, linear scaling, Llama-3 frequency scaling),
//! with and without Qwen3's q/k norm, f32/f16/bf16, adversarial schedules. Slots the
//! step does not write must come back untouched, bit for bit.
#![cfg(hearth_cuda_emulator)]

use candle_core::{DType, Device, Tensor};
use hearth_runtime::config::{Architecture, ModelConfig, RopeScaling};
use hearth_runtime::cpu_ops::{self, Rope};
use hearth_runtime::cuda_emulator::{Emulator, Schedule, Source};
use hearth_runtime::paged_attention::{rope_cache_emulated, RopeCacheInputs, HEAD_DIMS};
use hearth_runtime::rope::RotaryTables;
use rand::{seq::SliceRandom, Rng, SeedableRng};

const MAX_POSITIONS: usize = 9000;
const EPS: f64 = 1e-6;

fn config(head_dim: usize, heads: usize, kv_heads: usize, scaling: RopeScaling) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 32,
        hidden_size: heads * head_dim,
        intermediate_size: 64,
        num_hidden_layers: 1,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: EPS,
        rope_theta: 500_000.0,
        rope_scaling: scaling,
        max_position_embeddings: MAX_POSITIONS,
        tie_word_embeddings: false,
        attention_bias: false,
        qk_norm: false,
        bos_token_id: None,
        eos_token_ids: vec![],
    }
}

fn scalings() -> [RopeScaling; 3] {
    [
        RopeScaling::None,
        RopeScaling::Linear { factor: 4.0 },
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        },
    ]
}

/// Values as f32 after a round trip through `dtype`, so both sides start from the same
/// numbers.
fn rounded(v: Vec<f32>, shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("tensor")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("values")
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            if x.is_nan() || y.is_nan() {
                f32::INFINITY
            } else {
                (x - y).abs()
            }
        })
        .fold(0.0, f32::max)
}

struct Case {
    head_dim: usize,
    heads: usize,
    kv_heads: usize,
    tokens: usize,
    norm: bool,
    scaling: RopeScaling,
    dtype: DType,
    schedule: Schedule,
}

fn run(c: &Case, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (t, h, kvh, d) = (c.tokens, c.heads, c.kv_heads, c.head_dim);
    let (num_blocks, block_size) = (t.div_ceil(16) + 3, 16);
    let mut rand_vec =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
    let dt = c.dtype;
    let q = rounded(rand_vec(t * h * d), &[t, h, d], dt);
    let k = rounded(rand_vec(t * kvh * d), &[t, kvh, d], dt);
    let v = rounded(rand_vec(t * kvh * d), &[t, kvh, d], dt);
    let cache_shape = [num_blocks, block_size, kvh, d];
    let k_cache = rounded(
        rand_vec(num_blocks * block_size * kvh * d),
        &cache_shape,
        dt,
    );
    let v_cache = rounded(
        rand_vec(num_blocks * block_size * kvh * d),
        &cache_shape,
        dt,
    );
    let qn = rounded(
        rand_vec(d).iter().map(|x| 1.0 + x / 2.0).collect(),
        &[d],
        dt,
    );
    let kn = rounded(
        rand_vec(d).iter().map(|x| 1.0 + x / 2.0).collect(),
        &[d],
        dt,
    );
    let mut slots: Vec<u32> = (0..(num_blocks * block_size) as u32).collect();
    slots.shuffle(&mut rng);
    slots.truncate(t);
    // Positions anywhere in the table, the far end included (where the scalings differ).
    let mut positions: Vec<u32> = (0..t)
        .map(|_| rng.random_range(0..MAX_POSITIONS as u32))
        .collect();
    positions[0] = MAX_POSITIONS as u32 - 1;

    let cfg = config(d, h, kvh, c.scaling.clone());
    let tables = RotaryTables::new(&cfg, MAX_POSITIONS, dt, &Device::Cpu).expect("tables");
    let emu = Emulator {
        source: Source::Original,
        schedule: c.schedule,
    };
    let inputs = RopeCacheInputs {
        q: &q,
        k: &k,
        v: &v,
        cos: &tables.cos,
        sin: &tables.sin,
        norms: c.norm.then_some((&qn, &kn, EPS)),
        positions: &positions,
        slots: &slots,
    };
    let (q_got, k_got, v_got) = rope_cache_emulated(&inputs, &k_cache, &v_cache, &emu)
        .unwrap_or_else(|e| panic!("{}: {e}", describe(c)));

    // The CPU path in f32 from the same (rounded) numbers.
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32).expect("f32");
    let rope = Rope {
        cos: &tables.cos_host,
        sin: &tables.sin_host,
        positions: &positions,
    };
    let (mut q_ref, mut k_ref) = (f32_of(&q), f32_of(&k));
    if c.norm {
        q_ref = cpu_ops::rms_norm(&q_ref, &f32_of(&qn), EPS).expect("q norm");
        k_ref = cpu_ops::rms_norm(&k_ref, &f32_of(&kn), EPS).expect("k norm");
    }
    let no_index = || -> candle_core::Result<Tensor> { unreachable!("CPU f32 path") };
    let (k_cache_ref, v_cache_ref) = (f32_of(&k_cache), f32_of(&v_cache));
    cpu_ops::write_cache(&k_cache_ref, &k_ref, &slots, Some(rope), no_index).expect("k write");
    cpu_ops::write_cache(&v_cache_ref, &f32_of(&v), &slots, None, no_index).expect("v write");
    let q_ref = cpu_ops::rope(&q_ref, rope).expect("q rope");

    let tol = match dt {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        _ => 6e-2,
    };
    let what = describe(c);
    let diff = max_diff(&values(&q_got), &values(&q_ref));
    assert!(diff < tol, "{what}: rotated q off by {diff}");
    let diff = max_diff(&values(&k_got), &values(&k_cache_ref));
    assert!(diff < tol, "{what}: key cache off by {diff}");
    // Values are copied, not computed: exact.
    let diff = max_diff(&values(&v_got), &values(&v_cache_ref));
    assert!(diff == 0.0, "{what}: value cache off by {diff}");
    // Slots the step does not own: untouched, bit for bit.
    let row = kvh * d;
    let (kg, k0) = (values(&k_got), values(&k_cache));
    for s in 0..num_blocks * block_size {
        if !slots.contains(&(s as u32)) {
            let same = kg[s * row..][..row]
                .iter()
                .zip(&k0[s * row..][..row])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{what}: slot {s} was not the step's and changed");
        }
    }
}

fn describe(c: &Case) -> String {
    format!(
        "{:?} {:?} d {} heads {}/{} tokens {} norm {} {:?}",
        c.dtype, c.schedule, c.head_dim, c.heads, c.kv_heads, c.tokens, c.norm, c.scaling
    )
}

#[test]
fn the_fused_rope_and_cache_write_matches_the_cpu_path() {
    let dtypes = [DType::F32, DType::F16, DType::BF16];
    let shapes = [(4, 4), (8, 2), (16, 1), (6, 3)];
    let mut n = 0;
    for &head_dim in HEAD_DIMS.iter() {
        for norm in [false, true] {
            let (heads, kv_heads) = shapes[n % shapes.len()];
            let c = Case {
                head_dim,
                heads,
                kv_heads,
                tokens: 1 + (n * 7) % 23,
                norm,
                scaling: scalings()[n % 3].clone(),
                dtype: dtypes[n % 3],
                schedule: Schedule::ADVERSARIAL[n % Schedule::ADVERSARIAL.len()],
            };
            run(&c, 700 + n as u64);
            n += 1;
        }
    }
}

#[test]
fn every_scaling_and_dtype_with_and_without_the_qk_norm() {
    // Llama-3.1's shape (head_dim 128, GQA 4) and Qwen3's (head_dim 128 with norm).
    for (i, scaling) in scalings().into_iter().enumerate() {
        for (j, dtype) in [DType::F32, DType::F16, DType::BF16]
            .into_iter()
            .enumerate()
        {
            run(
                &Case {
                    head_dim: 128,
                    heads: 8,
                    kv_heads: 2,
                    tokens: 5,
                    norm: (i + j) % 2 == 1,
                    scaling: scaling.clone(),
                    dtype,
                    schedule: Schedule::Shuffled(i as u64 * 3 + j as u64),
                },
                900 + (i * 3 + j) as u64,
            );
        }
    }
}

#[test]
fn a_position_past_the_tables_or_a_slot_past_the_cache_is_refused() {
    let dev = Device::Cpu;
    let zeros = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).expect("zeros");
    let (q, k) = (zeros(&[2, 2, 16]), zeros(&[2, 1, 16]));
    let (cos, cache) = (zeros(&[10, 8]), zeros(&[2, 4, 1, 16]));
    let call = |positions: &[u32], slots: &[u32]| {
        let inputs = RopeCacheInputs {
            q: &q,
            k: &k,
            v: &k,
            cos: &cos,
            sin: &cos,
            norms: None,
            positions,
            slots,
        };
        rope_cache_emulated(&inputs, &cache, &cache, &Emulator::default())
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    call(&[0, 9], &[0, 7]).expect("in range");
    let err = call(&[0, 10], &[0, 1]).unwrap_err();
    assert!(err.contains("position 10"), "{err}");
    let err = call(&[0, 1], &[0, 8]).unwrap_err();
    assert!(err.contains("slot 8"), "{err}");
    let err = call(&[0], &[0]).unwrap_err();
    assert!(err.contains("1 positions"), "{err}");
}
