//! `x · Wᵀ` on the CPU, every f32 projection of the model, on hearth's one CPU pool
//! (threads.rs) rather than gemm's rayon pool: two pools on two cores thrash.
//!
//! Few rows (a decode step): gemm 0.19 runs an m=1 product single-threaded and packs
//! W on every call, where such a step only needs W streamed once from memory. Here
//! every thread takes runs of W's rows and computes all of x's rows against each small
//! tile of them while it sits in L1: register tiles of up to 4 rows of x × 3 rows of W
//! (one row of W at a time below 4 rows of x, where the product is memory-bound), f32
//! FMA over k. Many rows (prefill chunks): gemm itself, single-threaded on each
//! thread's share of W's rows, where its packing pays off.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use crate::threads;

/// Row counts up to this go through hearth's kernel; larger ones through gemm.
pub const MAX_ROWS: usize = 64;

/// `x [m, k] · w [n, k]ᵀ (+ bias [n])`, the `Linear` product. Uses the threaded
/// kernel for f32 CPU tensors with few rows, candle's matmul otherwise.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let fast = x.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && w.rank() == 2
        && rows > 0
        && (rows > MAX_ROWS || threads::has_avx2_fma());
    let y = if fast {
        let k = *dims.last().unwrap_or(&0);
        let x2 = x.reshape((rows, k))?.contiguous()?;
        let y = x2.apply_op2_no_bwd(&w.contiguous()?, &Matmul)?;
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = w.dim(0)?;
        }
        y.reshape(out_dims)?
    } else {
        let wt = w.t()?;
        match dims.len() {
            3 => x.broadcast_matmul(&wt)?,
            _ => x.matmul(&wt)?,
        }
    };
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

struct Matmul;

impl CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        "hearth-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("matmul: x is [{m}, {k}] but w is [{n}, {k2}]");
        }
        let x = match xs {
            CpuStorage::F32(v) => &v[xl.start_offset()..xl.start_offset() + m * k],
            _ => candle_core::bail!("matmul: x must be f32"),
        };
        let w = match ws {
            CpuStorage::F32(v) => &v[wl.start_offset()..wl.start_offset() + n * k],
            _ => candle_core::bail!("matmul: w must be f32"),
        };
        let mut out = vec![0f32; m * n];
        if m > MAX_ROWS {
            gemm_xwt(x, w, &mut out, m, n, k);
        } else {
            matmul_xwt(x, w, &mut out, m, n, k);
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// Raw pointer wrapper so disjoint output ranges can be written from several threads.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`, threads splitting n.
pub fn matmul_xwt(x: &[f32], w: &[f32], out: &mut [f32], m: usize, n: usize, k: usize) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    let out_ptr = OutPtr(out.as_mut_ptr());
    // Runs of 48 rows of W (a multiple of the 3-row tile): about 110 KB at k=576, so
    // a thread's next run streams while fast threads absorb stragglers.
    let run = 48;
    let n_runs = n.div_ceil(run);
    threads::parallel_chunks(n_runs, 1, |runs| {
        let o = out_ptr;
        let j0 = runs.start * run;
        let j1 = (runs.end * run).min(n);
        // SAFETY: each call writes only columns j0..j1 of `out`, disjoint across calls;
        // the bounds were checked above.
        unsafe { rows_range(x, w, o.0, m, n, k, j0, j1) }
    });
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` for many rows: gemm on each thread's columns.
pub fn gemm_xwt(x: &[f32], w: &[f32], out: &mut [f32], m: usize, n: usize, k: usize) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    let out_ptr = OutPtr(out.as_mut_ptr());
    // Two column blocks per thread, multiples of 16 (gemm's micro-tile width).
    let block = n.div_ceil(threads::num_threads() * 2).div_ceil(16) * 16;
    threads::parallel_chunks(n.div_ceil(block), 1, |blocks| {
        let o = out_ptr;
        for b in blocks {
            let j0 = b * block;
            let cols = block.min(n - j0);
            // SAFETY: columns j0..j0+cols of `out` belong to this block alone; rhs is
            // W's rows j0.. read as a [k, cols] matrix (row stride 1, column stride k).
            unsafe {
                gemm::gemm(
                    m,
                    cols,
                    k,
                    o.0.add(j0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr().add(j0 * k),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        }
    });
}

#[allow(clippy::too_many_arguments)]
unsafe fn rows_range(
    x: &[f32],
    w: &[f32],
    out: *mut f32,
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if threads::has_avx2_fma() {
        avx2::rows_range(x.as_ptr(), w.as_ptr(), out, m, n, k, j0, j1);
        return;
    }
    for j in j0..j1 {
        let wr = &w[j * k..(j + 1) * k];
        for i in 0..m {
            let xr = &x[i * k..(i + 1) * k];
            *out.add(i * n + j) = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One register tile: MR rows of x against NR rows of w, over all of k.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const MR: usize, const NR: usize>(
        x: *const f32,
        w: *const f32,
        out: *mut f32,
        k: usize,
        n: usize,
        i0: usize,
        j0: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let kv = k & !7;
        // The NR rows of W are read as NR interleaved streams, which the hardware
        // prefetcher follows poorly: the first row tile also prefetches the next W
        // tile (one contiguous run), a line per step, spread over the loop.
        let next = if i0 == 0 && j0 + 2 * NR <= n {
            w.add((j0 + NR) * k)
        } else {
            std::ptr::null()
        };
        let mut p = 0;
        while p < kv {
            if !next.is_null() {
                _mm_prefetch(next.add(p * NR).cast::<i8>(), _MM_HINT_T0);
            }
            let mut wv = [_mm256_setzero_ps(); NR];
            for (j, v) in wv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(w.add((j0 + j) * k + p));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x.add((i0 + i) * k + p));
                for (j, a) in row.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(xv, wv[j], *a);
                }
            }
            p += 8;
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, a) in row.iter().enumerate() {
                let mut s = hsum(*a);
                for q in kv..k {
                    s += *x.add((i0 + i) * k + q) * *w.add((j0 + j) * k + q);
                }
                *out.add((i0 + i) * n + j0 + j) = s;
            }
        }
    }

    /// Row `j` of W against the MR rows of x, four accumulators each so the FMA
    /// latency chain does not bound a memory-bound loop.
    #[inline(always)]
    unsafe fn row_dots<const MR: usize>(
        x: *const f32,
        w: *const f32,
        out: *mut f32,
        k: usize,
        n: usize,
        j: usize,
    ) {
        let wr = w.add(j * k);
        let mut acc = [[_mm256_setzero_ps(); 4]; MR];
        let k32 = k & !31;
        let mut p = 0;
        while p < k32 {
            for u in 0..4 {
                let wv = _mm256_loadu_ps(wr.add(p + 8 * u));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(i * k + p + 8 * u));
                    a[u] = _mm256_fmadd_ps(xv, wv, a[u]);
                }
            }
            p += 32;
        }
        while p + 8 <= k {
            let wv = _mm256_loadu_ps(wr.add(p));
            for (i, a) in acc.iter_mut().enumerate() {
                a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i * k + p)), wv, a[0]);
            }
            p += 8;
        }
        for (i, a) in acc.iter().enumerate() {
            let v = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            let mut s = hsum(v);
            for q in p..k {
                s += *x.add(i * k + q) * *wr.add(q);
            }
            *out.add(i * n + j) = s;
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn column_tile<const NR: usize>(
        x: *const f32,
        w: *const f32,
        out: *mut f32,
        m: usize,
        n: usize,
        k: usize,
        j: usize,
    ) {
        let mut i = 0;
        while i + 4 <= m {
            tile::<4, NR>(x, w, out, k, n, i, j);
            i += 4;
        }
        match m - i {
            3 => tile::<3, NR>(x, w, out, k, n, i, j),
            2 => tile::<2, NR>(x, w, out, k, n, i, j),
            1 => tile::<1, NR>(x, w, out, k, n, i, j),
            _ => {}
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows_range(
        x: *const f32,
        w: *const f32,
        out: *mut f32,
        m: usize,
        n: usize,
        k: usize,
        j0: usize,
        j1: usize,
    ) {
        let mut j = j0;
        if m <= 3 {
            // Memory-bound: read W strictly in order, one row at a time. The hardware
            // prefetcher streams one sequence at about twice the rate it streams
            // several rows interleaved (measured here: ~28 vs ~17 GB/s on one core).
            while j < j1 {
                match m {
                    1 => row_dots::<1>(x, w, out, k, n, j),
                    2 => row_dots::<2>(x, w, out, k, n, j),
                    _ => row_dots::<3>(x, w, out, k, n, j),
                }
                j += 1;
            }
            return;
        }
        while j + 3 <= j1 {
            column_tile::<3>(x, w, out, m, n, k, j);
            j += 3;
        }
        while j < j1 {
            column_tile::<1>(x, w, out, m, n, k, j);
            j += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_matmul_on_odd_shapes() {
        let dev = Device::Cpu;
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 7, 13),
            (2, 50, 33),
            (3, 97, 64),
            (5, 200, 576),
            (16, 100, 72),
            (64, 31, 17),
            (65, 40, 24),
            (300, 130, 576),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let want = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let got = linear(&x, &w, Some(&b)).unwrap();
            let diff = (want - got)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-3, "({m},{n},{k}): max diff {diff}");
        }
    }

    #[test]
    fn three_dimensional_input_keeps_its_leading_dims() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
        let got = linear(&x, &w, None).unwrap();
        assert_eq!(got.dims(), &[2, 3, 5]);
        let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let diff = (want - got)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4);
    }
}
