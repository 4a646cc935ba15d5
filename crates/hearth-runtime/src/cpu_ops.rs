//! The transformer's element-wise ops for f32 on the CPU, fused where a profile of the
//! decode step showed them: RMSNorm with the residual add before it, SiLU·mul, RoPE,
//! and RoPE applied while new keys are written into the paged cache. candle-nn's
//! versions hand every call to rayon's pool, which on a 2-core machine wakes threads
//! that then fight hearth's pool (threads.rs) for the cores; these run on the calling
//! thread for the few rows of a decode step and on hearth's pool for prefill chunks.
//! Other devices and dtypes take candle's ops; tests check each fused op against them.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, InplaceOp2, Layout, Result};
use candle_core::{DType, Shape, Tensor};

use crate::threads;

/// Rows below this run on the calling thread: splitting them costs more than it saves.
const PARALLEL_ROWS: usize = 32;

fn is_cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what} must be f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method, so closures capture the Sync wrapper, not the raw pointer.
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// Runs `f(row_range, out)` over rows of width `w`, in parallel for many rows.
fn for_rows(
    rows: usize,
    w: usize,
    out: &mut [f32],
    f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    if rows < PARALLEL_ROWS {
        f(0..rows, out);
        return;
    }
    let p = OutPtr(out.as_mut_ptr());
    threads::parallel_chunks(rows, 8, |r| {
        // SAFETY: each chunk writes only its own rows.
        let o = unsafe { std::slice::from_raw_parts_mut(p.get().add(r.start * w), r.len() * w) };
        f(r, o)
    });
}

/// e^x for the softmax and SiLU: x = n·ln 2 + r (Cody–Waite, so large |x| keeps its
/// precision), 2^n from the exponent bits, a degree-6 polynomial for e^r on
/// [-ln2/2, ln2/2] (relative error ≈ 2e-7), in plain f32 arithmetic so loops over it
/// vectorize, where libm's `expf` is a call per element.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest with the 1.5·2^23 trick (|x·log2 e| < 2^22 here).
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_888_9)))));
    f32::from_bits((p.to_bits() as i32).wrapping_add((n as i32) << 23) as u32)
}

// ---------------------------------------------------------------- RMSNorm (+ residual)

/// `rms_norm(x) · w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !is_cpu_f32(&[x, w]) {
        return candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32);
    }
    x.contiguous()?
        .apply_op2_no_bwd(w, &RmsNorm { eps: eps as f32 })
}

/// The residual add and the next norm in one pass: `(x + delta, rms_norm(x + delta) · w)`.
pub fn add_rms_norm(x: &Tensor, delta: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    if !is_cpu_f32(&[x, delta, w]) {
        let sum = (x + delta)?;
        let normed = candle_nn::ops::rms_norm(&sum, w, eps as f32)?;
        return Ok((sum, normed));
    }
    let both = x.contiguous()?.apply_op3_no_bwd(
        &delta.contiguous()?,
        w,
        &AddRmsNorm { eps: eps as f32 },
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

/// `x · w / rms(x)` with llama.cpp's arithmetic (ggml's `rms_norm`): the squares
/// (rounded to f32) summed in f64, the mean rounded to f32, `1 / sqrtf(mean + eps)`,
/// then `(x · scale) · w`. An f64 sum of 24-bit squares is exact but for rounding far
/// below f32's last bit, so its order (eight lanes here, one running sum in ggml) leaves
/// the f32 mean the same; an f32 sum would move the scale's last bit on a third of the
/// rows, and each quantized projection after the norm rounds its input to 8 bits, where
/// a last bit decides a step.
#[inline(always)]
fn norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let mut acc = [0f64; 8];
    let whole = x.len() / 8 * 8;
    for c in x[..whole].chunks_exact(8) {
        for i in 0..8 {
            acc[i] += (c[i] * c[i]) as f64;
        }
    }
    let mut sum: f64 = x[whole..].iter().map(|v| (v * v) as f64).sum();
    sum += acc.iter().sum::<f64>();
    let mean = (sum / x.len() as f64) as f32;
    let r = 1.0 / (mean + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * r * g;
    }
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "hearth-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms_norm input")?;
        let w = f32_slice(s2, l2, "rms_norm weight")?;
        let h = w.len();
        if h == 0 || l1.dims().last() != Some(&h) {
            candle_core::bail!("rms_norm: input {:?}, weight {h}", l1.dims());
        }
        let rows = x.len() / h;
        let mut out = vec![0f32; x.len()];
        for_rows(rows, h, &mut out, |r, o| {
            for (i, row) in r.enumerate() {
                norm_row(
                    &x[row * h..(row + 1) * h],
                    w,
                    self.eps,
                    &mut o[i * h..(i + 1) * h],
                );
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

struct AddRmsNorm {
    eps: f32,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "hearth-add-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "residual")?;
        let d = f32_slice(s2, l2, "residual delta")?;
        let w = f32_slice(s3, l3, "rms_norm weight")?;
        let h = w.len();
        if h == 0 || x.len() != d.len() || l1.dims().last() != Some(&h) {
            candle_core::bail!(
                "add_rms_norm: {:?} + {:?}, weight {h}",
                l1.dims(),
                l2.dims()
            );
        }
        let n = x.len();
        let rows = n / h;
        // Output rows: the sums (rows 0..T) then the normalised rows (T..2T), computed
        // together per row; laid out [2, ...x's shape].
        let mut out = vec![0f32; 2 * n];
        let (sums, normed) = out.split_at_mut(n);
        let np = OutPtr(normed.as_mut_ptr());
        for_rows(rows, h, sums, |r, s| {
            for (i, row) in r.enumerate() {
                let sr = &mut s[i * h..(i + 1) * h];
                for ((o, a), b) in sr.iter_mut().zip(&x[row * h..]).zip(&d[row * h..]) {
                    *o = a + b;
                }
                // SAFETY: row `row` of the normalised half is this iteration's alone.
                let nr = unsafe { std::slice::from_raw_parts_mut(np.get().add(row * h), h) };
                norm_row(sr, w, self.eps, nr);
            }
        });
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

// ---------------------------------------------------------------- SiLU · mul

/// `silu(gate) · up`, the gated MLP's activation.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(&[gate, up]) {
        return candle_nn::ops::silu(gate)? * up;
    }
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &SiluMul)
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "hearth-silu-mul"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, "gate")?;
        let u = f32_slice(s2, l2, "up")?;
        if g.len() != u.len() {
            candle_core::bail!("silu_mul: {:?} vs {:?}", l1.dims(), l2.dims());
        }
        let w = *l1.dims().last().unwrap_or(&1);
        let rows = g.len() / w.max(1);
        let mut out = vec![0f32; g.len()];
        for_rows(rows, w, &mut out, |r, o| {
            let (a, b) = (r.start * w, r.end * w);
            silu_mul_slice(&g[a..b], &u[a..b], o);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `silu(gate) · up` straight from the fused gate/up product `[.., 2 * width]` (gate
/// first, CPU f32): each row's halves are read in place, where narrowing and
/// [`silu_mul`] copy both halves first (for a 2k-token prefill chunk two 12 MB copies
/// per layer, and the page faults of their fresh buffers). The same arithmetic per
/// element as [`silu_mul`], so the result is bit-identical.
pub fn silu_mul_joined(gate_up: &Tensor, width: usize) -> Result<Tensor> {
    let last = gate_up.rank().saturating_sub(1);
    if !is_cpu_f32(&[gate_up]) || gate_up.dim(last)? != 2 * width {
        let gate = gate_up.narrow(last, 0, width)?;
        let up = gate_up.narrow(last, width, width)?;
        return silu_mul(&gate, &up);
    }
    gate_up
        .contiguous()?
        .apply_op1_no_bwd(&SiluMulJoined { width })
}

struct SiluMulJoined {
    width: usize,
}

impl CustomOp1 for SiluMulJoined {
    fn name(&self) -> &'static str {
        "hearth-silu-mul-joined"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let gu = f32_slice(s, l, "gate_up")?;
        let w = self.width;
        if w == 0 || !gu.len().is_multiple_of(2 * w) {
            candle_core::bail!("silu_mul_joined: {:?} is not rows of 2 x {w}", l.dims());
        }
        let rows = gu.len() / (2 * w);
        let mut out = vec![0f32; rows * w];
        for_rows(rows, w, &mut out, |r, o| {
            for (i, o) in r.zip(o.chunks_exact_mut(w)) {
                let row = &gu[i * 2 * w..(i + 1) * 2 * w];
                silu_mul_slice(&row[..w], &row[w..], o);
            }
        });
        let mut dims = l.dims().to_vec();
        if let Some(d) = dims.last_mut() {
            *d = w;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

fn silu_mul_slice(g: &[f32], u: &[f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if threads::has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { silu_mul_avx2(g, u, o) };
    }
    silu_mul_body(g, u, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(g: &[f32], u: &[f32], o: &mut [f32]) {
    silu_mul_body(g, u, o)
}

/// `g / (1 + e^-g) · u` as ggml_vec_swiglu_f32 computes it (its `ggml_v_silu`, with
/// [`ggml_expf`]), so the down projection quantizes the same activations as llama.cpp.
#[inline(always)]
fn silu_mul_body(g: &[f32], u: &[f32], o: &mut [f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + ggml_expf(-g)) * u;
    }
}

/// e^x as ggml's vectorized `ggml_v_expf` computes it (ggml-cpu/vec.h, after ARM's
/// optimized routine; ≤ 1.46 ulp): `n = round(x·log2 e)` by the 1.5·2^23 trick with an
/// FMA, `b = x − n·ln2` in two FMA steps, a degree-5 polynomial in FMAs and `b²`, scaled
/// by 2^n in one rounding (`vscalefps`; here two multiplies by powers of two), and
/// |n| > 192 flushed to 0 or ∞ as ggml does. Plain scalar code that vectorizes where the
/// caller enables FMA; `mul_add` is exact either way, so the bits are ggml's.
#[inline(always)]
pub(crate) fn ggml_expf(x: f32) -> f32 {
    const R: f32 = 12_582_912.0; // 0x1.8p23
    let z = x.mul_add(f32::from_bits(0x3fb8_aa3b), R); // log2 e, 0x1.715476p+0
    let n = z - R;
    // fnmadd(a, b, c) = c − a·b, fused.
    let b = (-n).mul_add(
        f32::from_bits(0x35bf_be8e),                  // 0x1.7f7d1cp-20
        (-n).mul_add(f32::from_bits(0x3f31_7200), x), // 0x1.62e4p-1
    );
    let u = b * b;
    let j = f32::from_bits(0x3c07_2010) // 0x1.0e4020p-7
        .mul_add(b, f32::from_bits(0x3d2b_9f17)) // 0x1.573e2ep-5
        .mul_add(
            u,
            f32::from_bits(0x3e2a_af33).mul_add(b, f32::from_bits(0x3eff_fedb)), // 0x1.555e66p-3, 0x1.fffdb6p-2
        )
        .mul_add(u, f32::from_bits(0x3f7f_fff6).mul_add(b, 1.0)); // 0x1.ffffecp-1
                                                                  // j·2^n in one rounding, as two exact-or-final multiplies by normal powers of two
                                                                  // (selects, no branches, so loops over it vectorize): 2^n itself below n = -126
                                                                  // would be subnormal, above 127 infinite.
    let ni = n as i32;
    let (a, b) = if ni < -126 {
        (ni + 100, -100)
    } else if ni > 127 {
        (127, ni - 127)
    } else {
        (ni, 0)
    };
    let pow2 = |e: i32| f32::from_bits(((e.clamp(-126, 127) + 127) as u32) << 23);
    let r = j * pow2(a) * pow2(b);
    if n.abs() > 192.0 {
        if n <= 0.0 {
            0.0
        } else {
            f32::INFINITY
        }
    } else {
        r
    }
}

// ---------------------------------------------------------------- RoPE (+ cache write)

/// Host cos/sin tables `[positions, head_dim / 2]` and the step's positions.
#[derive(Clone, Copy)]
pub struct Rope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub positions: &'a [u32],
}

impl Rope<'_> {
    /// Rotates one head (the two halves, as transformers' Llama does) into `out`.
    #[inline(always)]
    fn rotate(&self, token: usize, src: &[f32], out: &mut [f32]) {
        let half = src.len() / 2;
        let p = self.positions[token] as usize;
        let (c, s) = (
            &self.cos[p * half..(p + 1) * half],
            &self.sin[p * half..(p + 1) * half],
        );
        let (x1, x2) = src.split_at(half);
        let (o1, o2) = out.split_at_mut(half);
        #[cfg(target_arch = "x86_64")]
        if threads::has_avx2_fma() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { rotate_fma(x1, x2, c, s, o1, o2) };
        }
        for i in 0..half {
            o1[i] = x1[i] * c[i] - x2[i] * s[i];
            o2[i] = x1[i] * s[i] + x2[i] * c[i];
        }
    }

    fn check(&self, t: usize, d: usize) -> Result<()> {
        let half = d / 2;
        let max = self.positions.iter().max().copied().unwrap_or(0) as usize;
        if self.positions.len() != t || !d.is_multiple_of(2) || (max + 1) * half > self.cos.len() {
            candle_core::bail!(
                "rope: {t} tokens, {} positions (max {max}), head_dim {d}, table of {}",
                self.positions.len(),
                self.cos.len()
            );
        }
        Ok(())
    }
}

/// The rotation as llama.cpp's `rotate_pairs` computes it when GCC contracts it for an
/// FMA machine (-ffp-contract=fast): `fma(x1, c, −(x2·s))` and `fma(x1, s, x2·c)`, the
/// first product of each kept exact. Measured against llama.cpp's own RoPE output on
/// SmolLM2: bit-identical this way, a tenth of the values a last bit off unfused.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rotate_fma(x1: &[f32], x2: &[f32], c: &[f32], s: &[f32], o1: &mut [f32], o2: &mut [f32]) {
    for i in 0..o1.len() {
        o1[i] = x1[i].mul_add(c[i], -(x2[i] * s[i]));
        o2[i] = x1[i].mul_add(s[i], x2[i] * c[i]);
    }
}

/// RoPE over `x` `[T, heads, head_dim]` (CPU f32 only; callers check `is_cpu_f32`).
pub fn rope(x: &Tensor, rope: Rope) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&RopeOp { rope })
}

struct RopeOp<'a> {
    rope: Rope<'a>,
}

impl CustomOp1 for RopeOp<'_> {
    fn name(&self) -> &'static str {
        "hearth-rope"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "rope input")?;
        let (t, h, d) = l.shape().dims3()?;
        self.rope.check(t, d)?;
        let mut out = vec![0f32; x.len()];
        for_rows(t, h * d, &mut out, |r, o| {
            for (i, tok) in r.enumerate() {
                for head in 0..h {
                    let src = &x[(tok * h + head) * d..][..d];
                    self.rope
                        .rotate(tok, src, &mut o[(i * h + head) * d..][..d]);
                }
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Writes new keys or values `[T, kv_heads, head_dim]` into their cache slots in place
/// (the cache is `[blocks, block_size, kv_heads, head_dim]`), rotating them with
/// `rope` on the way for keys. Other devices and dtypes use `scatter_set` with
/// `slot_index` (`[T, kv_heads · head_dim]` of slot ids), RoPE applied beforehand.
pub fn write_cache(
    cache: &Tensor,
    new: &Tensor,
    slots: &[u32],
    rope: Option<Rope>,
    slot_index: impl FnOnce() -> Result<Tensor>,
) -> Result<()> {
    // f32 keys and values into an f32 cache, or into a half-precision one (rounded as
    // they are stored: `--kv-cache-dtype`).
    let cache_dtype_ok = matches!(cache.dtype(), DType::F32 | DType::F16 | DType::BF16);
    if is_cpu_f32(&[new]) && cache.device().is_cpu() && cache_dtype_ok {
        return cache.inplace_op2(&new.contiguous()?, &WriteCache { slots, rope });
    }
    let (t, kvh, d) = new.dims3()?;
    let new = match rope {
        Some(_) => candle_core::bail!("write_cache: RoPE on the way is CPU f32 only"),
        None => new.reshape((t, kvh * d))?,
    };
    let n_slots = cache.elem_count() / (kvh * d);
    cache
        .reshape((n_slots, kvh * d))?
        .scatter_set(&slot_index()?, &new.contiguous()?, 0)
}

struct WriteCache<'a> {
    slots: &'a [u32],
    rope: Option<Rope<'a>>,
}

impl InplaceOp2 for WriteCache<'_> {
    fn name(&self) -> &'static str {
        "hearth-write-cache"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let x = f32_slice(src, sl, "new keys/values")?;
        let Some((c0, c1)) = dl.contiguous_offsets() else {
            candle_core::bail!("write_cache: the cache must be contiguous");
        };
        match dst {
            CpuStorage::F32(cache) => self.write(x, sl, &mut cache[c0..c1]),
            CpuStorage::F16(cache) => self.write(x, sl, &mut cache[c0..c1]),
            CpuStorage::BF16(cache) => self.write(x, sl, &mut cache[c0..c1]),
            _ => candle_core::bail!("write_cache: the cache must be f32, f16 or bf16"),
        }
    }
}

impl WriteCache<'_> {
    /// Rows of `x` (`[T, kv_heads, head_dim]`) into their slots of `cache`, through an
    /// f32 row (rotated there for keys) converted once on the way in.
    fn write<C: crate::paged_attention::Element>(
        &self,
        x: &[f32],
        sl: &Layout,
        cache: &mut [C],
    ) -> Result<()> {
        let (t, kvh, d) = sl.shape().dims3()?;
        let row = kvh * d;
        if self.slots.len() != t {
            candle_core::bail!("write_cache: {t} tokens but {} slots", self.slots.len());
        }
        if let Some(bad) = self
            .slots
            .iter()
            .find(|&&s| (s as usize + 1) * row > cache.len())
        {
            candle_core::bail!("write_cache: slot {bad} is outside the cache");
        }
        if let Some(r) = &self.rope {
            r.check(t, d)?;
        }
        let mut buf = vec![0f32; row];
        for (tok, &slot) in self.slots.iter().enumerate() {
            let dst = &mut cache[slot as usize * row..][..row];
            let src = &x[tok * row..][..row];
            // f32 caches are written in place, others through `buf`.
            let out = match C::as_f32_mut(dst) {
                Some(f) => f,
                None => &mut buf[..],
            };
            match &self.rope {
                Some(r) => {
                    for head in 0..kvh {
                        r.rotate(tok, &src[head * d..][..d], &mut out[head * d..][..d]);
                    }
                }
                None => out.copy_from_slice(src),
            }
            if C::as_f32_mut(dst).is_none() {
                C::store(&buf, dst);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
