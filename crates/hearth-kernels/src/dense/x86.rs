//! The register tiles on x86-64: R rows of packed activations against one panel of W
//! (mod.rs's layout) over the whole of k, the accumulators held in registers from the
//! first step to the store.
//!
//! AVX-512: 12 rows × 32 outputs = 24 of the 32 zmm registers, plus the panel's two
//! vectors of the step and a broadcast; per step 2 loads of W and 12 broadcasts feed 24
//! FMAs. bf16 weights with AVX512-BF16: `vdpbf16ps` multiplies a pair of k steps per
//! instruction (W's panel holds each row's pair adjacent; the activation pair is one
//! broadcast u32). AVX2: 6 rows × 16 outputs (half a panel per pass) = 12 of the 16 ymm
//! registers; its bf16 tile widens each pair by a shift and a mask.
//!
//! The tiles are `#[inline(always)]` without features of their own: only the entry
//! points, which enable them, call them.

use std::arch::x86_64::*;

pub(super) const ROWS_AVX512: usize = 12;
pub(super) const ROWS_AVX2: usize = 6;

/// `tile::<r>(args)` for a run-time `r` in the listed range (the callers' `r` is
/// always 1..=their tile height).
macro_rules! with_rows {
    ($r:expr, [$($n:literal),*], $tile:ident $args:tt) => {
        match $r {
            $($n => $tile::<$n> $args,)*
            _ => {}
        }
    };
}

#[inline(always)]
fn mask16(cols: usize) -> __mmask16 {
    if cols >= 16 {
        0xffff
    } else {
        ((1u32 << cols) - 1) as __mmask16
    }
}

/// Writes the first `cols` outputs of each of the R rows.
#[inline(always)]
unsafe fn store_512<const R: usize>(acc: &[[__m512; 2]; R], out: *mut f32, n: usize, cols: usize) {
    for (i, a) in acc.iter().enumerate() {
        let o = out.add(i * n);
        if cols >= 32 {
            _mm512_storeu_ps(o, a[0]);
            _mm512_storeu_ps(o.add(16), a[1]);
        } else {
            _mm512_mask_storeu_ps(o, mask16(cols), a[0]);
            if cols > 16 {
                _mm512_mask_storeu_ps(o.add(16), mask16(cols - 16), a[1]);
            }
        }
    }
}

#[inline(always)]
unsafe fn tile_f32_avx512<const R: usize>(
    x: *const f32,
    w: *const f32,
    k: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in 0..k {
        let w0 = _mm512_load_ps(w.add(p * 32));
        let w1 = _mm512_load_ps(w.add(p * 32 + 16));
        for (i, a) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*x.add(p * R + i));
            a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
            a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
        }
    }
    store_512(&acc, out, n, cols);
}

/// Every row block of `x` (packed in blocks of 12) against the f32 panel at `w`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn panel_f32_avx512(
    x: *const f32,
    m: usize,
    k: usize,
    w: *const f32,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let mut i = 0;
    while i < m {
        let r = ROWS_AVX512.min(m - i);
        let (xb, ob) = (x.add(i * k), out.add(i * n));
        with_rows!(
            r,
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            tile_f32_avx512(xb, w, k, ob, n, cols)
        );
        i += r;
    }
}

#[inline(always)]
unsafe fn tile_bf16_avx512<const R: usize>(
    x: *const u32,
    w: *const u16,
    k2: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for q in 0..k2 {
        let w0: __m512bh =
            std::mem::transmute::<__m512i, __m512bh>(_mm512_load_si512(w.add(q * 64).cast()));
        let w1: __m512bh =
            std::mem::transmute::<__m512i, __m512bh>(_mm512_load_si512(w.add(q * 64 + 32).cast()));
        for (i, a) in acc.iter_mut().enumerate() {
            let xv = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                *x.add(q * R + i) as i32
            ));
            a[0] = _mm512_dpbf16_ps(a[0], w0, xv);
            a[1] = _mm512_dpbf16_ps(a[1], w1, xv);
        }
    }
    store_512(&acc, out, n, cols);
}

/// Every row block of `x` (bf16 pairs, blocks of 12) against the bf16 panel at `w`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn panel_bf16_avx512(
    x: *const u32,
    m: usize,
    k2: usize,
    w: *const u16,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let mut i = 0;
    while i < m {
        let r = ROWS_AVX512.min(m - i);
        let (xb, ob) = (x.add(i * k2), out.add(i * n));
        with_rows!(
            r,
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            tile_bf16_avx512(xb, w, k2, ob, n, cols)
        );
        i += r;
    }
}

/// Writes the first `cols` (≤ 16) outputs of each of the R rows.
#[inline(always)]
unsafe fn store_256<const R: usize>(acc: &[[__m256; 2]; R], out: *mut f32, n: usize, cols: usize) {
    for (i, a) in acc.iter().enumerate() {
        let o = out.add(i * n);
        if cols >= 16 {
            _mm256_storeu_ps(o, a[0]);
            _mm256_storeu_ps(o.add(8), a[1]);
        } else {
            let mut t = [0f32; 16];
            _mm256_storeu_ps(t.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(t.as_mut_ptr().add(8), a[1]);
            std::ptr::copy_nonoverlapping(t.as_ptr(), o, cols);
        }
    }
}

/// Half a panel (16 outputs at `w`, a row of the panel being 32 apart).
#[inline(always)]
unsafe fn tile_f32_avx2<const R: usize>(
    x: *const f32,
    w: *const f32,
    k: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for p in 0..k {
        let w0 = _mm256_load_ps(w.add(p * 32));
        let w1 = _mm256_load_ps(w.add(p * 32 + 8));
        for (i, a) in acc.iter_mut().enumerate() {
            let xv = _mm256_broadcast_ss(&*x.add(p * R + i));
            a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
            a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
        }
    }
    store_256(&acc, out, n, cols);
}

/// Every row block of `x` (packed in blocks of 6) against the f32 panel at `w`, one
/// half of the panel at a time.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn panel_f32_avx2(
    x: *const f32,
    m: usize,
    k: usize,
    w: *const f32,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    for h in 0..2 {
        let c = cols.saturating_sub(16 * h).min(16);
        if c == 0 {
            break;
        }
        let mut i = 0;
        while i < m {
            let r = ROWS_AVX2.min(m - i);
            let (xb, wh, ob) = (x.add(i * k), w.add(16 * h), out.add(i * n + 16 * h));
            with_rows!(r, [1, 2, 3, 4, 5, 6], tile_f32_avx2(xb, wh, k, ob, n, c));
            i += r;
        }
    }
}

/// Half a bf16 panel (16 rows' pairs at `w`, a pair step being 64 values apart)
/// against f32 activations already rounded to bf16 (`2 * k2` steps).
#[inline(always)]
unsafe fn tile_bf16_avx2<const R: usize>(
    x: *const f32,
    w: *const u16,
    k2: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let high = _mm256_set1_epi32(0xffff_0000_u32 as i32);
    for q in 0..k2 {
        // Each 32-bit lane is one row's pair: the first value in its low half.
        let v0 = _mm256_load_si256(w.add(q * 64).cast());
        let v1 = _mm256_load_si256(w.add(q * 64 + 16).cast());
        let e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
        let e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
        for (i, a) in acc.iter_mut().enumerate() {
            let xv = _mm256_broadcast_ss(&*x.add(2 * q * R + i));
            a[0] = _mm256_fmadd_ps(xv, e0, a[0]);
            a[1] = _mm256_fmadd_ps(xv, e1, a[1]);
        }
        let o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, high));
        let o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, high));
        for (i, a) in acc.iter_mut().enumerate() {
            let xv = _mm256_broadcast_ss(&*x.add((2 * q + 1) * R + i));
            a[0] = _mm256_fmadd_ps(xv, o0, a[0]);
            a[1] = _mm256_fmadd_ps(xv, o1, a[1]);
        }
    }
    store_256(&acc, out, n, cols);
}

/// Every row block of `x` (bf16-rounded f32, blocks of 6) against the bf16 panel at
/// `w`, one half of the panel at a time.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn panel_bf16_avx2(
    x: *const f32,
    m: usize,
    k2: usize,
    w: *const u16,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let kp = 2 * k2;
    for h in 0..2 {
        let c = cols.saturating_sub(16 * h).min(16);
        if c == 0 {
            break;
        }
        let mut i = 0;
        while i < m {
            let r = ROWS_AVX2.min(m - i);
            let (xb, wh, ob) = (x.add(i * kp), w.add(32 * h), out.add(i * n + 16 * h));
            with_rows!(r, [1, 2, 3, 4, 5, 6], tile_bf16_avx2(xb, wh, k2, ob, n, c));
            i += r;
        }
    }
}
