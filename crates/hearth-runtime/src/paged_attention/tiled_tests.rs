//! Each SIMD width of tiled.rs's prefill kernel against the scalar streaming kernel
//! (kernel.rs's `Scalar`) on random shapes, with every item forced onto the path under
//! test: head dims 8 to 128, multiples of 16 and not (AVX-512's partial vectors), GQA 1
//! to 8, ragged chunks and contexts on, past and between key tiles and cache blocks,
//! decodes (items of 1–8 rows) too, f32/f16/bf16 caches and f16 queries. The AVX2 and
//! AVX-512 kernels must agree to the bit (the same operations per lane: lanes.rs), so
//! greedy outputs do not depend on which one the CPU runs.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::test_support::{convert, max_diff, same_bits, widen, Case};
use super::{attend, tiled, CpuKernel, Dims, Element};

fn random_case(rng: &mut StdRng) -> Case {
    let (h, kvh) = [(9, 3), (8, 1), (4, 4), (16, 2), (6, 2), (12, 4)][rng.random_range(0..6)];
    let d = [8, 24, 40, 64, 72, 128][rng.random_range(0..6)];
    let bs: usize = [16, 32, 64][rng.random_range(0..3)];
    let mut seqs: Vec<(usize, usize)> = Vec::new();
    for _ in 0..rng.random_range(1..4) {
        let l = match rng.random_range(0..4) {
            0 => 64 * rng.random_range(1..5),
            1 => 64 * rng.random_range(1..5) + 1,
            2 => bs * rng.random_range(1..8) - 1,
            _ => rng.random_range(2..300),
        };
        let q = match rng.random_range(0..4) {
            0 => l,
            1 => rng.random_range(1..=l.min(40)),
            2 => 1,
            _ => rng.random_range(1..=l),
        };
        seqs.push((q, l));
    }
    Case::random(rng, Dims { h, kvh, d, bs }, &seqs, 5)
}

/// The case's output on every path; the scalar one is the reference.
fn check<Q: Element + Default, T: Element + Default>(c: &Case, tol: f32, what: &str) {
    let (q, k, v) = (convert::<Q>(&c.q), convert::<T>(&c.k), convert::<T>(&c.v));
    let scale = 1.0 / (c.dims.d as f32).sqrt();
    let run = |kernel| widen(&attend(&q, &k, &v, &c.meta, c.dims, scale, kernel));
    let want = run(CpuKernel::Scalar);
    let shape = c.describe(what);
    let close = |got: &[f32], path: &str| {
        let diff = max_diff(got, &want);
        assert!(
            diff < tol,
            "{path} {shape}: max diff {diff} from the scalar kernel"
        );
    };
    let avx2 = run(CpuKernel::TiledAvx2);
    close(&avx2, "AVX2");
    if tiled::available_avx512() {
        let avx512 = run(CpuKernel::TiledAvx512);
        close(&avx512, "AVX-512");
        assert!(
            same_bits(&avx2, &avx512),
            "AVX-512 {shape}: not bit-identical to AVX2"
        );
    }
}

#[test]
fn tiled_kernels_match_the_scalar_one_on_random_shapes_and_caches() {
    if !tiled::available() {
        eprintln!("no AVX2 + FMA + F16C here: the tiled kernels cannot run");
        return;
    }
    if !tiled::available_avx512() {
        eprintln!("no AVX-512F here: only the AVX2 kernel is checked");
    }
    let mut rng = StdRng::seed_from_u64(22);
    for n in 0..24 {
        let c = random_case(&mut rng);
        check::<f32, f32>(&c, 1e-4, &format!("case {n}, f32 cache"));
        check::<f32, f16>(&c, 1e-4, &format!("case {n}, f16 cache"));
        check::<f32, bf16>(&c, 1e-4, &format!("case {n}, bf16 cache"));
        if n % 4 == 0 {
            // f16 outputs round to 2^-11 relative.
            check::<f16, f16>(&c, 4e-3, &format!("case {n}, f16 queries and cache"));
        }
    }
}
