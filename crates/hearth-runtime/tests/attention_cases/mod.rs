//! Random paged-attention cases and their float64 reference, shared by the op's tests
//! (paged_attention.rs) and the emulated CUDA kernel's (cuda_emulator.rs).
#![allow(dead_code)]

use hearth_runtime::paged_attention::AttentionMetadata;
use rand::{seq::SliceRandom, Rng, SeedableRng};

pub struct Case {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// (query_len, seq_len) per sequence.
    pub seqs: Vec<(usize, usize)>,
}

pub struct Built {
    pub q: Vec<f32>,
    pub k_cache: Vec<f32>,
    pub v_cache: Vec<f32>,
    pub num_blocks: usize,
    pub meta: AttentionMetadata,
    /// Per sequence, its blocks in order.
    pub tables: Vec<Vec<u32>>,
}

pub fn build(c: &Case, rng: &mut rand::rngs::StdRng) -> Built {
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
pub fn reference(c: &Case, b: &Built) -> Vec<f32> {
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

/// The largest difference; infinite where either side has a NaN (which `f32::max`
/// would otherwise skip, passing a kernel that wrote NaN).
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
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

/// A ragged batch of 2..6 sequences: decodes (1 query), whole prompts and chunks, with
/// contexts on block edges, one past them, and anywhere below `max_len`.
pub fn random_seqs(
    rng: &mut rand::rngs::StdRng,
    block_size: usize,
    max_len: usize,
) -> Vec<(usize, usize)> {
    let mut seqs = Vec::new();
    let max_blocks = (max_len / block_size).clamp(2, 5);
    for _ in 0..rng.random_range(2..6) {
        let l = match rng.random_range(0..4) {
            0 => block_size * rng.random_range(1..max_blocks),
            1 => block_size * rng.random_range(1..max_blocks) + 1,
            _ => rng.random_range(1..max_len),
        };
        let q = match rng.random_range(0..3) {
            0 => 1,
            1 => l,
            _ => rng.random_range(1..=l),
        };
        seqs.push((q, l));
    }
    seqs
}

pub fn seeded(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// q and the caches of a built case as CPU tensors in `dtype`.
pub fn cpu_tensors(
    c: &Case,
    b: &Built,
    dtype: candle_core::DType,
) -> (
    candle_core::Tensor,
    candle_core::Tensor,
    candle_core::Tensor,
) {
    use candle_core::{Device, Tensor};
    let t = b.meta.num_tokens();
    let shape = (b.num_blocks, c.block_size, c.kv_heads, c.head_dim);
    let make = |v: &[f32], s: &[usize]| {
        Tensor::from_slice(v, s, &Device::Cpu)
            .and_then(|x| x.to_dtype(dtype))
            .expect("a test tensor")
    };
    (
        make(&b.q, &[t, c.heads, c.head_dim]),
        make(&b.k_cache, &[shape.0, shape.1, shape.2, shape.3]),
        make(&b.v_cache, &[shape.0, shape.1, shape.2, shape.3]),
    )
}

/// A tensor's values as f32, flattened.
pub fn values(t: &candle_core::Tensor) -> Vec<f32> {
    t.to_dtype(candle_core::DType::F32)
        .and_then(|x| x.flatten_all())
        .and_then(|x| x.to_vec1())
        .expect("tensor values")
}
