//! kernel.rs's streaming AVX2 and AVX-512 kernels (the decode rows' path) against the
//! scalar one on ragged shapes, every item forced onto the path under test: head dims 16
//! to 128 (multiples of 16 and not), GQA 1 to 8, decodes and short chunks, contexts on
//! and across cache block edges, f32/f16/bf16 caches and f16 queries. The kernels read
//! half-precision caches in place and widen them in registers; since widening is exact,
//! the output over an f16 or bf16 cache must equal, to the bit, the output over an f32
//! copy of that cache (what the kernel computed when it copied each block to f32 first),
//! and the AVX-512 kernel must equal the AVX2 one to the bit.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::{attend, tiled, AttentionMetadata, CpuKernel, Dims, Element};

struct Case {
    dims: Dims,
    meta: AttentionMetadata,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn random_case(rng: &mut StdRng, d: usize) -> Case {
    let (h, kvh) =
        [(9, 3), (8, 1), (4, 4), (16, 2), (6, 2), (12, 4), (7, 7)][rng.random_range(0..7)];
    let bs: usize = [16, 32, 64][rng.random_range(0..3)];
    let mut seqs: Vec<(usize, usize)> = Vec::new();
    for _ in 0..rng.random_range(1..6) {
        let l = match rng.random_range(0..4) {
            0 => bs * rng.random_range(1..12),
            1 => bs * rng.random_range(1..12) + 1,
            2 => bs * rng.random_range(1..12) - 1,
            _ => rng.random_range(1..700),
        };
        // Mostly decodes, as a long-context batch is; some short chunks.
        let q = if rng.random_range(0..3) > 0 {
            1
        } else {
            rng.random_range(1..=l.min(20))
        };
        seqs.push((q, l));
    }
    let need: usize = seqs.iter().map(|&(_, l)| l.div_ceil(bs)).sum();
    let num_blocks = need + 3;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(rng);
    let mut meta = AttentionMetadata::new(bs);
    let mut next = 0;
    for &(ql, l) in &seqs {
        let nb = l.div_ceil(bs);
        meta.push(ql, l, &ids[next..next + nb]);
        next += nb;
    }
    let mut vals = |n: usize, amp: f32| -> Vec<f32> {
        (0..n)
            .map(|_| amp * rng.random_range(-1.0f32..1.0))
            .collect()
    };
    let cache = num_blocks * bs * kvh * d;
    // Larger queries make the softmax peaky, so errors in the weighting show.
    let q = vals(meta.num_tokens() * h * d, 3.0);
    let (k, v) = (vals(cache, 1.0), vals(cache, 1.0));
    Case {
        dims: Dims { h, kvh, d, bs },
        meta,
        q,
        k,
        v,
    }
}

fn convert<E: Element + Default>(x: &[f32]) -> Vec<E> {
    let mut out = vec![E::default(); x.len()];
    E::store(x, &mut out);
    out
}

fn widen<E: Element>(x: &[E]) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    E::load(x, &mut out);
    out
}

fn check<Q: Element + Default, T: Element + Default>(c: &Case, tol: f32, what: &str) {
    let (q, k, v) = (convert::<Q>(&c.q), convert::<T>(&c.k), convert::<T>(&c.v));
    let scale = 1.0 / (c.dims.d as f32).sqrt();
    let shape = format!(
        "{what}: heads {}/{} d {} bs {} seqs {:?} queries {:?}",
        c.dims.h, c.dims.kvh, c.dims.d, c.dims.bs, c.meta.seq_lens, c.meta.query_start
    );
    let run = |kernel| widen(&attend(&q, &k, &v, &c.meta, c.dims, scale, kernel));
    let want = run(CpuKernel::Scalar);
    let got = run(CpuKernel::StreamAvx2);
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        diff < tol,
        "{shape}: max diff {diff} from the scalar kernel"
    );
    // The same kernel over the cache widened to f32 beforehand.
    let (k32, v32) = (widen(&k), widen(&v));
    let copied = widen(&attend(
        &q,
        &k32,
        &v32,
        &c.meta,
        c.dims,
        scale,
        CpuKernel::StreamAvx2,
    ));
    let same = got
        .iter()
        .zip(&copied)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(
        same,
        "{shape}: reading the cache in place changed the output"
    );
    if tiled::available_avx512() {
        let wide = run(CpuKernel::StreamAvx512);
        let same = got
            .iter()
            .zip(&wide)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "AVX-512 {shape}: not bit-identical to AVX2");
    }
}

#[test]
fn streaming_kernel_matches_the_scalar_one_on_ragged_decodes_and_caches() {
    if !tiled::available() {
        eprintln!("no AVX2 + FMA + F16C here: the streaming SIMD kernels cannot run");
        return;
    }
    if !tiled::available_avx512() {
        eprintln!("no AVX-512F here: only the AVX2 streaming kernel is checked");
    }
    let mut rng = StdRng::seed_from_u64(7);
    for (n, d) in [16, 32, 64, 80, 96, 128]
        .into_iter()
        .cycle()
        .take(30)
        .enumerate()
    {
        let c = random_case(&mut rng, d);
        check::<f32, f32>(&c, 1e-4, &format!("case {n}, f32 cache"));
        check::<f32, f16>(&c, 1e-4, &format!("case {n}, f16 cache"));
        check::<f32, bf16>(&c, 1e-4, &format!("case {n}, bf16 cache"));
        if n % 3 == 0 {
            // f16 outputs round to 2^-11 relative.
            check::<f16, f16>(&c, 4e-3, &format!("case {n}, f16 queries and cache"));
        }
    }
}
