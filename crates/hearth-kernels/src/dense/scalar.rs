//! The tiles in plain Rust, for any CPU: the same layouts and loop order as x86.rs,
//! 4 rows × 32 outputs in arrays the compiler keeps in (SSE) registers where it can.

use super::PANEL;

pub(super) const ROWS: usize = 4;

unsafe fn store<const R: usize>(acc: &[[f32; PANEL]; R], out: *mut f32, n: usize, cols: usize) {
    for (i, a) in acc.iter().enumerate() {
        std::ptr::copy_nonoverlapping(a.as_ptr(), out.add(i * n), cols);
    }
}

unsafe fn tile_f32<const R: usize>(
    x: *const f32,
    w: *const f32,
    k: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let mut acc = [[0f32; PANEL]; R];
    for p in 0..k {
        let wr = std::slice::from_raw_parts(w.add(p * PANEL), PANEL);
        for (i, a) in acc.iter_mut().enumerate() {
            let xv = *x.add(p * R + i);
            for (o, &wv) in a.iter_mut().zip(wr) {
                *o += xv * wv;
            }
        }
    }
    store(&acc, out, n, cols);
}

/// Every row block of `x` (packed in blocks of [`ROWS`]) against the f32 panel at `w`.
///
/// # Safety
/// `x`, `w` and `out` as mod.rs's `panel` lays them out.
pub(super) unsafe fn panel_f32(
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
        let r = ROWS.min(m - i);
        let (xb, ob) = (x.add(i * k), out.add(i * n));
        match r {
            1 => tile_f32::<1>(xb, w, k, ob, n, cols),
            2 => tile_f32::<2>(xb, w, k, ob, n, cols),
            3 => tile_f32::<3>(xb, w, k, ob, n, cols),
            _ => tile_f32::<4>(xb, w, k, ob, n, cols),
        }
        i += r;
    }
}

unsafe fn tile_bf16<const R: usize>(
    x: *const f32,
    w: *const u16,
    k2: usize,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let mut acc = [[0f32; PANEL]; R];
    let widen = |b: u16| f32::from_bits((b as u32) << 16);
    for q in 0..k2 {
        let pairs = std::slice::from_raw_parts(w.add(q * 2 * PANEL), 2 * PANEL);
        for (i, a) in acc.iter_mut().enumerate() {
            let (x0, x1) = (*x.add(2 * q * R + i), *x.add((2 * q + 1) * R + i));
            for (o, pair) in a.iter_mut().zip(pairs.chunks_exact(2)) {
                *o += x0 * widen(pair[0]);
                *o += x1 * widen(pair[1]);
            }
        }
    }
    store(&acc, out, n, cols);
}

/// Every row block of `x` (bf16-rounded f32 over `2 * k2` steps, blocks of [`ROWS`])
/// against the bf16 panel at `w`.
///
/// # Safety
/// As [`panel_f32`].
pub(super) unsafe fn panel_bf16(
    x: *const f32,
    m: usize,
    k2: usize,
    w: *const u16,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    let kp = 2 * k2;
    let mut i = 0;
    while i < m {
        let r = ROWS.min(m - i);
        let (xb, ob) = (x.add(i * kp), out.add(i * n));
        match r {
            1 => tile_bf16::<1>(xb, w, k2, ob, n, cols),
            2 => tile_bf16::<2>(xb, w, k2, ob, n, cols),
            3 => tile_bf16::<3>(xb, w, k2, ob, n, cols),
            _ => tile_bf16::<4>(xb, w, k2, ob, n, cols),
        }
        i += r;
    }
}
