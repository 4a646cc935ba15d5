//! The q8 matmul on every instruction set this CPU has (`Isa::available()`, each forced in
//! turn) against the scalar reference (`q8::reference`) on random blocks of every weight
//! type: exact integer sums (to the bit, under power-of-two scales), and split work with
//! whole and partial tiles of weight rows and of activation rows.

use half::f16;
use hearth_kernels::q8::{self, acts, reference, Isa, SumOrder, WeightType};

const TYPES: [WeightType; 8] = [
    WeightType::Q4_0,
    WeightType::Q4_1,
    WeightType::Q5_0,
    WeightType::Q5_1,
    WeightType::Q8_0,
    WeightType::Q4K,
    WeightType::Q5K,
    WeightType::Q6K,
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() % (1 << 24)) as f32 / (1 << 23) as f32 - 1.0
    }
}

/// Where a block's f16 fields are.
fn f16_fields(wt: WeightType) -> &'static [usize] {
    match wt {
        WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => &[0],
        WeightType::Q6K => &[208],
        _ => &[0, 2],
    }
}

/// `n` rows of random blocks: every bit of the quants and scales random, each f16 field
/// `scale(rng)`.
fn random_blocks(
    wt: WeightType,
    n: usize,
    k: usize,
    rng: &mut Rng,
    scale: &mut dyn FnMut(&mut Rng) -> f32,
) -> Vec<u8> {
    let bb = wt.block_bytes();
    let mut w: Vec<u8> = (0..n * k / wt.block() * bb)
        .map(|_| rng.next() as u8)
        .collect();
    for b in w.chunks_exact_mut(bb) {
        for &at in f16_fields(wt) {
            let v = f16::from_f32(scale(rng)).to_bits().to_le_bytes();
            b[at..at + 2].copy_from_slice(&v);
        }
    }
    w
}

/// The reference's products of `n` weight rows with every activation row of `a`.
fn reference_products(wt: WeightType, w: &[u8], n: usize, a: &acts::QuantizedActs) -> Vec<f32> {
    let m = a.qs.len() / a.k;
    let row_bytes = w.len() / n;
    let mut out = Vec::with_capacity(m * n);
    for t in 0..m {
        for r in 0..n {
            out.push(reference::dot(
                wt,
                &w[r * row_bytes..(r + 1) * row_bytes],
                a,
                t,
            ));
        }
    }
    out
}

/// Random blocks whose f16 scales are powers of two, and activations with power-of-two
/// scales: every float product and sum is then exact, so each instruction set's result
/// must equal the reference's to the bit, which holds only if every integer block sum is
/// exact (an integer off by one anywhere changes the result).
#[test]
fn integer_sums_are_exact_on_every_isa() {
    let mut rng = Rng(41);
    let k = 512;
    let mut wrong = Vec::new();
    // 35 weight rows: every type in ggml's lane order; 40: Q4_K in llama.cpp's repacked
    // orders (`SumOrder`).
    for (wt, n) in TYPES
        .into_iter()
        .map(|wt| (wt, 35))
        .chain([(WeightType::Q4K, 40)])
    {
        // Two exponents and both signs: every product a multiple of 2^-8, every sum well
        // inside f32's 24 bits.
        let w = random_blocks(wt, n, k, &mut rng, &mut |r| {
            let sign = if r.next() % 2 == 0 { 1.0 } else { -1.0 };
            sign * 2f32.powi(-((3 + r.next() % 2) as i32))
        });
        for m in [1, 2, 5, 11] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.f()).collect();
            let mut a = acts::quantize(wt.act_format(), &x, k);
            a.d.iter_mut().for_each(|d| *d = 1.0 / 16.0);
            for (s, (d, q)) in a.s.iter_mut().zip(a.d.iter().zip(a.qs.chunks_exact(32))) {
                *s = d * q.iter().map(|&v| v as f32).sum::<f32>();
            }
            let want = reference_products(wt, &w, n, &a);
            for isa in Isa::available() {
                let mut got = vec![0f32; m * n];
                q8::matmul_quantized(isa, wt, &w, n, &a, m, &mut got, &|n, work| work(0..n));
                // The SIMD Q6_K (row kernels and tiles alike) takes its +32 offset in one
                // of eight f32 lane sums, which can pass 2^24 and round (spreading it moves
                // llama.cpp-agreement near-ties: llama_cpp_goldens.rs); held to 1e-5 here.
                let loose = wt == WeightType::Q6K && isa > Isa::Scalar;
                for (i, (g, v)) in got.iter().zip(&want).enumerate() {
                    let off = if loose {
                        (g - v).abs() > 1e-5 * v.abs().max(1.0)
                    } else {
                        g.to_bits() != v.to_bits()
                    };
                    if off {
                        wrong.push(format!(
                            "{wt:?} {isa:?} m={m} act {} row {}: {g} vs {v}",
                            i / n,
                            i % n
                        ));
                    }
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} differ:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(30)].join("\n")
    );
}

/// The matmul on every instruction set (over split work, whole and partial tiles of
/// weight rows and of activation rows) against the scalar reference on random blocks with
/// random scales, within f32 rounding of the sums (relative to the products' typical size,
/// since a product can cancel to near zero).
#[test]
fn matmul_matches_reference_on_random_blocks() {
    let mut rng = Rng(11);
    // 37 rows: two whole tiles of 16 and one of 5 (or single rows), in two work ranges;
    // m = 17 takes activation tiles of 8 + 8 + 1.
    let (n, k) = (37, 768);
    let mut wrong = Vec::new();
    for wt in TYPES {
        let w = random_blocks(wt, n, k, &mut rng, &mut |r| r.f() * 0.05);
        for m in [1, 3, 4, 9, 17] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.f() * 3.0).collect();
            let a = acts::quantize(wt.act_format(), &x, k);
            let want = reference_products(wt, &w, n, &a);
            let typical = want.iter().map(|v| v.abs()).sum::<f32>() / want.len() as f32;
            let split = |n: usize, work: &(dyn Fn(std::ops::Range<usize>) + Sync)| {
                work(0..n / 2);
                work(n / 2..n);
            };
            for isa in Isa::available() {
                let got = q8::matmul_on_isa(isa, wt, &w, n, k, &x, &split);
                for (i, (g, v)) in got.iter().zip(&want).enumerate() {
                    if (g - v).abs() > 1e-5 * (v.abs() + typical) {
                        wrong.push(format!(
                            "{wt:?} {isa:?} m={m} act {} row {}: {g} vs {v} (typical {typical})",
                            i / n,
                            i % n
                        ));
                    }
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} differ:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(30)].join("\n")
    );
}

/// The AVX-512 tiles add their float products in the row kernels' order (eight group sums
/// per row, llama.cpp's AVX2 lane order; the K-quants' mins in a ninth, Q6_K's offset per
/// group; from 8 activation rows the K-quants in llama.cpp's tiled order, `SumOrder`, on
/// both sides), so on any scales and any shape the two agree to the bit: this is what keeps
/// greedy output equal to llama.cpp's with the tiles on. Every type; weight rows that are
/// not whole tiles of 16 (the last tile repeats a row), activation rows 1..=19 (tiles of 8,
/// 4, 2 and 1 in every mix) and 33, 40 (a prompt's tiles decoded once), rows of 16k values (chunks of 8 activation rows, so a prompt's
/// chunks and their tail are crossed), split work, f16 scales from tiny to large.
#[test]
fn tiles_equal_the_row_kernels_to_the_bit() {
    if !Isa::available().contains(&Isa::Avx512) {
        return;
    }
    let mut rng = Rng(53);
    let split = |n: usize, work: &(dyn Fn(std::ops::Range<usize>) + Sync)| {
        work(0..n / 3);
        work(n / 3..n);
    };
    let mut wrong = Vec::new();
    let mut compared = 0usize;
    for wt in TYPES {
        for (n, k) in [
            (37, 512),
            (5, 768),
            (16, 256),
            (50, 1536),
            (40, 512),
            (19, 16384),
        ] {
            let k = if wt.block() == 32 { k + 96 } else { k };
            let w = random_blocks(wt, n, k, &mut rng, &mut |r| {
                r.f() * [0.001, 0.05, 3.0][(r.next() % 3) as usize]
            });
            for m in (1..=10).chain([13, 16, 19, 33, 40]) {
                let x: Vec<f32> = (0..m * k).map(|_| rng.f() * 3.0).collect();
                let tile = q8::matmul_on_isa(Isa::Avx512, wt, &w, n, k, &x, &split);
                let row = q8::matmul_on_isa(Isa::Avx512Vnni, wt, &w, n, k, &x, &split);
                compared += tile.len();
                for (i, (a, b)) in tile.iter().zip(&row).enumerate() {
                    if a.to_bits() != b.to_bits() {
                        wrong.push(format!(
                            "{wt:?} {n}x{k} m={m} act {} row {}: tile {a} vs row {b}",
                            i / n,
                            i % n
                        ));
                    }
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {compared} differ:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(30)].join("\n")
    );
}

/// Q4_K weights of a multiple of 8 rows are repacked by llama.cpp, whose GEMM (activation
/// rows in whole fours) and GEMV (the rest) add the float terms in their own orders
/// (`SumOrder::Pair`, `Block`); every instruction set follows them to the bit, as the
/// reference computes them, on random scales where another order rounds differently. Row
/// counts not a multiple of 8 are not repacked (`SumOrder::Lanes` below 8 activation rows,
/// `Tiled` from there: `k_quants_follow_llama_cpp_tiled_order_to_the_bit`).
#[test]
fn q4_k_follows_llama_cpp_repacked_order_to_the_bit() {
    let mut rng = Rng(71);
    let k = 768;
    assert_eq!(SumOrder::of(WeightType::Q4K, 37, 7, 0), SumOrder::Lanes);
    assert_eq!(SumOrder::of(WeightType::Q4K, 37, 8, 0), SumOrder::Tiled);
    assert_eq!(SumOrder::of(WeightType::Q4K, 40, 8, 0), SumOrder::Pair);
    let split = |n: usize, work: &(dyn Fn(std::ops::Range<usize>) + Sync)| {
        work(0..n / 3);
        work(n / 3..n);
    };
    let (mut wrong, mut compared) = (Vec::new(), 0usize);
    // Element counts where the two repacked orders (and ggml's generic one) round apart:
    // the test tells the orders apart.
    let (mut pair_vs_block, mut block_vs_generic) = (0usize, 0usize);
    for n in [8, 48, 40] {
        let w = random_blocks(WeightType::Q4K, n, k, &mut rng, &mut |r| {
            r.f() * [0.001, 0.05, 3.0][(r.next() % 3) as usize]
        });
        let row_bytes = w.len() / n;
        for m in (1..=10).chain([13, 16, 19]) {
            let x: Vec<f32> = (0..m * k).map(|_| rng.f() * 3.0).collect();
            let a = acts::quantize(WeightType::Q4K.act_format(), &x, k);
            for isa in Isa::available() {
                let got = q8::matmul_on_isa(isa, WeightType::Q4K, &w, n, k, &x, &split);
                for t in 0..m {
                    let order = SumOrder::of(WeightType::Q4K, n, m, t);
                    assert_eq!(order == SumOrder::Pair, t < m - m % 4);
                    for r in 0..n {
                        let wr = &w[r * row_bytes..(r + 1) * row_bytes];
                        let want = reference::dot_ordered(order, WeightType::Q4K, wr, &a, t);
                        compared += 1;
                        if got[t * n + r].to_bits() != want.to_bits() {
                            wrong.push(format!(
                                "{isa:?} {n}x{k} m={m} act {t} row {r} ({order:?}): {} vs {want}",
                                got[t * n + r]
                            ));
                        }
                        if isa == Isa::Scalar {
                            let block = reference::dot_q4k_repacked(wr, &a, t, false);
                            let pair = reference::dot_q4k_repacked(wr, &a, t, true);
                            let generic = reference::dot(WeightType::Q4K, wr, &a, t);
                            pair_vs_block += usize::from(pair.to_bits() != block.to_bits());
                            block_vs_generic += usize::from(block.to_bits() != generic.to_bits());
                        }
                    }
                }
            }
        }
    }
    assert!(
        pair_vs_block > 0 && block_vs_generic > 0,
        "the orders never round apart ({pair_vs_block}, {block_vs_generic}): the test cannot tell them apart"
    );
    assert!(
        wrong.is_empty(),
        "{} of {compared} differ:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(30)].join("\n")
    );
}

/// llama.cpp's tiled K-quant matmul (ggml-cpu/tiled) takes Q5_K, Q6_K and the Q4_K it does
/// not repack from 8 activation rows (a prompt), `vec_dot` below: the K-quants follow it
/// (`SumOrder::Tiled`) on every instruction set to the bit, as the scalar
/// `reference::dot_tiled` states its order, on random blocks and scales from tiny to
/// large (where another order rounds differently: counted, so the test can tell them
/// apart), weight rows in whole and partial tiles, activation rows in tiles of 8, 4, 2, 1.
#[test]
fn k_quants_follow_llama_cpp_tiled_order_to_the_bit() {
    let mut rng = Rng(97);
    for wt in [WeightType::Q4K, WeightType::Q5K, WeightType::Q6K] {
        assert_eq!(SumOrder::of(wt, 37, 1, 0), SumOrder::Lanes);
        assert_eq!(SumOrder::of(wt, 37, 7, 6), SumOrder::Lanes);
        assert_eq!(SumOrder::of(wt, 37, 8, 7), SumOrder::Tiled);
        assert_eq!(SumOrder::of(wt, 37, 300, 0), SumOrder::Tiled);
    }
    assert_eq!(SumOrder::of(WeightType::Q6K, 48, 8, 0), SumOrder::Tiled);
    assert_eq!(SumOrder::of(WeightType::Q8_0, 48, 8, 0), SumOrder::Lanes);
    let split = |n: usize, work: &(dyn Fn(std::ops::Range<usize>) + Sync)| {
        work(0..n / 3);
        work(n / 3..n);
    };
    let (mut wrong, mut compared, mut apart) = (Vec::new(), 0usize, 0usize);
    // Q4_K at 37 rows (not a multiple of 8: not repacked); 576 x 1536 is SmolLM2's
    // ffn_down.
    for (wt, n, k) in [
        (WeightType::Q4K, 37, 768),
        (WeightType::Q5K, 37, 768),
        (WeightType::Q6K, 37, 768),
        (WeightType::Q6K, 576, 1536),
    ] {
        let w = random_blocks(wt, n, k, &mut rng, &mut |r| {
            r.f() * [0.001, 0.05, 3.0][(r.next() % 3) as usize]
        });
        let row_bytes = w.len() / n;
        let ms: &[usize] = if n > 100 {
            &[8, 17]
        } else {
            &[8, 9, 10, 13, 16, 17, 19, 33]
        };
        for &m in ms {
            let x: Vec<f32> = (0..m * k).map(|_| rng.f() * 3.0).collect();
            let a = acts::quantize(wt.act_format(), &x, k);
            let want: Vec<f32> = (0..m * n)
                .map(|i| {
                    let wr = &w[(i % n) * row_bytes..(i % n + 1) * row_bytes];
                    let tiled = reference::dot_tiled(wt, wr, &a, i / n);
                    let lanes = reference::dot(wt, wr, &a, i / n);
                    apart += usize::from(tiled.to_bits() != lanes.to_bits());
                    tiled
                })
                .collect();
            for isa in Isa::available() {
                let got = q8::matmul_on_isa(isa, wt, &w, n, k, &x, &split);
                compared += got.len();
                for (i, (g, v)) in got.iter().zip(&want).enumerate() {
                    if g.to_bits() != v.to_bits() {
                        wrong.push(format!(
                            "{wt:?} {isa:?} {n}x{k} m={m} act {} row {}: {g} vs {v}",
                            i / n,
                            i % n
                        ));
                    }
                }
            }
        }
    }
    assert!(
        apart > 0,
        "the tiled and generic orders never round apart: the test cannot tell them apart"
    );
    assert!(
        wrong.is_empty(),
        "{} of {compared} differ:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(30)].join("\n")
    );
}
