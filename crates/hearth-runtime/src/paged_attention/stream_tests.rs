//! kernel.rs's streaming AVX2 and AVX-512 kernels (the decode rows' path) against the
//! scalar one on ragged shapes, every item forced onto the path under test: head dims 16
//! to 128 (multiples of 16 and 16k + 8), GQA 1 to 8, decodes and short chunks, contexts on
//! and across cache block edges, f32/f16/bf16 caches and f16 queries. The kernels read
//! half-precision caches in place and widen them in registers; since widening is exact,
//! the output over an f16 or bf16 cache must equal, to the bit, the output over an f32
//! copy of that cache (what the kernel computed when it copied each block to f32 first),
//! and the AVX-512 kernel must equal the AVX2 one to the bit.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::test_support::{convert, max_diff, same_bits, widen, Case};
use super::{attend, tiled, CpuKernel, Dims, Element};

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
    Case::random(rng, Dims { h, kvh, d, bs }, &seqs, 3)
}

fn check<Q: Element + Default, T: Element + Default>(c: &Case, tol: f32, what: &str) {
    let (q, k, v) = (convert::<Q>(&c.q), convert::<T>(&c.k), convert::<T>(&c.v));
    let scale = 1.0 / (c.dims.d as f32).sqrt();
    let shape = c.describe(what);
    let run = |kernel| widen(&attend(&q, &k, &v, &c.meta, c.dims, scale, kernel));
    let want = run(CpuKernel::Scalar);
    let got = run(CpuKernel::StreamAvx2);
    let diff = max_diff(&got, &want);
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
    assert!(
        same_bits(&got, &copied),
        "{shape}: reading the cache in place changed the output"
    );
    if tiled::available_avx512() {
        let wide = run(CpuKernel::StreamAvx512);
        assert!(
            same_bits(&got, &wide),
            "AVX-512 {shape}: not bit-identical to AVX2"
        );
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
    // Head dims of 16k + 8 take each width's 8-lane P·V tail.
    for (n, d) in [16, 24, 32, 40, 64, 72, 80, 96, 128]
        .into_iter()
        .cycle()
        .take(36)
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
