use super::*;

fn noise(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// One panel per piece, last panel first: every range boundary the pool could make.
fn split_backwards(n: usize, work: &(dyn Fn(Range<usize>) + Sync)) {
    for i in (0..n).rev() {
        work(i..i + 1);
    }
}

fn round_bf16(v: f32) -> f32 {
    bf16_value(bf16_bits(v))
}

/// `x · Wᵀ` in f64 over the given (possibly rounded) values, and Σ|x·w| per output for
/// the tolerance.
fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    let mut want = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                let v = x[i * k + p] as f64 * w[j * k + p] as f64;
                want[i * n + j] += v;
                mag[i * n + j] += v.abs();
            }
        }
    }
    (want, mag)
}

const MS: std::ops::RangeInclusive<usize> = 1..=33;
const NS: [usize; 7] = [1, 5, 31, 32, 33, 70, 97];
const KS: [usize; 5] = [1, 3, 17, 64, 101];

fn isas_here(dtype: WeightDtype) -> Vec<Isa> {
    let isas: Vec<Isa> = Isa::ALL
        .into_iter()
        .filter(|i| i.runs_here(dtype))
        .collect();
    eprintln!("{dtype:?}: testing {isas:?}");
    isas
}

/// Every instruction set this CPU runs (scalar and AVX2 forced on an AVX-512 machine)
/// against an f64 reference, on every row count 1..=33 (whole and partial tiles of 4, 6
/// and 12 rows) and widths and depths that are not multiples of the panel.
#[test]
fn f32_product_matches_reference_on_every_isa_and_ragged_shape() {
    let isas = isas_here(WeightDtype::F32);
    for (s, (&n, &k)) in NS
        .iter()
        .flat_map(|n| KS.iter().map(move |k| (n, k)))
        .enumerate()
    {
        let w = noise(n * k, 1 + s as u64);
        let packed = PackedWeight::pack(&w, n, k, WeightDtype::F32);
        for m in MS {
            let x = noise(m * k, 1000 + (s * 40 + m) as u64);
            let (want, mag) = reference(&x, &w, m, n, k);
            for &isa in &isas {
                let got = packed.matmul_on_isa(isa, &x, &split_backwards);
                assert_eq!(got.len(), m * n);
                for (e, (&g, (&r, &a))) in got.iter().zip(want.iter().zip(&mag)).enumerate() {
                    let tol = 1e-5 * a + 1e-6;
                    assert!(
                        ((g as f64) - r).abs() <= tol,
                        "{isa:?} m={m} n={n} k={k} at ({}, {}): {g} vs {r}",
                        e / n,
                        e % n
                    );
                }
            }
        }
    }
}

/// bf16 weights: every instruction set equals the product of the bf16-rounded values
/// (f32 accumulation), and is within bf16's rounding of the f32 product.
#[test]
fn bf16_product_matches_rounded_reference_and_f32_within_bf16_tolerance() {
    let isas = isas_here(WeightDtype::Bf16);
    for (s, (&n, &k)) in NS
        .iter()
        .flat_map(|n| KS.iter().map(move |k| (n, k)))
        .enumerate()
    {
        let w = noise(n * k, 7 + s as u64);
        let packed = PackedWeight::pack(&w, n, k, WeightDtype::Bf16);
        let w16: Vec<f32> = w.iter().map(|&v| round_bf16(v)).collect();
        for m in MS {
            let x = noise(m * k, 5000 + (s * 40 + m) as u64);
            let x16: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
            let (want16, mag) = reference(&x16, &w16, m, n, k);
            let (want32, _) = reference(&x, &w, m, n, k);
            for &isa in &isas {
                let got = packed.matmul_on_isa(isa, &x, &split_backwards);
                for (e, &g) in got.iter().enumerate() {
                    let g = g as f64;
                    assert!(
                        (g - want16[e]).abs() <= 1e-5 * mag[e] + 1e-6,
                        "{isa:?} m={m} n={n} k={k} at {e}: {g} vs rounded {}",
                        want16[e]
                    );
                    // bf16 keeps 8 significant bits: each factor is within 2^-8 of its
                    // f32 value, the product within 2^-7.
                    assert!(
                        (g - want32[e]).abs() <= mag[e] / 128.0 + 1e-6,
                        "{isa:?} m={m} n={n} k={k} at {e}: {g} vs f32 {}",
                        want32[e]
                    );
                }
            }
        }
    }
}

#[test]
fn rows_read_back_and_padding_is_bounded() {
    for &(n, k) in &[(1usize, 1usize), (33, 17), (64, 64), (97, 101)] {
        let w = noise(n * k, 99);
        for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
            let packed = PackedWeight::pack(&w, n, k, dtype);
            let mut row = vec![0f32; k];
            for r in 0..n {
                packed.row_into(r, &mut row);
                for (p, &v) in row.iter().enumerate() {
                    let want = match dtype {
                        WeightDtype::F32 => w[r * k + p],
                        WeightDtype::Bf16 => round_bf16(w[r * k + p]),
                    };
                    assert_eq!(v, want, "{dtype:?} [{n}, {k}] row {r} col {p}");
                }
            }
            let (elem, cols) = match dtype {
                WeightDtype::F32 => (4, k),
                WeightDtype::Bf16 => (2, k + k % 2),
            };
            assert!(
                packed.bytes() <= (n + PANEL - 1) * cols * elem,
                "{dtype:?} [{n}, {k}]: {} bytes",
                packed.bytes()
            );
        }
    }
}
