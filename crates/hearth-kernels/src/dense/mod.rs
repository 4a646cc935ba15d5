//! The dense (f32 or bf16) product `x · Wᵀ` on weights packed once, at load, into the
//! layout the register tiles stream: W's rows in panels of [`PANEL`], each panel stored
//! step of k by step of k (the panel's 32 weights of one column of W are one 128-byte
//! run). A product then reads each panel as one contiguous stream, and nothing is
//! re-packed per call (gemm's generic path packs W on every call, then runs its AVX2
//! microkernel only). The activations, small next to W, are packed per call into
//! blocks of the tile's row count.
//!
//! bf16 weights keep each row's two values of a pair of k steps adjacent (the order
//! AVX512-BF16's `vdpbf16ps` multiplies); their activations are rounded to bf16 too, as
//! llama.cpp does for bf16 weights, on every instruction set, so the paths agree.
//!
//! Memory: the packed weight is W's size plus the last panel's padding (< 32 rows) and,
//! for bf16 with an odd k, one padding column.

mod lines;
mod scalar;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;

use lines::Lines;

/// Weight rows per panel: two AVX-512 registers (or four AVX2 ones) of f32 outputs.
pub const PANEL: usize = 32;

/// Splits `0..n` over worker threads and runs `work` on every piece exactly once.
pub type Split<'a> = &'a dyn Fn(usize, &(dyn Fn(Range<usize>) + Sync));

/// How packed weights are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    /// Half the bytes of f32; the products round their activations to bf16 as well.
    Bf16,
}

impl WeightDtype {
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "f32" => Some(Self::F32),
            "bf16" => Some(Self::Bf16),
            _ => None,
        }
    }
}

/// The instruction sets the product comes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Any CPU.
    Scalar,
    /// AVX2 + FMA: 6 rows × 16 outputs per tile.
    Avx2,
    /// AVX-512F (and AVX512-BF16 for bf16 weights): 12 rows × 32 outputs per tile.
    Avx512,
}

#[cfg(target_arch = "x86_64")]
fn cpu_has(feature: &str) -> bool {
    use std::sync::OnceLock;
    static FLAGS: OnceLock<[bool; 3]> = OnceLock::new();
    let f = FLAGS.get_or_init(|| {
        [
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            is_x86_feature_detected!("avx512f"),
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"),
        ]
    });
    match feature {
        "avx2" => f[0],
        "avx512f" => f[1],
        "avx512bf16" => f[2],
        _ => false,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has(_feature: &str) -> bool {
    false
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    /// Whether this CPU runs the set for weights of `dtype`.
    pub fn runs_here(self, dtype: WeightDtype) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => cpu_has("avx2"),
            Isa::Avx512 => match dtype {
                WeightDtype::F32 => cpu_has("avx512f"),
                WeightDtype::Bf16 => cpu_has("avx512bf16"),
            },
        }
    }

    /// The best set this CPU runs for `dtype`.
    pub fn detected(dtype: WeightDtype) -> Self {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|i| i.runs_here(dtype))
            .unwrap_or(Isa::Scalar)
    }

    /// Activation rows per register tile.
    fn rows(self) -> usize {
        match self {
            Isa::Scalar => scalar::ROWS,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::ROWS_AVX2,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::ROWS_AVX512,
            #[cfg(not(target_arch = "x86_64"))]
            _ => scalar::ROWS,
        }
    }
}

/// 64-byte lines, so every panel step starts on a cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A weight matrix `[n, k]` packed for the product.
pub struct PackedWeight {
    n: usize,
    k: usize,
    dtype: WeightDtype,
    lines: Lines,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight[{}, {}] {:?}", self.n, self.k, self.dtype)
    }
}

fn bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

impl PackedWeight {
    /// Packs row-major `w` (`n` rows of `k`). Panics if `w` is shorter than `n * k`.
    pub fn pack(w: &[f32], n: usize, k: usize, dtype: WeightDtype) -> Self {
        assert!(
            w.len() >= n * k,
            "dense::pack: {} values for [{n}, {k}]",
            w.len()
        );
        let panels = n.div_ceil(PANEL);
        match dtype {
            WeightDtype::F32 => {
                // Each step of k is 32 f32 = two lines.
                let mut lines = Lines::zeroed(panels * k * 2);
                let f = slice_mut::<f32>(lines.as_mut_slice());
                for r in 0..n {
                    let (panel, j) = (r / PANEL, r % PANEL);
                    let base = panel * k * PANEL + j;
                    for (p, &v) in w[r * k..(r + 1) * k].iter().enumerate() {
                        f[base + p * PANEL] = v;
                    }
                }
                Self { n, k, dtype, lines }
            }
            WeightDtype::Bf16 => {
                // Each pair of k steps is 32 rows × 2 bf16 = two lines.
                let k2 = k.div_ceil(2);
                let mut lines = Lines::zeroed(panels * k2 * 2);
                let h = slice_mut::<u16>(lines.as_mut_slice());
                for r in 0..n {
                    let (panel, j) = (r / PANEL, r % PANEL);
                    let base = panel * k2 * 2 * PANEL + 2 * j;
                    for (p, &v) in w[r * k..(r + 1) * k].iter().enumerate() {
                        h[base + (p / 2) * 2 * PANEL + p % 2] = bf16_bits(v);
                    }
                }
                Self { n, k, dtype, lines }
            }
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn dtype(&self) -> WeightDtype {
        self.dtype
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lines.len() * 64
    }

    /// Row `r` of W (as stored: bf16 values widened), e.g. a token's embedding when
    /// the table doubles as the output projection. Panics if `r >= n` or `out` is
    /// shorter than `k`.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.n && out.len() >= self.k);
        let (panel, j) = (r / PANEL, r % PANEL);
        let k = self.k;
        match self.dtype {
            WeightDtype::F32 => {
                let f = slice::<f32>(self.lines.as_slice());
                let base = panel * k * PANEL + j;
                for (p, o) in out[..k].iter_mut().enumerate() {
                    *o = f[base + p * PANEL];
                }
            }
            WeightDtype::Bf16 => {
                let h = slice::<u16>(self.lines.as_slice());
                let base = panel * k.div_ceil(2) * 2 * PANEL + 2 * j;
                for (p, o) in out[..k].iter_mut().enumerate() {
                    *o = bf16_value(h[base + (p / 2) * 2 * PANEL + p % 2]);
                }
            }
        }
    }

    /// `x [m, k] · Wᵀ → [m, n]` on the best instruction set here, W's panels split by
    /// `split`. Panics if `x.len()` is not a multiple of k.
    pub fn matmul(&self, x: &[f32], split: Split<'_>) -> Vec<f32> {
        self.matmul_on_isa(Isa::detected(self.dtype), x, split)
    }

    /// `matmul` on a chosen instruction set (tests and benchmarks compare them), lowered
    /// to the best this CPU runs when it does not run that one.
    pub fn matmul_on_isa(&self, isa: Isa, x: &[f32], split: Split<'_>) -> Vec<f32> {
        let isa = if isa.runs_here(self.dtype) {
            isa
        } else {
            Isa::detected(self.dtype)
        };
        let (n, k) = (self.n, self.k);
        assert!(
            k > 0 && x.len().is_multiple_of(k),
            "dense::matmul: {} activations are not rows of {k}",
            x.len()
        );
        let m = x.len() / k;
        let mut out = vec![0f32; m * n];
        if m == 0 || n == 0 {
            return out;
        }
        let rows = isa.rows();
        let acts = pack_acts(isa, self.dtype, x, m, k, rows);
        let out_ptr = out.as_mut_ptr() as usize;
        let panels = n.div_ceil(PANEL);
        let work = |range: Range<usize>| {
            // Clipped: the panel kernels read whole panels without bounds checks.
            for panel in range.start.min(panels)..range.end.min(panels) {
                let j0 = panel * PANEL;
                let cols = PANEL.min(n - j0);
                // SAFETY: this panel's output columns j0..j0+cols of every row are
                // written by this call alone; `out` is m × n and outlives `split`; the
                // panel and the packed activations have the lengths `pack` and
                // `pack_acts` gave them.
                unsafe {
                    let o = (out_ptr as *mut f32).add(j0);
                    self.panel(isa, &acts, m, panel, o, cols);
                }
            }
        };
        split(panels, &work);
        out
    }

    /// Every row block of the activations against one panel.
    ///
    /// # Safety
    /// `out` points at column j0 of an `m × n` output; `acts` was packed for `isa` and
    /// this weight's dtype.
    unsafe fn panel(
        &self,
        isa: Isa,
        acts: &Acts,
        m: usize,
        panel: usize,
        out: *mut f32,
        cols: usize,
    ) {
        let (n, k) = (self.n, self.k);
        let k2 = k.div_ceil(2);
        match (self.dtype, acts) {
            (WeightDtype::F32, Acts::F32(x)) => {
                let w = slice::<f32>(self.lines.as_slice())[panel * k * PANEL..].as_ptr();
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => x86::panel_f32_avx512(x.as_ptr(), m, k, w, out, n, cols),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => x86::panel_f32_avx2(x.as_ptr(), m, k, w, out, n, cols),
                    _ => scalar::panel_f32(x.as_ptr(), m, k, w, out, n, cols),
                }
            }
            (WeightDtype::Bf16, Acts::Pairs(x)) => {
                let w = slice::<u16>(self.lines.as_slice())[panel * k2 * 2 * PANEL..].as_ptr();
                #[cfg(target_arch = "x86_64")]
                x86::panel_bf16_avx512(x.as_ptr(), m, k2, w, out, n, cols);
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (x, w);
            }
            (WeightDtype::Bf16, Acts::F32(x)) => {
                let w = slice::<u16>(self.lines.as_slice())[panel * k2 * 2 * PANEL..].as_ptr();
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 | Isa::Avx512 => {
                        x86::panel_bf16_avx2(x.as_ptr(), m, k2, w, out, n, cols)
                    }
                    _ => scalar::panel_bf16(x.as_ptr(), m, k2, w, out, n, cols),
                }
            }
            (WeightDtype::F32, Acts::Pairs(_)) => {}
        }
    }
}

/// The activations packed for one product: row blocks of the tile's height, each
/// stored step by step of k (`[p][row]`), so a tile's broadcasts read one stream.
enum Acts {
    /// f32 (for bf16 weights: values rounded to bf16, k padded to even).
    F32(Vec<f32>),
    /// bf16 pairs of k steps, one u32 per row and pair (AVX512-BF16).
    Pairs(Vec<u32>),
}

fn pack_acts(isa: Isa, dtype: WeightDtype, x: &[f32], m: usize, k: usize, rows: usize) -> Acts {
    let k2 = k.div_ceil(2);
    if dtype == WeightDtype::Bf16 && isa == Isa::Avx512 {
        let mut a = vec![0u32; m * k2];
        for b0 in (0..m).step_by(rows) {
            let r = rows.min(m - b0);
            let block = &mut a[b0 * k2..(b0 + r) * k2];
            for i in 0..r {
                let xr = &x[(b0 + i) * k..(b0 + i + 1) * k];
                for q in 0..k2 {
                    let lo = bf16_bits(xr[2 * q]) as u32;
                    let hi = xr.get(2 * q + 1).map_or(0, |&v| bf16_bits(v) as u32);
                    block[q * r + i] = lo | (hi << 16);
                }
            }
        }
        return Acts::Pairs(a);
    }
    let (kp, round) = match dtype {
        WeightDtype::F32 => (k, false),
        WeightDtype::Bf16 => (2 * k2, true),
    };
    let mut a = vec![0f32; m * kp];
    for b0 in (0..m).step_by(rows) {
        let r = rows.min(m - b0);
        let block = &mut a[b0 * kp..(b0 + r) * kp];
        for i in 0..r {
            let xr = &x[(b0 + i) * k..(b0 + i + 1) * k];
            for (p, &v) in xr.iter().enumerate() {
                block[p * r + i] = if round { bf16_value(bf16_bits(v)) } else { v };
            }
        }
    }
    Acts::F32(a)
}

/// The lines viewed as `T`s (f32 or u16: any bit pattern is a value).
fn slice<T>(lines: &[Line]) -> &[T] {
    // SAFETY: Line is 64 plain bytes aligned to 64, a multiple of T's size and alignment.
    unsafe {
        std::slice::from_raw_parts(
            lines.as_ptr().cast::<T>(),
            lines.len() * 64 / std::mem::size_of::<T>(),
        )
    }
}

fn slice_mut<T>(lines: &mut [Line]) -> &mut [T] {
    // SAFETY: as `slice`, uniquely borrowed.
    unsafe {
        std::slice::from_raw_parts_mut(
            lines.as_mut_ptr().cast::<T>(),
            lines.len() * 64 / std::mem::size_of::<T>(),
        )
    }
}
