//! The paged-attention op against a naive reference (f64, dense, causal by position)
//! on random ragged batches: GQA ratios 1, 3, 4, 8 (and 16); head_dim 64 and 128 (and
//! every head dim the CUDA kernel takes, 16 to 256, in a smaller test); block sizes
//! 16 and 32; decodes and prefill chunks in one call; contexts crossing block
//! boundaries up to 4,096+ keys; blocks scattered through the cache; f32, f16, bf16.
//! With HEARTH_TEST_DEVICE=cuda (scripts/gpu-tests.sh) every case also runs on the GPU
//! against the same reference.

use candle_core::{DType, Device, Tensor};
use hearth_runtime::paged_attention::{paged_attention, AttentionMetadata};
use rand::Rng;

mod attention_cases;
use attention_cases::{build, max_diff, random_seqs, reference, seeded, Built, Case};

/// The devices to check: the CPU always, the GPU too when the tests run there.
fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    if let Ok(spec) = std::env::var("HEARTH_TEST_DEVICE") {
        if spec.starts_with("cuda") {
            d.push(hearth_runtime::device::select_device(&spec).expect("the test device"));
        }
    }
    d
}

fn run_op(c: &Case, b: &Built, dtype: DType, dev: &Device) -> Vec<f32> {
    let t = b.meta.num_tokens();
    let shape = (b.num_blocks, c.block_size, c.kv_heads, c.head_dim);
    let q = Tensor::from_slice(&b.q, (t, c.heads, c.head_dim), dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let k = Tensor::from_slice(&b.k_cache, shape, dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let v = Tensor::from_slice(&b.v_cache, shape, dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let o = paged_attention(&q, &k, &v, &b.meta, scale).unwrap();
    assert_eq!(o.dims(), &[t, c.heads, c.head_dim]);
    assert_eq!(o.dtype(), dtype);
    o.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn check(c: &Case, seed: u64, dtypes: &[(DType, f32)]) {
    let mut rng = seeded(seed);
    let b = build(c, &mut rng);
    let want = reference(c, &b);
    for dev in devices() {
        for &(dtype, tol) in dtypes {
            let got = run_op(c, &b, dtype, &dev);
            let diff = max_diff(&got, &want);
            assert!(
            diff < tol,
            "{dev:?} {dtype:?} heads {}/{} d {} bs {} seqs {:?}: max diff {diff} (tolerance {tol})",
            c.heads,
            c.kv_heads,
            c.head_dim,
            c.block_size,
            c.seqs
        );
        }
    }
}

const F32_ONLY: &[(DType, f32)] = &[(DType::F32, 1e-4)];
/// Values are in [-1, 1]; bf16 keeps 8 bits of mantissa (~4e-3 relative) on q, k and v.
const ALL: &[(DType, f32)] = &[(DType::F32, 1e-4), (DType::F16, 1e-2), (DType::BF16, 5e-2)];

#[test]
fn ragged_batches_of_decodes_and_prefill_chunks_match_the_reference() {
    let mut rng = seeded(42);
    let mut n = 0;
    for &(heads, kv_heads) in &[(4, 4), (9, 3), (8, 2), (16, 2)] {
        for &head_dim in &[64, 128] {
            for &block_size in &[16, 32] {
                // Decodes (1 query) and chunks (many), contexts on and off block edges.
                let seqs = random_seqs(&mut rng, block_size, 200);
                let case = Case {
                    heads,
                    kv_heads,
                    head_dim,
                    block_size,
                    seqs,
                };
                let dtypes = if n % 2 == 0 { ALL } else { F32_ONLY };
                check(&case, 1000 + n, dtypes);
                n += 1;
            }
        }
    }
}

#[test]
fn every_head_dim_of_the_supported_families_with_gqa_up_to_16() {
    let mut rng = seeded(77);
    for (i, &head_dim) in hearth_runtime::paged_attention::HEAD_DIMS
        .iter()
        .enumerate()
    {
        let (heads, kv_heads) = [(16, 1), (8, 2), (12, 4)][i % 3];
        let block_size = [16, 32][i % 2];
        let case = Case {
            heads,
            kv_heads,
            head_dim,
            block_size,
            seqs: random_seqs(&mut rng, block_size, 100),
        };
        check(&case, 3000 + i as u64, ALL);
    }
}

#[test]
fn long_contexts_cross_many_blocks() {
    // 4,100 keys: a decode and a 40-token chunk at the end of a long context, next to
    // a short sequence, so work items of very different cost share the call.
    let case = Case {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        block_size: 16,
        seqs: vec![(1, 4100), (40, 4097), (3, 5)],
    };
    check(&case, 7, ALL);
    let case = Case {
        heads: 8,
        kv_heads: 1,
        head_dim: 128,
        block_size: 32,
        seqs: vec![(1, 4096), (1, 33)],
    };
    check(&case, 8, F32_ONLY);
}

#[test]
fn a_whole_prompt_attends_causally() {
    // One sequence whose queries are all its keys: the first query sees one key, the
    // last all of them, across 20 query tiles.
    let case = Case {
        heads: 6,
        kv_heads: 2,
        head_dim: 64,
        block_size: 16,
        seqs: vec![(300, 300)],
    };
    check(&case, 9, ALL);
}

#[test]
fn metadata_that_does_not_fit_the_cache_is_an_error_not_a_crash() {
    let dev = Device::Cpu;
    let k = Tensor::zeros((4, 16, 1, 64), DType::F32, &dev).unwrap();
    let q = Tensor::zeros((1, 1, 64), DType::F32, &dev).unwrap();
    let mut meta = AttentionMetadata::new(16);
    meta.push(1, 20, &[1, 9]); // block 9 is past the cache's 4
    let err = paged_attention(&q, &k, &k, &meta, 1.0).unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    let mut meta = AttentionMetadata::new(16);
    meta.push(2, 20, &[1, 2]); // two queries for a one-token batch
    assert!(paged_attention(&q, &k, &k, &meta, 1.0).is_err());
}

/// f32 queries over an f16 or bf16 cache (`--kv-cache-dtype` on the CPU): exactly the
/// f32 op on the rounded keys and values (only storage is narrower: the op converts them
/// back and computes in f32), and within the storage rounding of the exact reference.
#[test]
fn f32_queries_over_a_half_precision_cache() {
    let mut rng = seeded(91);
    for (i, &(heads, kv_heads, head_dim)) in [(9, 3, 64), (8, 2, 128)].iter().enumerate() {
        let block_size = 16;
        let c = Case {
            heads,
            kv_heads,
            head_dim,
            block_size,
            seqs: random_seqs(&mut rng, block_size, 150),
        };
        let b = build(&c, &mut seeded(5000 + i as u64));
        let want = reference(&c, &b);
        let t = b.meta.num_tokens();
        let shape = (b.num_blocks, c.block_size, c.kv_heads, c.head_dim);
        let dev = Device::Cpu;
        let q = Tensor::from_slice(&b.q, (t, c.heads, c.head_dim), &dev).unwrap();
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        // Storage rounding: 2^-11 (f16) and 2^-8 (bf16) relative on values in [-1, 1].
        for (dtype, tol) in [(DType::F16, 2e-3), (DType::BF16, 2e-2)] {
            let cache = |x: &[f32]| {
                Tensor::from_slice(x, shape, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (k, v) = (cache(&b.k_cache), cache(&b.v_cache));
            let o = paged_attention(&q, &k, &v, &b.meta, scale).unwrap();
            assert_eq!(o.dtype(), DType::F32);
            let got: Vec<f32> = o.flatten_all().unwrap().to_vec1().unwrap();
            let (k32, v32) = (
                k.to_dtype(DType::F32).unwrap(),
                v.to_dtype(DType::F32).unwrap(),
            );
            let rounded = paged_attention(&q, &k32, &v32, &b.meta, scale)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let same = max_diff(&got, &rounded);
            assert!(
                same < 1e-6,
                "{dtype:?}: {same} from the f32 op on rounded caches"
            );
            let diff = max_diff(&got, &want);
            assert!(diff < tol, "{dtype:?}: max diff {diff} (tolerance {tol})");
        }
    }
}

/// Prefill chunks on the CPU's packed kernel (items of ≥ 8 query rows, keys in tiles of
/// 64 gathered across blocks): random ragged batches whose chunks and contexts fall on,
/// just past and between key tiles and blocks, under GQA 1 to 8, with f32 queries over
/// f32, f16 and bf16 caches (f16 is the CPU default). Each half-precision case is also
/// checked against the f32 op on the rounded cache, so storage rounding is the only
/// difference.
#[test]
fn prefill_tiles_on_random_shapes_and_cache_dtypes() {
    let mut rng = seeded(2024);
    let dev = Device::Cpu;
    let pick = |rng: &mut rand::rngs::StdRng, xs: &[usize]| xs[rng.random_range(0..xs.len())];
    for n in 0..12u64 {
        let (heads, kv_heads) = [(9, 3), (8, 1), (4, 4), (16, 2), (6, 2), (12, 4)][n as usize % 6];
        let head_dim = pick(&mut rng, &[16, 40, 64, 128]);
        let block_size = pick(&mut rng, &[16, 32, 64]);
        let mut seqs = Vec::new();
        for _ in 0..rng.random_range(1..4) {
            let l = match rng.random_range(0..4) {
                0 => 64 * rng.random_range(1..5),
                1 => 64 * rng.random_range(1..5) + 1,
                2 => block_size * rng.random_range(1..8) - 1,
                _ => rng.random_range(2..300),
            };
            let q = match rng.random_range(0..3) {
                0 => l,
                1 => rng.random_range(1..=l.min(70)),
                _ => rng.random_range(1..=l),
            };
            seqs.push((q, l));
        }
        // A decode beside the chunks: one item on the streaming kernel in the same call.
        seqs.push((1, rng.random_range(1..200)));
        let c = Case {
            heads,
            kv_heads,
            head_dim,
            block_size,
            seqs,
        };
        let b = build(&c, &mut seeded(8000 + n));
        let want = reference(&c, &b);
        let t = b.meta.num_tokens();
        let shape = (b.num_blocks, c.block_size, c.kv_heads, c.head_dim);
        let q = Tensor::from_slice(&b.q, (t, c.heads, c.head_dim), &dev).unwrap();
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let run = |k: &Tensor, v: &Tensor| -> Vec<f32> {
            let o = paged_attention(&q, k, v, &b.meta, scale).unwrap();
            assert_eq!(o.dtype(), DType::F32);
            o.flatten_all().unwrap().to_vec1().unwrap()
        };
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::F16, 2e-3), (DType::BF16, 2e-2)] {
            let cache = |x: &[f32]| {
                Tensor::from_slice(x, shape, &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            };
            let (k, v) = (cache(&b.k_cache), cache(&b.v_cache));
            let got = run(&k, &v);
            let diff = max_diff(&got, &want);
            assert!(
                diff < tol,
                "{dtype:?} heads {heads}/{kv_heads} d {head_dim} bs {block_size} seqs {:?}: max diff {diff} (tolerance {tol})",
                c.seqs
            );
            if dtype != DType::F32 {
                let rounded = run(
                    &k.to_dtype(DType::F32).unwrap(),
                    &v.to_dtype(DType::F32).unwrap(),
                );
                let same = max_diff(&got, &rounded);
                assert!(
                    same < 1e-6,
                    "{dtype:?}: {same} from the f32 op on rounded caches"
                );
            }
        }
    }
}
