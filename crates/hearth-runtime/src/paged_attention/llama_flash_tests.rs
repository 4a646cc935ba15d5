//! `--attention-numerics llama-cpp` over an f16 cache against ggml's flash-attention
//! loops written out on dense per-sequence caches: the one-key-at-a-time kernel for
//! ubatches under 64 tokens and the tiled kernel from 64 on.

use half::f16;

use super::cpu::Dims;
use super::llama_flash::{attend_with, dot_f16, reduce_add_16, simd_fits, Q_TILE};
use super::llama_flash_tiled::KV_TILE;
use super::{paged_attention, AttentionMetadata, AttentionNumerics};
use crate::cpu_ops::ggml_expf;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// A row of hearth's rotate-half dims in llama.cpp's interleaved order (its Q/K rows of
/// `llama` GGUF files): hearth's dim `i` at `2i`, `i + d/2` at `2i + 1`.
fn interleave<T: Copy>(x: &[T]) -> Vec<T> {
    let half = x.len() / 2;
    (0..half).flat_map(|i| [x[i], x[i + half]]).collect()
}

/// A reference: one (token, head) row from `q` (hearth's dim order), a dense cache of
/// one sequence (`k`, `v`: `[key][kvh][d]`, hearth's order), (kvh, kv_head, pos).
type Reference = fn(&[f32], &[f16], &[f16], (usize, usize, usize), f32) -> Vec<f32>;

/// One (token, head) row as ggml_compute_forward_flash_attn_ext_f16_one_chunk computes
/// it over an f16 V, written out from its loop (Q and K first to llama.cpp's interleaved
/// order, as its tensors hold them): Q to f16; `s = dot·scale`; on a new maximum
/// `ggml_vec_scale_f16` (a pass rounding to f16), otherwise `vs = expf(s − M)`; then
/// `ggml_vec_mad_f16` (a second pass, FMA rounded to f16); `S = S·ms + vs`; at the end
/// the f16 row widened and scaled by `1/S`.
fn ggml_one_chunk_row(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    (kvh, kv_head, pos): (usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    let d = q.len();
    let q_q: Vec<f16> = interleave(q).iter().map(|&x| f16::from_f32(x)).collect();
    let mut vkq16 = vec![f16::ZERO; d];
    let (mut s_sum, mut m) = (0f32, f32::NEG_INFINITY);
    for ic in 0..=pos {
        let at = (ic * kvh + kv_head) * d;
        let mut s = dot_f16(&interleave(&k[at..at + d]), &q_q);
        s *= scale;
        let m_old = m;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > m {
            m = s;
            ms = (m_old - m).exp();
            for y in vkq16.iter_mut() {
                *y = f16::from_f32(y.to_f32() * ms);
            }
        } else {
            vs = (s - m).exp();
        }
        for (y, x) in vkq16.iter_mut().zip(&v[at..at + d]) {
            *y = f16::from_f32(x.to_f32().mul_add(vs, y.to_f32()));
        }
        s_sum = s_sum.mul_add(ms, vs);
    }
    let s_inv = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
    vkq16.iter().map(|y| y.to_f32() * s_inv).collect()
}

/// One row as ggml_compute_forward_flash_attn_ext_tiled computes it, written out from its
/// loop over the whole padded cache (llama.cpp's n_kv: the cells rounded up to 256, those
/// past `pos` masked): per 64-cell tile the K tile widened to f32 and `simd_gemm`
/// (C = 0, then one FMA per dim in GGUF order), `· scale`, `+ mask`; a tile with every
/// cell masked skipped; `M' = fmaxf(M, max)`, on growth V and S scaled by `expf(M − M')`;
/// `S += ggml_vec_soft_max_f32` (ggml_v_expf, a 16-lane reduction per 16 cells into an
/// f64); then `simd_gemm` of the 64 probabilities with the V tile (masked cells too).
fn ggml_tiled_row(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    (kvh, kv_head, pos): (usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    let d = q.len();
    let q_f32 = interleave(q);
    let n_kv = (pos + 1).div_ceil(256) * 256;
    let (mut s_sum, mut m) = (0f32, f32::NEG_INFINITY);
    let mut vkq = vec![0f32; d];
    for ic in (0..n_kv).step_by(KV_TILE) {
        let mask: Vec<f32> = (ic..ic + KV_TILE)
            .map(|c| if c <= pos { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        if mask.iter().all(|&x| x == f32::NEG_INFINITY) {
            continue;
        }
        let mut kq = [0f32; KV_TILE];
        for (tk, s) in kq.iter_mut().enumerate() {
            let c = ic + tk;
            if c > pos {
                continue; // a zero row of the padded tile (its score is masked below)
            }
            let at = (c * kvh + kv_head) * d;
            let krow = interleave(&k[at..at + d]);
            for dk in 0..d {
                *s = krow[dk].to_f32().mul_add(q_f32[dk], *s);
            }
        }
        for (s, mv) in kq.iter_mut().zip(&mask) {
            *s = *s * scale + mv;
        }
        let mut tile_max = f32::NEG_INFINITY;
        for &s in &kq {
            tile_max = if tile_max > s { tile_max } else { s };
        }
        let m_new = m.max(tile_max);
        if m_new > m {
            let ms = (m - m_new).exp();
            for y in vkq.iter_mut() {
                *y *= ms;
            }
            s_sum *= ms;
        }
        m = m_new;
        let mut sum = 0f64;
        for chunk in kq.chunks_mut(16) {
            let mut val = [0f32; 16];
            for (x, y) in chunk.iter_mut().zip(val.iter_mut()) {
                *y = ggml_expf(*x - m);
                *x = *y;
            }
            sum += reduce_add_16(&val) as f64;
        }
        s_sum = (s_sum as f64 + sum) as f32;
        for (tk, &p) in kq.iter().enumerate() {
            let c = ic + tk;
            for (j, y) in vkq.iter_mut().enumerate() {
                let x = if c <= pos {
                    v[(c * kvh + kv_head) * d + j].to_f32()
                } else {
                    0.0
                };
                *y = x.mul_add(p, *y);
            }
        }
    }
    let s_inv = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
    vkq.iter().map(|y| y * s_inv).collect()
}

/// The same row in f64 throughout: the attention the rounded arithmetic approximates.
fn exact_row(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    (kvh, kv_head, pos): (usize, usize, usize),
    scale: f32,
) -> Vec<f64> {
    let d = q.len();
    let scores: Vec<f64> = (0..=pos)
        .map(|ic| {
            let at = (ic * kvh + kv_head) * d;
            let dot: f64 = (0..d).map(|i| q[i] as f64 * k[at + i].to_f64()).sum();
            dot * scale as f64
        })
        .collect();
    let mx = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
    let z: f64 = w.iter().sum();
    (0..d)
        .map(|i| {
            (0..=pos)
                .map(|ic| w[ic] * v[(ic * kvh + kv_head) * d + i].to_f64())
                .sum::<f64>()
                / z
        })
        .collect()
}

/// A ragged batch in shuffled cache blocks: Q `[T, h, d]`, the paged caches, and each
/// token's (position, dense K, dense V) of its sequence for the references.
struct Case {
    q: Vec<f32>,
    kc: Vec<f16>,
    vc: Vec<f16>,
    meta: AttentionMetadata,
    dense: Vec<(usize, Vec<f16>, Vec<f16>)>,
    num_blocks: usize,
}

impl Case {
    fn new(
        seqs: &[(usize, usize)],
        (h, kvh, d, bs): (usize, usize, usize, usize),
        rng: &mut StdRng,
    ) -> Self {
        let need: usize = seqs.iter().map(|&(_, l)| l.div_ceil(bs)).sum();
        let num_blocks = need + 2;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        ids.shuffle(rng);
        let mut meta = AttentionMetadata::new(bs);
        meta.numerics = AttentionNumerics::LlamaCpp;
        let (mut kc, mut vc) = (
            vec![f16::ZERO; num_blocks * bs * kvh * d],
            vec![f16::ZERO; num_blocks * bs * kvh * d],
        );
        let (mut q, mut dense) = (Vec::new(), Vec::new());
        let mut next = 0;
        for &(ql, l) in seqs {
            let blocks = &ids[next..next + l.div_ceil(bs)];
            next += blocks.len();
            meta.push(ql, l, blocks);
            // Large, varied scores (a max that keeps growing) and values of mixed
            // magnitude, so the f16 running sum rounds at every key.
            let mut dk = vec![f16::ZERO; l * kvh * d];
            let mut dv = vec![f16::ZERO; l * kvh * d];
            for key in 0..l {
                let slot = blocks[key / bs] as usize * bs + key % bs;
                for j in 0..kvh * d {
                    let kx =
                        f16::from_f32(rng.random_range(-2.0f32..2.0) * (1.0 + key as f32 / 16.0));
                    let vx =
                        f16::from_f32(rng.random_range(-1.0f32..1.0) * [1.0, 30.0, 0.01][j % 3]);
                    dk[key * kvh * d + j] = kx;
                    dv[key * kvh * d + j] = vx;
                    kc[slot * kvh * d + j] = kx;
                    vc[slot * kvh * d + j] = vx;
                }
            }
            for i in 0..ql {
                q.extend((0..h * d).map(|_| rng.random_range(-1.5f32..1.5)));
                dense.push((l - ql + i, dk.clone(), dv.clone()));
            }
        }
        Self {
            q,
            kc,
            vc,
            meta,
            dense,
            num_blocks,
        }
    }
}

/// The public op with `AttentionNumerics::LlamaCpp` on a ragged batch of `seqs` (query
/// tokens, keys) in shuffled cache blocks, for several (heads, KV heads, head dim, block
/// size), against `reference` on each sequence's keys laid out densely, to the bit.
/// Returns the largest relative distance of the outputs from exact attention.
fn check_ragged(seqs: &[(usize, usize)], reference: Reference, seed: u64) -> f64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut distance = 0f64;
    for (h, kvh, d, bs) in [
        (6, 2, 64, 16),
        (9, 3, 80, 4),
        (4, 4, 32, 8),
        (8, 1, 128, 16),
    ] {
        let Case {
            q,
            kc,
            vc,
            meta,
            dense,
            num_blocks,
        } = Case::new(seqs, (h, kvh, d, bs), &mut rng);
        let t = q.len() / (h * d);
        let scale = 1.0 / (d as f32).sqrt();
        let dev = Device::Cpu;
        let qt = Tensor::from_vec(q.clone(), (t, h, d), &dev).unwrap();
        let kt = Tensor::from_vec(kc, (num_blocks, bs, kvh, d), &dev).unwrap();
        let vt = Tensor::from_vec(vc, (num_blocks, bs, kvh, d), &dev).unwrap();
        let got: Vec<f32> = paged_attention(&qt, &kt, &vt, &meta, scale)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (tok, (pos, dk, dv)) in dense.iter().enumerate() {
            for head in 0..h {
                let row = tok * h + head;
                let qr = &q[row * d..(row + 1) * d];
                let at = (kvh, head / (h / kvh), *pos);
                let want = reference(qr, dk, dv, at, scale);
                let out = &got[row * d..(row + 1) * d];
                let same = out
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "h {h} kvh {kvh} d {d}: token {tok} (position {pos}) head {head}:\n got {out:?}\nwant {want:?}");
                let exact = exact_row(qr, dk, dv, at, scale);
                for (a, e) in out.iter().zip(&exact) {
                    distance = distance.max((*a as f64 - e).abs() / e.abs().max(1.0));
                }
            }
        }
    }
    distance
}

/// A ubatch under 64 tokens (decodes, a whole prompt, chunks after cached keys; GQA;
/// head dims with and without a tail past 64) equals ggml's one-key-at-a-time loop to
/// the bit. The inputs make the f16 arithmetic visible: the rows differ from exact
/// attention by far more than f32 rounding, so a kernel with f32 sums, another key
/// order, a block-max softmax or the dims summed in hearth's order fails here (checked
/// by mutation before the GGUF order was added: dropping the rescale's f16 rounding or
/// summing the keys in reverse failed it; the dim order alone moved 927–1133 of 2880
/// values of a real layer, tests/llama_cpp_ops.rs).
#[test]
fn equals_ggml_flash_attention_on_ragged_batches() {
    let seqs = [(1, 1), (5, 5), (1, 37), (3, 70), (1, 129), (17, 40)];
    assert!(seqs.iter().map(|s| s.0).sum::<usize>() < Q_TILE);
    let distance = check_ragged(&seqs, ggml_one_chunk_row, 22);
    // f32 arithmetic stays within ~1e-5 of exact here; the f16 running sum does not.
    assert!(distance > 1e-4, "f16 rounding not visible: {distance}");
    assert!(distance < 0.2, "far from attention: {distance}");
}

/// A ubatch of ≥ 64 tokens (a long prompt across several key tiles, a chunk after
/// cached keys that starts mid-tile, decodes riding along) equals ggml's tiled loop to
/// the bit, and is f32 arithmetic (close to exact attention, unlike the f16 kernel).
#[test]
fn equals_ggml_tiled_flash_attention_on_long_ubatches() {
    let seqs = [(1, 9), (70, 70), (40, 150), (1, 300)];
    assert!(seqs.iter().map(|s| s.0).sum::<usize>() >= Q_TILE);
    let distance = check_ragged(&seqs, ggml_tiled_row, 23);
    assert!(distance < 1e-4, "not f32 arithmetic: {distance}");
}

/// The reduction order, on products whose f32 sum depends on it: 2^24 at index 0,
/// 1 at indices 8, 24, 32 and 48. ggml folds the accumulators first: lane 0 becomes
/// (2^24 + 1) + (0 + 1) = 2^24 (each 1 alone is lost to rounding), lane 8 becomes
/// (1 + 0) + (1 + 0) = 2, and lane 0 + lane 8 = 2^24 + 2. A sum in index order loses
/// every 1 (2^24); the exact sum is 2^24 + 4.
#[test]
fn dot_f16_sums_in_ggml_order() {
    let mut x = vec![f16::ZERO; 64];
    let y = vec![f16::ONE; 64];
    x[0] = f16::from_f32(2048.0);
    let mut y0 = y.clone();
    y0[0] = f16::from_f32(8192.0);
    for i in [8, 24, 32, 48] {
        x[i] = f16::ONE;
    }
    assert_eq!(dot_f16(&x, &y0), 16_777_218.0);
    let in_order: f32 = x
        .iter()
        .zip(&y0)
        .map(|(a, b)| a.to_f32() * b.to_f32())
        .sum();
    assert_eq!(in_order, 16_777_216.0);
    // A tail past the 64-element steps is added after the reduction (2^24 + 3,
    // rounded to f32 at the end: 2^24 + 4).
    let (mut x2, mut y2) = (x.clone(), y0.clone());
    x2.push(f16::ONE);
    y2.push(f16::ONE);
    assert_eq!(dot_f16(&x2, &y2), 16_777_220.0);
}

/// llama_flash_simd.rs's kernels against the scalar ones, to the bit, on every output
/// value: head dims 64, 128 and 80 (a tail past the 64-dim steps), GQA groups of 3 and
/// 1, ragged batches with keys up to 600 across cache blocks and key tiles, chunks that
/// start mid-block and mid-tile, and growing maxima (the key magnitudes rise with the
/// position, so the f16 row is rescaled and rounded again and again).
#[test]
fn simd_kernels_equal_the_scalar_ones_to_the_bit() {
    if !simd_fits(64) {
        eprintln!("skipped: no AVX-512F + F16C on this CPU");
        return;
    }
    let one_key: &[(usize, usize)] = &[(1, 600), (1, 1), (5, 5), (3, 130), (17, 300), (1, 577)];
    let tiled: &[(usize, usize)] = &[(70, 600), (64, 64), (1, 450), (10, 200), (1, 1)];
    assert!(one_key.iter().map(|s| s.0).sum::<usize>() < Q_TILE);
    assert!(tiled.iter().map(|s| s.0).sum::<usize>() >= Q_TILE);
    let mut rng = StdRng::seed_from_u64(31);
    let mut rescales = 0;
    for seqs in [one_key, tiled] {
        for (h, kvh, d, bs) in [
            (9, 3, 64, 16),
            (6, 2, 128, 8),
            (3, 3, 80, 32),
            (9, 3, 64, 5),
        ] {
            assert!(simd_fits(d));
            let case = Case::new(seqs, (h, kvh, d, bs), &mut rng);
            let dims = Dims { h, kvh, d, bs };
            let scale = 1.0 / (d as f32).sqrt();
            let run =
                |simd| attend_with(&case.q, &case.kc, &case.vc, &case.meta, dims, scale, simd);
            let (scalar, simd) = (run(false), run(true));
            assert_eq!(scalar.len(), simd.len());
            let moved = scalar
                .iter()
                .zip(&simd)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                moved,
                0,
                "h {h} kvh {kvh} d {d} bs {bs}, {} tokens: {moved} of {} values differ",
                case.dense.len(),
                scalar.len()
            );
            assert!(scalar.iter().all(|x| x.is_finite()));
            // The maxima really grow along the keys: the last key's score beats the
            // first's for most rows (checked on the first KV head's dense keys).
            for (pos, dk, _) in &case.dense {
                let norm = |key: usize| -> f32 {
                    let r = &dk[key * kvh * d..key * kvh * d + d];
                    r.iter().map(|x| x.to_f32().abs()).sum()
                };
                rescales += usize::from(*pos > 0 && norm(*pos) > norm(0));
            }
        }
    }
    assert!(rescales > 100, "keys do not grow: {rescales}");
}

/// `vcvtps2ph` (round to nearest even) rounds like `half::f16::from_f32`, which the
/// scalar kernel uses: on a sweep of f32 bit patterns (every sign, exponent and a spread
/// of mantissas, NaN aside) and on the values halfway between neighbouring f16 values.
#[cfg(target_arch = "x86_64")]
#[test]
fn hardware_f16_rounding_equals_half() {
    if !simd_fits(64) {
        eprintln!("skipped: no AVX-512F + F16C on this CPU");
        return;
    }
    let mut xs: Vec<f32> = (0..u32::MAX / 4099)
        .map(|i| f32::from_bits(i.wrapping_mul(4099)))
        .filter(|x| !x.is_nan())
        .collect();
    for bits in 0..0x7bffu16 {
        let (a, b) = (f16::from_bits(bits), f16::from_bits(bits + 1));
        let mid = (a.to_f32() + b.to_f32()) / 2.0;
        xs.extend([
            mid,
            -mid,
            f32::from_bits(mid.to_bits() + 1),
            f32::from_bits(mid.to_bits() - 1),
        ]);
    }
    xs.resize(xs.len().div_ceil(16) * 16, 0.0);
    let mut hw = xs.clone();
    super::llama_flash_simd::round_f16_slice(&mut hw);
    let differ = xs
        .iter()
        .zip(&hw)
        .filter(|(x, y)| f16::from_f32(**x).to_f32().to_bits() != y.to_bits())
        .count();
    assert_eq!(
        differ,
        0,
        "{differ} of {} values round differently",
        xs.len()
    );
}
