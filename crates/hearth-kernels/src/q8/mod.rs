//! `x · Wᵀ` on the CPU for the GGUF block types small models ship in: the legacy Q4_0,
//! Q4_1 and Q8_0 (SmolLM2's demo file is Q4_1), and llama.cpp's K-quant files — Q4_K,
//! Q5_K, Q6_K and the Q5_0/Q5_1/Q8_0 fallbacks `llama-quantize` writes for rows not
//! divisible by 256 — reading the GGUF's blocks in place (no repacking: resident weights are the
//! file's bytes). Activations are quantized once per row to 8 bits in llama.cpp's own
//! format for each weight type (`acts`), so products match llama.cpp's on the same file
//! up to the order of float sums. The integer inner loops run a row at a time on AVX2 (and
//! 256-bit AVX512-VNNI for blocks of 32) where the CPU has it, on the scalar definition
//! (`reference`) otherwise; sixteen weight rows at a time on AVX-512 (`avx512`, every
//! type), whose tiles keep the row kernels' order of float sums, so they give the same
//! results to the bit. That order is llama.cpp's for the same product (`SumOrder`): its
//! AVX2 lane order, or for Q4_K weights, which llama.cpp repacks at load, its repacked
//! GEMV/GEMM's one sum per row, which also lets the Q4_K tile skip the lane bookkeeping,
//! or for the other K-quants at 8 activation rows and more (a prompt) its tiled matmul's
//! one exact integer per block and one float sum per row.

// Tile loops index several per-row arrays (accumulators, sums, outputs) by the same row.
#![allow(clippy::needless_range_loop)]

pub mod acts;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_decoded;
#[cfg(target_arch = "x86_64")]
mod avx512_q4k;
#[cfg(target_arch = "x86_64")]
mod avx512_rows;
pub mod reference;

use candle_core::quantized::GgmlDType;

use crate::quant_matmul::Parallel;
use acts::{ActFormat, QuantizedActs};

/// The weight block types with a kernel here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl WeightType {
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    /// Values per block.
    pub fn block(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            _ => 256,
        }
    }

    /// Bytes per block (ggml's `block_*` structs).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// The activation format llama.cpp pairs with this weight type (`vec_dot_type`).
    pub fn act_format(self) -> ActFormat {
        match self {
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => ActFormat::Q8_0,
            Self::Q4_1 | Self::Q5_1 => ActFormat::Q8_1,
            _ => ActFormat::Q8K,
        }
    }
}

/// Activation rows per pass over a weight row: each decoded weight block is reused this
/// many times.
pub(crate) const TILE: usize = 4;

/// The order in which llama.cpp's CPU backend adds a product's float terms, which hearth
/// follows to the bit so that greedy tokens agree on the same file. The integer block sums
/// are exact on both sides; only this order is left to match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SumOrder {
    /// ggml's AVX2 `vec_dot_*` (every type but repacked Q4_K): per row eight lane sums, one
    /// per four-value group of every 32, each taking its block's scaled sum by FMA, added
    /// in `hsum` order at the end.
    Lanes,
    /// Q4_K repacked at load (`ggml_gemv_q4_K_8x8_q8_K`, for activation rows that are not
    /// part of a whole four): one integer sum per block, taken by FMA with `d·dx` into one
    /// running sum; the mins likewise with `dmin·dx` into a second; their difference.
    Block,
    /// The same in llama.cpp's repacked GEMM (`ggml_gemm_q4_K_8x8_q8_K`, the activation
    /// rows in whole fours): one FMA per 64 values (two sub-blocks) instead of per block.
    Pair,
    /// llama.cpp's tiled K-quant matmul (`ggml-cpu/tiled`, taken for Q4_K, Q5_K and Q6_K
    /// weights that are not repacked once a product has `TILED_MIN_ROWS` activation rows):
    /// per block one exact integer, `Σ scale·Σ q·x` (Q6_K's +32 taken off through the
    /// activations' 16-value sums), converted to f32 and multiplied by the weight's `d`
    /// (Q4_K/Q5_K: minus `dmin·Σ min·bsum` in one FMA), then taken by one FMA with the
    /// activation block's `d` into a single running sum. Its VNNI and AVX2+FMA microtiles
    /// (`tiled_run_micro_vnni_8x16`, `tiled_run_microtile_avx2`, as GCC compiles them)
    /// both do exactly this.
    Tiled,
}

/// Activation rows from which llama.cpp takes its tiled K-quant matmul
/// (`ggml_tiled_min_batch`); below them, `vec_dot` a row at a time (`SumOrder::Lanes`).
pub const TILED_MIN_ROWS: usize = 8;

impl SumOrder {
    /// llama.cpp's order for activation row `t` of `m` against `n` weight rows of `wt`:
    /// it repacks Q4_K weights of a multiple of 8 rows (on AVX2 and up) and runs the GEMM
    /// over the first `m - m % 4` activation rows, the GEMV over the rest; the other
    /// K-quants (and Q4_K it does not repack) go to its tiled matmul from
    /// `TILED_MIN_ROWS` activation rows, to `vec_dot` below.
    pub fn of(wt: WeightType, n: usize, m: usize, t: usize) -> Self {
        match wt {
            WeightType::Q4K if n.is_multiple_of(8) => {
                if t < m - m % 4 {
                    Self::Pair
                } else {
                    Self::Block
                }
            }
            WeightType::Q4K | WeightType::Q5K | WeightType::Q6K if m >= TILED_MIN_ROWS => {
                Self::Tiled
            }
            _ => Self::Lanes,
        }
    }
}

/// Activation rows from which the AVX-512 path decodes a tile of 32-value blocks once for
/// all of them (`avx512_decoded`) rather than once per eight rows (`avx512::tile`).
const DECODED_MIN_ROWS: usize = 32;

/// The instruction sets the kernels come in, each a superset of the one before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// `reference`: any CPU.
    Scalar,
    /// AVX2 with FMA and F16C, a weight row at a time.
    Avx2,
    /// AVX2 plus AVX512-VNNI/VL for the blocks of 32 (`vpdpbusd` on 256 bits), a weight
    /// row at a time.
    Avx512Vnni,
    /// AVX512F/BW/VL/VNNI: sixteen weight rows at a time on 512 bits, every type (`avx512`).
    Avx512,
}

impl Isa {
    /// The best this CPU runs, detected once.
    pub fn detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::OnceLock;
            static ISA: OnceLock<Isa> = OnceLock::new();
            *ISA.get_or_init(|| {
                let avx2 = is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c");
                let vnni =
                    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl");
                let wide =
                    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
                match (avx2, vnni, wide) {
                    (true, true, true) => Isa::Avx512,
                    (true, true, false) => Isa::Avx512Vnni,
                    (true, false, _) => Isa::Avx2,
                    _ => Isa::Scalar,
                }
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Scalar
    }

    /// Every set this CPU runs, the scalar one first.
    pub fn available() -> Vec<Self> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni, Isa::Avx512]
            .into_iter()
            .filter(|&i| i <= Self::detected())
            .collect()
    }
}

/// One weight row against activation rows `t0..t0 + tn` (all in `order`), on `isa`
/// (which the CPU has).
#[allow(clippy::too_many_arguments)]
fn row_tile(
    isa: Isa,
    order: SumOrder,
    wt: WeightType,
    w: &[u8],
    a: &QuantizedActs,
    t0: usize,
    tn: usize,
    out: &mut [f32; TILE],
) {
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 {
        // SAFETY: `isa` is at most what was detected; the caller checked the lengths.
        unsafe { avx2::row_tile(isa >= Isa::Avx512Vnni, order, wt, w, a, t0, tn, out) };
        return;
    }
    let _ = isa;
    for t in 0..tn {
        out[t] = reference::dot_ordered(order, wt, w, a, t0 + t);
    }
}

/// Why a product cannot be taken.
pub fn check(
    wt: WeightType,
    w_len: usize,
    n: usize,
    k: usize,
    x_len: usize,
) -> Result<usize, String> {
    if !k.is_multiple_of(wt.block()) {
        return Err(format!(
            "{wt:?} rows of {k} values are not whole blocks of {}",
            wt.block()
        ));
    }
    let row_bytes = k / wt.block() * wt.block_bytes();
    if w_len != n * row_bytes {
        return Err(format!(
            "{wt:?} weight of {w_len} bytes is not {n} rows of {row_bytes}"
        ));
    }
    if !x_len.is_multiple_of(k) {
        return Err(format!("{x_len} activations are not rows of {k}"));
    }
    Ok(x_len / k)
}

/// `dst[m×n] = x[m×k] · Wᵀ` where `w` holds `n` rows of `k/block` blocks of `wt`, weight
/// rows split over `parallel`, on the best instruction set the CPU has (the AVX-512
/// tiles give the row kernels' results to the bit). Panics when `check` fails.
pub fn matmul(
    wt: WeightType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    parallel: Parallel<'_>,
) -> Vec<f32> {
    matmul_on_isa(Isa::detected(), wt, w, n, k, x, parallel)
}

/// `matmul` on a chosen instruction set (tests and benchmarks compare them), lowered to
/// what the CPU has.
pub fn matmul_on_isa(
    isa: Isa,
    wt: WeightType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    parallel: Parallel<'_>,
) -> Vec<f32> {
    let m = match check(wt, w.len(), n, k, x.len()) {
        Ok(m) => m,
        Err(e) => panic!("q8::matmul: {e}"),
    };
    let acts = acts::quantize(wt.act_format(), x, k);
    let mut dst = vec![0f32; m * n];
    matmul_quantized(isa, wt, w, n, &acts, m, &mut dst, parallel);
    dst
}

/// `dst[m×n]` from activations already quantized for `wt` (see `acts::quantize`), on `isa`
/// lowered to what the CPU has. Panics unless `w` is `n` rows of `acts.k` values, `acts`
/// holds `m` rows and `dst` `m·n` values.
#[allow(clippy::too_many_arguments)]
pub fn matmul_quantized(
    isa: Isa,
    wt: WeightType,
    w: &[u8],
    n: usize,
    acts: &QuantizedActs,
    m: usize,
    dst: &mut [f32],
    parallel: Parallel<'_>,
) {
    let isa = isa.min(Isa::detected());
    let k = acts.k;
    let row_bytes = k / wt.block() * wt.block_bytes();
    assert!(w.len() == n * row_bytes && acts.qs.len() == m * k && dst.len() == m * n);
    // The kernels read these without bounds checks: activations built by hand (the
    // fields are public) must have the shape `acts::quantize` gives them.
    let blocks = m * k / acts.format.block().max(1);
    let q8_32 = matches!(acts.format, ActFormat::Q8_0 | ActFormat::Q8_1);
    assert!(
        acts.format == wt.act_format()
            && k.is_multiple_of(wt.block())
            && acts.d.len() == blocks
            && (!q8_32 || acts.sums.len() == blocks)
            && (acts.format != ActFormat::Q8_1 || acts.s.len() == blocks)
            && (acts.format != ActFormat::Q8K || acts.bsums.len() == m * k / 16),
        "q8::matmul_quantized: {:?} activations of {k} do not fit {wt:?} weights",
        acts.format
    );
    // The AVX-512 tiles of the signed 32-value types take the activations as unsigned
    // bytes (`avx512::tile_32`): one copy here, O(m·k) against the product's O(m·n·k).
    let unsigned;
    let tile_acts = if isa == Isa::Avx512
        && matches!(wt, WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0)
    {
        unsigned = acts::unsigned_copy(acts);
        &unsigned
    } else {
        acts
    };
    // Activation rows per pass of the weight tiles, about 128 KiB of them: the chunk stays
    // in L2 while a work range's tiles go over it, where each tile walking all `m` rows
    // streamed them from L3 again (a 2,000-token prompt's rows of 576 are 1.15 MB).
    let chunk = ((128 << 10) / k.max(1)).max(8) / 8 * 8;
    let dst_ptr = dst.as_mut_ptr() as usize;
    // The pool splits whole tiles of weight rows (a range of single rows would leave a
    // partial tile at each split).
    let unit = if isa == Isa::Avx512 { 16 } else { 1 };
    let work = |units: std::ops::Range<usize>| {
        let rows = units.start * unit..n.min(units.end * unit);
        // SAFETY: each weight row's outputs (column r of every dst row) are written by
        // exactly one work range; dst outlives the pool call.
        let dst = dst_ptr as *mut f32;
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 && m == 1 && wt == WeightType::Q6K {
            // One activation row: the weight rows in memory order (`avx512_rows`).
            for r in rows {
                // SAFETY: the CPU has AVX-512; row `r` is whole (checked above).
                unsafe {
                    *dst.add(r) = avx512_rows::dot_q6k(w.as_ptr().add(r * row_bytes), acts, 0)
                };
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 {
            let mut out = [[0f32; avx512::ROWS]; avx512::MAX_ACTS];
            // Prompts of 32-value blocks: each tile decoded once per chunk, then two
            // activation rows at a time with their sums in registers (`avx512_decoded`).
            let mut decoded = (wt.block() == 32 && m >= DECODED_MIN_ROWS)
                .then(|| avx512_decoded::Decoded32::new(wt));
            for c0 in (0..m).step_by(chunk) {
                let c1 = m.min(c0 + chunk);
                for r0 in rows.clone().step_by(avx512::ROWS) {
                    // A short last tile repeats its last row (computed, not stored).
                    let valid = avx512::ROWS.min(rows.end - r0);
                    let rp: [*const u8; avx512::ROWS] =
                        std::array::from_fn(|r| w[(r0 + r.min(valid - 1)) * row_bytes..].as_ptr());
                    // SAFETY (the kernels below): the CPU has AVX-512 (`isa` is at most what
                    // was detected); every row pointer starts a whole weight row of `k`
                    // values; the signed 32-value types get the unsigned copy they ask for.
                    if let Some(dec) = decoded.as_mut() {
                        unsafe { dec.decode(&rp, k / 32) };
                    }
                    let mut t0 = c0;
                    while t0 < c1 {
                        let tn = match (c1 - t0, &decoded) {
                            (2.., Some(_)) => 2,
                            (8.., None) => 8,
                            (4..=7, None) => 4,
                            (2 | 3, None) => 2,
                            _ => 1,
                        };
                        match &decoded {
                            Some(dec) => unsafe { dec.rows(tile_acts, t0, tn, &mut out) },
                            None => {
                                // Tiles of 8 and 4 lie inside the whole fours, 2 and 1
                                // after them (chunks are whole eights): one order a tile.
                                let order = SumOrder::of(wt, n, m, t0);
                                unsafe { avx512::tile(wt, order, &rp, tile_acts, t0, tn, &mut out) }
                            }
                        }
                        for t in 0..tn {
                            for r in 0..valid {
                                unsafe { *dst.add((t0 + t) * n + r0 + r) = out[t][r] };
                            }
                        }
                        t0 += tn;
                    }
                }
            }
            return;
        }
        for t0 in (0..m).step_by(TILE) {
            let tn = TILE.min(m - t0);
            // A whole tile of four lies inside the whole fours, a short one after them.
            let order = SumOrder::of(wt, n, m, t0);
            for r in rows.clone() {
                let mut out = [0f32; TILE];
                row_tile(
                    isa,
                    order,
                    wt,
                    &w[r * row_bytes..(r + 1) * row_bytes],
                    acts,
                    t0,
                    tn,
                    &mut out,
                );
                for (t, v) in out.iter().enumerate().take(tn) {
                    unsafe { *dst.add((t0 + t) * n + r) = *v };
                }
            }
        }
    };
    // Small products are not worth waking the pool.
    let units = n.div_ceil(unit);
    if n * k * m < 64 * 1024 {
        work(0..units);
    } else {
        parallel(units, &work);
    }
}

#[cfg(test)]
mod tests;
