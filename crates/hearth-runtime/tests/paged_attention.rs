//! The paged-attention op against a naive reference (f64, dense, causal by position)
//! on random ragged batches: GQA ratios 1, 3, 4, 8; head_dim 64 and 128; block sizes
//! 16 and 32; decodes and prefill chunks in one call; contexts crossing block
//! boundaries up to 4,096+ keys; blocks scattered through the cache; f32, f16, bf16.
//! With HEARTH_TEST_DEVICE=cuda (scripts/gpu-tests.sh) every case also runs on the GPU
//! against the same reference.

use candle_core::{DType, Device, Tensor};
use hearth_runtime::paged_attention::{paged_attention, AttentionMetadata};
use rand::{seq::SliceRandom, Rng, SeedableRng};

struct Case {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    /// (query_len, seq_len) per sequence.
    seqs: Vec<(usize, usize)>,
}

struct Built {
    q: Vec<f32>,
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
    num_blocks: usize,
    meta: AttentionMetadata,
    /// Per sequence, its blocks in order.
    tables: Vec<Vec<u32>>,
}

fn build(c: &Case, rng: &mut rand::rngs::StdRng) -> Built {
    let bs = c.block_size;
    let need: usize = c.seqs.iter().map(|&(_, l)| l.div_ceil(bs)).sum();
    // Spare blocks too, so tables are scattered and some blocks belong to no one.
    let num_blocks = need + 7;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(rng);
    let width = c.kv_heads * c.head_dim;
    let mut rand_vec =
        |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
    let k_cache = rand_vec(num_blocks * bs * width);
    let v_cache = rand_vec(num_blocks * bs * width);
    let t: usize = c.seqs.iter().map(|&(q, _)| q).sum();
    // Larger queries make the softmax peaky, so errors in the weighting show.
    let q: Vec<f32> = rand_vec(t * c.heads * c.head_dim)
        .into_iter()
        .map(|x| x * 3.0)
        .collect();
    let mut meta = AttentionMetadata::new(bs);
    let mut tables = Vec::new();
    let mut next = 0;
    for &(ql, l) in &c.seqs {
        let nb = l.div_ceil(bs);
        let table: Vec<u32> = ids[next..next + nb].to_vec();
        next += nb;
        meta.push(ql, l, &table);
        tables.push(table);
    }
    Built {
        q,
        k_cache,
        v_cache,
        num_blocks,
        meta,
        tables,
    }
}

/// Dense attention in f64 over the keys each query may see.
fn reference(c: &Case, b: &Built) -> Vec<f32> {
    let (h, kvh, d, bs) = (c.heads, c.kv_heads, c.head_dim, c.block_size);
    let g = h / kvh;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = Vec::new();
    for (s, &(ql, l)) in c.seqs.iter().enumerate() {
        let key = |cache: &[f32], p: usize, kh: usize| -> Vec<f64> {
            let slot = b.tables[s][p / bs] as usize * bs + p % bs;
            cache[(slot * kvh + kh) * d..][..d]
                .iter()
                .map(|&x| x as f64)
                .collect()
        };
        let q0: usize = c.seqs[..s].iter().map(|&(q, _)| q).sum();
        for i in 0..ql {
            let pos = l - ql + i;
            for head in 0..h {
                let kh = head / g;
                let qv = &b.q[((q0 + i) * h + head) * d..][..d];
                let scores: Vec<f64> = (0..=pos)
                    .map(|p| {
                        key(&b.k_cache, p, kh)
                            .iter()
                            .zip(qv)
                            .map(|(a, &b)| a * b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = w.iter().sum();
                let mut o = vec![0f64; d];
                for (p, wp) in w.iter().enumerate() {
                    for (oi, vi) in o.iter_mut().zip(key(&b.v_cache, p, kh)) {
                        *oi += wp / z * vi;
                    }
                }
                out.extend(o.into_iter().map(|x| x as f32));
            }
        }
    }
    out
}

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

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check(c: &Case, seed: u64, dtypes: &[(DType, f32)]) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
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
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut n = 0;
    for &(heads, kv_heads) in &[(4, 4), (9, 3), (8, 2), (16, 2)] {
        for &head_dim in &[64, 128] {
            for &block_size in &[16, 32] {
                // Decodes (1 query) and chunks (many), contexts on and off block edges.
                let mut seqs = Vec::new();
                for _ in 0..rng.random_range(2..6) {
                    let l = match rng.random_range(0..4) {
                        0 => block_size * rng.random_range(1..5),
                        1 => block_size * rng.random_range(1..5) + 1,
                        _ => rng.random_range(1..200),
                    };
                    let q = match rng.random_range(0..3) {
                        0 => 1,
                        1 => l,
                        _ => rng.random_range(1..=l),
                    };
                    seqs.push((q, l));
                }
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
