//! The CPU side of the op: work items (sequence, kv head, query tile) over the barrier
//! pool, each run by tiled.rs's packed kernel (prefill) or kernel.rs's streaming one.

use super::*;

#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) h: usize,
    pub(super) kvh: usize,
    pub(super) d: usize,
    pub(super) bs: usize,
}

/// The element types the cache may hold, read as f32.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    fn load(src: &[Self], dst: &mut [f32]);
    fn store(src: &[f32], dst: &mut [Self]);
    /// f32 rows can be used in place, without a copy.
    fn as_f32(_src: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_src: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    /// `load` for `src.len() % 8 == 0` on a CPU with AVX2 and F16C (the caller checks).
    ///
    /// # Safety
    /// `dst` has room for `src.len()` values.
    unsafe fn widen_avx2(src: &[Self], dst: *mut f32) {
        Self::load(src, std::slice::from_raw_parts_mut(dst, src.len()))
    }
    /// One value as f32 (exact for every cache type).
    fn widen(self) -> f32;
    /// Eight values from `p` as f32 lanes, for the streaming decode kernel, which reads
    /// half-precision caches in place. Only inlined into functions that enable AVX2 and
    /// F16C (kernel.rs's `Avx2`), whose callers check the CPU has them.
    ///
    /// # Safety
    /// `p` points to 8 readable values; the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen values from `p` as f32 lanes (AVX-512F enabled by the caller).
    ///
    /// # Safety
    /// `p` points to 16 readable values; the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// Eight values from `lo` in lanes 0–7 and eight from `hi` in lanes 8–15.
    ///
    /// # Safety
    /// Both point to 8 readable values; the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8x2(lo: *const Self, hi: *const Self) -> std::arch::x86_64::__m512;
}

impl Element for f32 {
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn store(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn as_f32(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
    fn as_f32_mut(src: &mut [f32]) -> Option<&mut [f32]> {
        Some(src)
    }
    fn widen(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8x2(lo: *const f32, hi: *const f32) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let lo = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(lo)));
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            lo,
            _mm256_castps_pd(_mm256_loadu_ps(hi)),
        ))
    }
}

impl Element for f16 {
    fn load(src: &[f16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen_avx2(src: &[f16], dst: *mut f32) {
        tiled::widen_f16(src.as_ptr().cast(), dst, src.len())
    }
    fn store(src: &[f32], dst: &mut [f16]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src)
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // vcvtph2ps: exact, as every f16 is an f32.
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8x2(lo: *const f16, hi: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let lo = _mm256_castsi128_si256(_mm_loadu_si128(lo.cast()));
        _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(lo, _mm_loadu_si128(hi.cast())))
    }
}

impl Element for bf16 {
    fn load(src: &[bf16], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn widen_avx2(src: &[bf16], dst: *mut f32) {
        tiled::widen_bf16(src.as_ptr().cast(), dst, src.len())
    }
    fn store(src: &[f32], dst: &mut [bf16]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src)
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // A bf16's bits are the top half of its f32's.
        let w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())), 16);
        _mm256_castsi256_ps(w)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())));
        _mm512_castsi512_ps(w)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8x2(lo: *const bf16, hi: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let lo = _mm256_castsi128_si256(_mm_loadu_si128(lo.cast()));
        let h = _mm256_inserti128_si256::<1>(lo, _mm_loadu_si128(hi.cast()));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

#[derive(Clone, Copy)]
pub(super) struct OutPtr<T>(pub(super) *mut T);
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

/// One unit of CPU work: a tile of one sequence's queries against one kv head.
#[derive(Clone, Copy)]
pub(super) struct Item {
    pub(super) seq: u32,
    pub(super) kv_head: u32,
    pub(super) q_begin: u32,
    pub(super) q_end: u32,
}

/// An item's rows and the keys they see: row r is query token `t0 + r / g` and head
/// `kv_head · g + r % g` (a GQA group's heads side by side), at position `pos(r)`.
pub(super) struct ItemRows<'a> {
    g: usize,
    pub(super) kv_head: usize,
    t0: usize,
    pub(super) rows: usize,
    /// Row 0's position.
    first: usize,
    /// One past the last key any row sees.
    pub(super) kv_end: usize,
    /// The sequence's block table.
    pub(super) table: &'a [u32],
}

impl<'a> ItemRows<'a> {
    pub(super) fn new(meta: &'a AttentionMetadata, dims: Dims, it: Item) -> Self {
        let g = dims.h / dims.kvh;
        let s = it.seq as usize;
        let (qs0, qs1) = (
            meta.query_start[s] as usize,
            meta.query_start[s + 1] as usize,
        );
        let first_pos = meta.seq_lens[s] as usize - (qs1 - qs0);
        let (t0, t1) = (it.q_begin as usize, it.q_end as usize);
        let rows = (t1 - t0) * g;
        let first = first_pos + (t0 - qs0);
        ItemRows {
            g,
            kv_head: it.kv_head as usize,
            t0,
            rows,
            first,
            kv_end: first + (rows - 1) / g + 1,
            table: &meta.block_tables[s * meta.max_blocks..(s + 1) * meta.max_blocks],
        }
    }

    pub(super) fn pos(&self, r: usize) -> usize {
        self.first + r / self.g
    }

    /// Where row r's `d` values are in the step's `[T, heads, d]` queries and output.
    pub(super) fn offset(&self, r: usize, dims: Dims) -> usize {
        let (tok, head) = (self.t0 + r / self.g, self.kv_head * self.g + r % self.g);
        (tok * dims.h + head) * dims.d
    }

    /// Each row's accumulator (`acc`, rows `d` apart) over its softmax sum, into `out`
    /// through `tmp` (`d` values).
    ///
    /// # Safety
    /// `out` has room for every (token, head) row and no other thread writes these.
    pub(super) unsafe fn store<Q: Element>(
        &self,
        dims: Dims,
        acc: &[f32],
        lstat: &[f32],
        tmp: &mut [f32],
        out: *mut Q,
    ) {
        let d = dims.d;
        for r in 0..self.rows {
            let inv = 1.0 / lstat[r];
            for (x, a) in tmp.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                *x = a * inv;
            }
            let dst = std::slice::from_raw_parts_mut(out.add(self.offset(r, dims)), d);
            Q::store(tmp, dst);
        }
    }
}

/// Which CPU kernel runs the items: the fastest this CPU has for each (`Auto`), or one
/// forced for every item, so tests compare each SIMD path with the scalar one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CpuKernel {
    Auto,
    #[cfg_attr(not(test), allow(dead_code))]
    Scalar,
    /// kernel.rs's streaming AVX2 kernel (decode items' path) for every item.
    #[cfg(target_arch = "x86_64")]
    #[cfg_attr(not(test), allow(dead_code))]
    StreamAvx2,
    /// Its AVX-512 twin, bit-identical.
    #[cfg(target_arch = "x86_64")]
    #[cfg_attr(not(test), allow(dead_code))]
    StreamAvx512,
    #[cfg(target_arch = "x86_64")]
    #[cfg_attr(not(test), allow(dead_code))]
    TiledAvx2,
    #[cfg(target_arch = "x86_64")]
    #[cfg_attr(not(test), allow(dead_code))]
    TiledAvx512,
}

/// Queries and output in `Q`, the caches in `T`.
pub(super) fn attend<Q: Element, T: Element>(
    q: &[Q],
    k: &[T],
    v: &[T],
    meta: &AttentionMetadata,
    dims: Dims,
    scale: f32,
    choice: CpuKernel,
) -> Vec<Q> {
    let t = meta.num_tokens();
    let mut out: Vec<Q> = Vec::with_capacity(t * dims.h * dims.d);
    let mut items = Vec::new();
    for s in 0..meta.num_seqs() {
        let (a, b) = (meta.query_start[s], meta.query_start[s + 1]);
        let mut q0 = a;
        while q0 < b {
            let q1 = (q0 + QUERY_TILE as u32).min(b);
            for kv_head in 0..dims.kvh as u32 {
                items.push(Item {
                    seq: s as u32,
                    kv_head,
                    q_begin: q0,
                    q_end: q1,
                });
            }
            q0 = q1;
        }
    }
    // Costliest first (most keys: a prompt's last query tiles see the most), so the
    // dynamic split ends evenly.
    items.sort_by_key(|it| {
        let s = it.seq as usize;
        let after_last = meta.seq_lens[s] - (meta.query_start[s + 1] - it.q_end);
        std::cmp::Reverse(after_last)
    });
    let ptr = OutPtr(out.as_mut_ptr());
    threads::parallel_chunks(items.len(), 0, |range| {
        let p = ptr;
        for it in &items[range] {
            // SAFETY: each item writes the rows of its own (query, head) pairs, which no
            // other item writes; `out` has capacity for all of them.
            unsafe { run_item(q, k, v, meta, dims, scale, *it, p.0, choice) };
        }
    });
    // SAFETY: the items cover every (token, head) row exactly once.
    unsafe { out.set_len(t * dims.h * dims.d) };
    out
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[allow(clippy::too_many_arguments)]
unsafe fn run_item<Q: Element, T: Element>(
    q: &[Q],
    k: &[T],
    v: &[T],
    meta: &AttentionMetadata,
    dims: Dims,
    scale: f32,
    it: Item,
    out: *mut Q,
    choice: CpuKernel,
) {
    SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        let s: &mut Vec<f32> = &mut scratch;
        match choice {
            CpuKernel::Auto => {}
            CpuKernel::Scalar => {
                return item_kernel::<Q, T, kernel::Scalar>(q, k, v, meta, dims, scale, it, out, s)
            }
            #[cfg(target_arch = "x86_64")]
            CpuKernel::StreamAvx2 => {
                return item_kernel::<Q, T, kernel::Avx2>(q, k, v, meta, dims, scale, it, out, s)
            }
            #[cfg(target_arch = "x86_64")]
            CpuKernel::StreamAvx512 => {
                return item_kernel::<Q, T, kernel::Avx512>(q, k, v, meta, dims, scale, it, out, s)
            }
            #[cfg(target_arch = "x86_64")]
            CpuKernel::TiledAvx2 => {
                return tiled::item_kernel_avx2::<Q, T>(q, k, v, meta, dims, scale, it, out, s)
            }
            #[cfg(target_arch = "x86_64")]
            CpuKernel::TiledAvx512 => {
                return tiled::item_kernel_avx512::<Q, T>(q, k, v, meta, dims, scale, it, out, s)
            }
        }
        #[cfg(target_arch = "x86_64")]
        if (it.q_end - it.q_begin) as usize * (dims.h / dims.kvh) >= TILED_MIN_ROWS
            && dims.d.is_multiple_of(8)
            && tiled::available()
        {
            return if tiled::available_avx512() {
                tiled::item_kernel_avx512::<Q, T>(q, k, v, meta, dims, scale, it, out, s)
            } else {
                tiled::item_kernel_avx2::<Q, T>(q, k, v, meta, dims, scale, it, out, s)
            };
        }
        // F16C too: the streaming kernel widens half-precision caches as it reads them.
        #[cfg(target_arch = "x86_64")]
        if tiled::available() && dims.d.is_multiple_of(8) {
            return if tiled::available_avx512() {
                item_kernel::<Q, T, kernel::Avx512>(q, k, v, meta, dims, scale, it, out, s)
            } else {
                item_kernel::<Q, T, kernel::Avx2>(q, k, v, meta, dims, scale, it, out, s)
            };
        }
        item_kernel::<Q, T, kernel::Scalar>(q, k, v, meta, dims, scale, it, out, s)
    })
}

/// Prefetches `n` key and value rows of `d` elements, `stride` apart from `base`.
#[inline(always)]
pub(super) fn prefetch_rows<T>(k: &[T], v: &[T], base: usize, stride: usize, d: usize, n: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = d * std::mem::size_of::<T>();
        for j in 0..n {
            let at = base + j * stride;
            if at + d > k.len() || at + d > v.len() {
                return;
            }
            for off in (0..bytes).step_by(64) {
                // SAFETY: prefetching is a hint; the addresses are inside the caches.
                unsafe {
                    _mm_prefetch(k.as_ptr().add(at).cast::<i8>().add(off), _MM_HINT_T0);
                    _mm_prefetch(v.as_ptr().add(at).cast::<i8>().add(off), _MM_HINT_T0);
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (k, v, base, stride, d, n);
}

#[allow(clippy::too_many_arguments)]
unsafe fn item_kernel<Q: Element, T: Element, M: BlockMath>(
    q: &[Q],
    k: &[T],
    v: &[T],
    meta: &AttentionMetadata,
    dims: Dims,
    scale: f32,
    it: Item,
    out: *mut Q,
    scratch: &mut Vec<f32>,
) {
    let Dims { kvh, d, bs, .. } = dims;
    let item = ItemRows::new(meta, dims, it);
    let ItemRows {
        kv_head,
        rows,
        kv_end,
        table,
        ..
    } = item;
    let pos = |r: usize| item.pos(r);

    let need = rows * d * 2 + rows * bs + rows * 2 + d;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let (qbuf, rest) = scratch.split_at_mut(rows * d);
    let (acc, rest) = rest.split_at_mut(rows * d);
    let (scores, rest) = rest.split_at_mut(rows * bs);
    let (mstat, rest) = rest.split_at_mut(rows);
    let (lstat, rest) = rest.split_at_mut(rows);
    let tmp = &mut rest[..d];

    for r in 0..rows {
        let dst = &mut qbuf[r * d..(r + 1) * d];
        Q::load(&q[item.offset(r, dims)..][..d], dst);
        dst.iter_mut().for_each(|x| *x *= scale);
    }
    acc.fill(0.0);
    mstat.fill(f32::NEG_INFINITY);
    lstat.fill(0.0);

    let row_stride = kvh * d;
    let mut kp = [std::ptr::null::<T>(); MAX_BLOCK_SIZE];
    let mut vp = [std::ptr::null::<T>(); MAX_BLOCK_SIZE];
    let n_blocks = kv_end.div_ceil(bs);
    for (b, &block) in table.iter().enumerate().take(n_blocks) {
        let key0 = b * bs;
        let nk = bs.min(kv_end - key0);
        // Blocks are scattered through the cache, so the hardware prefetcher cannot see
        // the next one coming: ask for it (two ahead) while this one is computed.
        if let Some(&ahead) = table[..n_blocks].get(b + 2) {
            let base = (ahead as usize * bs * kvh + kv_head) * d;
            prefetch_rows(k, v, base, row_stride, d, bs.min(kv_end - (b + 2) * bs));
        }
        // This kv head's rows of the block, kv_heads · head_dim apart, read in place
        // in the cache's own type: the block math widens half-precision values in
        // registers as it loads them, where a copy of each row to f32 went through
        // `half`'s slice converter (an indirect call per 8 values).
        let base = (block as usize * bs * kvh + kv_head) * d;
        for j in 0..nk {
            kp[j] = k[base + j * row_stride..][..d].as_ptr();
            vp[j] = v[base + j * row_stride..][..d].as_ptr();
        }
        M::scores(qbuf, rows, d, &kp[..nk], scores, bs);
        for r in 0..rows {
            let sr = &mut scores[r * bs..r * bs + nk];
            let visible = (pos(r) + 1).saturating_sub(key0).min(nk);
            let block_max = sr[..visible]
                .iter()
                .cloned()
                .fold(f32::NEG_INFINITY, f32::max);
            let m_old = mstat[r];
            let m_new = m_old.max(block_max);
            if m_new > m_old && m_old != f32::NEG_INFINITY {
                let c = crate::cpu_ops::exp(m_old - m_new);
                lstat[r] *= c;
                acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= c);
            }
            mstat[r] = m_new;
            if visible > 0 {
                lstat[r] += M::exp_sum(&mut sr[..visible], m_new);
            }
            // Keys past this row's position weigh nothing.
            sr[visible..].fill(0.0);
        }
        M::pv(acc, scores, rows, bs, &vp[..nk], d);
    }
    item.store(dims, acc, lstat, tmp, out);
}
