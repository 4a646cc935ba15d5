//! The random draw of a sampled token, written so that the CPU samplers (sampler.rs,
//! device_sampler.rs) and the CUDA kernel (kernels/sample.cu) make the very same one:
//! given the same logits and parameters, a seeded request gets the same token on either.
//!
//! How the two agree exactly:
//! - randomness is counter-based: Philox4x32-10 keyed by the request's seed, counted by
//!   (token id, output position), so a token's uniform does not depend on what else was
//!   drawn or in which order;
//! - the draw is Gumbel-max (the candidate with the largest `logit/T + G`, lowest id on
//!   ties): an argmax, which any reduction order gets the same;
//! - the one sum (the softmax mass top-p needs) is taken in one fixed order, [`LANES`]
//!   strided lane sums then the lanes in turn, which is how the kernel's 256 threads add;
//! - `exp` and `ln` are our own polynomials of single-rounded f32 operations (the kernel
//!   uses `__fadd_rn`-style intrinsics, which nvcc never fuses), and every result that
//!   could be subnormal is flushed to zero, so the GPU's flush-to-zero cannot differ.
//!
//! Top-k keeps every token at least as likely as the k-th (ties kept, as Hugging Face's
//! `TopKLogitsWarper`); top-p keeps the most likely tokens down to the largest
//! probability at which their mass reaches `top_p` (ties kept); min-p keeps tokens at
//! least `min_p` times as likely as the most likely one.

/// Threads of the sampling kernel's block, and so the lanes of its fixed-order sums.
pub const LANES: usize = 256;

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;
/// The counter's last word: a constant, so other uses of the same seed get other streams.
pub const STREAM: u32 = 0x6865_6172;
/// ln 2 in two parts (Cody–Waite): the high part has 16 significant bits, so that
/// `k * LN2_HI` is exact for the exponents met here.
const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
/// Above every Gumbel value the draw can produce (-ln(-ln(1 - 2^-24)) ≈ 16.64).
const GUMBEL_BOUND: f32 = 17.0;

/// Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2,
/// 3", SC'11; Random123's `philox4x32_10`).
pub fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(PHILOX_W0);
            key[1] = key[1].wrapping_add(PHILOX_W1);
        }
        let p0 = PHILOX_M0 as u64 * ctr[0] as u64;
        let p1 = PHILOX_M1 as u64 * ctr[2] as u64;
        ctr = [
            (p1 >> 32) as u32 ^ ctr[1] ^ key[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ ctr[3] ^ key[1],
            p0 as u32,
        ];
    }
    ctr
}

/// The uniform in (0, 1) of `token` at output `position` of a request seeded `seed`:
/// 23 random bits, centred, so that it is never 0 or 1 and is exact in f32.
pub fn uniform(seed: u64, position: u64, token: u32) -> f32 {
    let r = philox4x32_10(
        [token, position as u32, (position >> 32) as u32, STREAM],
        [seed as u32, (seed >> 32) as u32],
    );
    ((r[0] >> 9) * 2 + 1) as f32 * f32::from_bits(0x3380_0000)
}

/// Zero for anything smaller in magnitude than the least normal f32 (signed zeros
/// included, so no -0 survives): what a flush-to-zero GPU would make of it.
pub fn flush(x: f32) -> f32 {
    if x.abs() < f32::MIN_POSITIVE {
        0.0
    } else {
        x
    }
}

/// `e^d` for `d <= 0`; 0 below -87 (where the result would leave the normal range) and
/// for NaN. Cody–Waite reduction by ln 2 and a degree-6 Taylor polynomial: within 2 ulp.
pub fn exp_neg(d: f32) -> f32 {
    if d.is_nan() || d < -87.0 {
        return 0.0;
    }
    let k = (d * std::f32::consts::LOG2_E + 0.5).floor();
    let r = d - k * LN2_HI - k * LN2_LO;
    let mut p = f32::from_bits(0x3ab6_0b61);
    p = p * r + f32::from_bits(0x3c08_8889);
    p = p * r + f32::from_bits(0x3d2a_aaab);
    p = p * r + f32::from_bits(0x3e2a_aaab);
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // k is in [-125, 0]: 2^k is a normal f32.
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// `ln y` for a positive normal `y`: the exponent times ln 2 plus an odd series in
/// `(f - 1)/(f + 1)` for the mantissa f in [√½, √2]. Within a few ulp.
pub fn ln(y: f32) -> f32 {
    let bits = y.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut f = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    if f > std::f32::consts::SQRT_2 {
        f *= 0.5;
        e += 1;
    }
    let z = (f - 1.0) / (f + 1.0);
    let z2 = z * z;
    let mut p = f32::from_bits(0x3de3_8e39);
    p = p * z2 + f32::from_bits(0x3e12_4925);
    p = p * z2 + f32::from_bits(0x3e4c_cccd);
    p = p * z2 + f32::from_bits(0x3eaa_aaab);
    p = p * z2 + 1.0;
    let lf = 2.0 * z * p;
    let ef = e as f32;
    ef * LN2_HI + (ef * LN2_LO + lf)
}

/// The Gumbel noise of `token` at `position`: -ln(-ln u).
pub fn gumbel(seed: u64, position: u64, token: u32) -> f32 {
    let u = uniform(seed, position, token);
    flush(-ln(-ln(u)))
}

/// Sum of `(index, value)` pairs (ascending indices) in the kernel's order: each lane
/// (index mod [`LANES`]) adds its values in index order, then the lanes are added in
/// turn. Pairs left out count as zeros, which change no sum.
pub fn lane_sum(items: impl Iterator<Item = (usize, f32)>) -> f32 {
    let mut lanes = [0f32; LANES];
    for (i, v) in items {
        lanes[i % LANES] += v;
    }
    lanes.iter().fold(0.0, |acc, &x| acc + x)
}

/// The scaled logit the draw compares: finite logits divided by the temperature,
/// flushed and kept finite; the rest -inf (never candidates).
pub fn scaled(a: f32, temperature: f32) -> f32 {
    if a.is_finite() {
        flush(a / temperature).clamp(-f32::MAX, f32::MAX)
    } else {
        f32::NEG_INFINITY
    }
}

/// Index of the largest value, the first on ties; NaN never wins; 0 if nothing beats -inf.
pub fn argmax_first(v: &[f32]) -> (u32, f32) {
    let (mut best, mut best_v) = (0u32, f32::NEG_INFINITY);
    for (i, &x) in v.iter().enumerate() {
        if x > best_v {
            best = i as u32;
            best_v = x;
        }
    }
    (best, best_v)
}

/// A row's log-normaliser in the kernel's order: its largest value and the ln of its
/// mass relative to that; see [`log_prob`]. NaN counts as -inf.
pub fn log_norm(raw: &[f32]) -> (f32, f32) {
    let (_, m) = argmax_first(raw);
    if !m.is_finite() {
        return (m, 0.0);
    }
    let z = lane_sum(
        raw.iter()
            .enumerate()
            .filter(|(_, x)| x.is_finite())
            .map(|(i, &x)| (i, exp_neg(flush(x - m)))),
    );
    (m, ln(z))
}

/// The log-probability of logit `x` in the row `norm` (from [`log_norm`]) describes.
pub fn log_prob(x: f32, norm: (f32, f32)) -> f32 {
    if !norm.0.is_finite() {
        return flush(x - norm.0);
    }
    flush(flush(x - norm.0) - norm.1)
}

/// What one draw needs besides the row.
#[derive(Debug, Clone, Copy)]
pub struct DrawParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub seed: u64,
    /// The output position of the token being drawn (0 for a request's first).
    pub position: u64,
}

/// Draws a token from one row of (penalised, masked) logits `a`.
pub fn draw(a: &[f32], p: &DrawParams) -> u32 {
    let (top, top_v) = argmax_first(a);
    if !top_v.is_finite() {
        return top;
    }
    let t = p.temperature;
    let m = scaled(top_v, t);
    let s: Vec<f32> = a.iter().map(|&x| scaled(x, t)).collect();
    // Top-k: the k-th largest scaled logit is the floor.
    let mut floor_s = f32::NEG_INFINITY;
    if p.top_k > 0 {
        let mut finite: Vec<f32> = s.iter().copied().filter(|x| x.is_finite()).collect();
        if p.top_k < finite.len() {
            let (_, kth, _) = finite.select_nth_unstable_by(p.top_k - 1, |a, b| b.total_cmp(a));
            floor_s = *kth;
        }
    }
    // Candidates in index order, with their unnormalised probability e^(s - m).
    let cand: Vec<(usize, f32)> = s
        .iter()
        .enumerate()
        .filter(|(_, &x)| x.is_finite() && x >= floor_s)
        .map(|(i, &x)| (i, exp_neg(flush(x - m))))
        .collect();
    let mut floor_bits = 0u32;
    if p.top_p < 1.0 {
        floor_bits = top_p_floor(&cand, p.top_p);
    }
    floor_bits = floor_bits.max(p.min_p.to_bits());
    // Gumbel-max over what is left; a token whose scaled logit plus the largest possible
    // noise cannot reach the best so far is skipped unseen (its result could not win).
    let score = |i: usize| flush(s[i] + gumbel(p.seed, p.position, i as u32));
    let (mut best, mut best_score) = (top as usize, score(top as usize));
    for &(i, e) in &cand {
        if e.to_bits() < floor_bits || flush(s[i] + GUMBEL_BOUND) < best_score {
            continue;
        }
        let sc = score(i);
        if sc > best_score || (sc == best_score && i < best) {
            best = i;
            best_score = sc;
        }
    }
    best as u32
}

/// The top-p floor: the largest bit pattern `b` such that the candidates with `e >= b`
/// (as bits: all are non-negative) hold at least `top_p` of the mass, by bisection over
/// the bits, each mass summed in the kernel's order. The search runs over the head of
/// the distribution that an approximate (f64) mass says is enough, and over every
/// candidate when the exact sum disagrees.
fn top_p_floor(cand: &[(usize, f32)], top_p: f32) -> u32 {
    let total = lane_sum(cand.iter().copied());
    let target = flush(top_p * total);
    let mass = |list: &[(usize, f32)], b: u32| {
        lane_sum(list.iter().copied().filter(|&(_, e)| e.to_bits() >= b))
    };
    let search = |list: &[(usize, f32)], mut lo: u32| {
        let mut hi = 0x3f80_0001u32;
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if mass(list, mid) >= target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    };
    // The head: the largest e's until their f64 mass passes the target with room.
    let mut by_e: Vec<u32> = cand.iter().map(|c| c.1.to_bits()).collect();
    let want = target as f64 * 1.001;
    let mut k = 64.min(by_e.len());
    let head_floor = loop {
        if k >= by_e.len() {
            break 0;
        }
        by_e.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        let head_mass: f64 = by_e[..k].iter().map(|&b| f32::from_bits(b) as f64).sum();
        if head_mass >= want {
            break by_e[..k].iter().copied().min().unwrap_or(0);
        }
        k = (k * 4).min(by_e.len());
    };
    if head_floor > 0 {
        let head: Vec<(usize, f32)> = cand
            .iter()
            .copied()
            .filter(|&(_, e)| e.to_bits() >= head_floor)
            .collect();
        if mass(&head, head_floor) >= target {
            return search(&head, head_floor);
        }
    }
    search(cand, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_random123_known_answers() {
        // Random123's kat_vectors for philox4x32_10.
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn exp_and_ln_are_close_to_the_library_ones() {
        for i in 0..20_000 {
            let d = -87.0 * i as f32 / 20_000.0;
            let (ours, lib) = (exp_neg(d), d.exp());
            assert!(
                ((ours - lib) / lib).abs() < 1e-6,
                "exp({d}) {ours} vs {lib}"
            );
            let y = 1e-7 + 20.0 * i as f32 / 20_000.0;
            let (ours, lib) = (ln(y), y.ln());
            assert!(
                (ours - lib).abs() < 2e-6 * lib.abs().max(1.0),
                "ln({y}) {ours} vs {lib}"
            );
        }
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(exp_neg(-88.0), 0.0);
        assert_eq!(exp_neg(f32::NAN), 0.0);
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn uniforms_are_inside_the_open_interval_and_look_uniform() {
        let n = 100_000;
        let mut buckets = [0usize; 10];
        for i in 0..n {
            let u = uniform(42, 7, i);
            assert!(u > 0.0 && u < 1.0);
            buckets[(u * 10.0) as usize] += 1;
        }
        for b in buckets {
            assert!((9_000..11_000).contains(&b), "{buckets:?}");
        }
        assert_ne!(uniform(42, 7, 0), uniform(42, 8, 0));
        assert_ne!(uniform(42, 7, 0), uniform(43, 7, 0));
    }

    fn params(t: f32) -> DrawParams {
        DrawParams {
            temperature: t,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 5,
            position: 0,
        }
    }

    #[test]
    fn draws_follow_the_softmax() {
        // softmax([0, ln 2, ln 3]) = [1/6, 2/6, 3/6].
        let row = [0.0, 2f32.ln(), 3f32.ln()];
        let mut h = [0usize; 3];
        for pos in 0..30_000 {
            h[draw(
                &row,
                &DrawParams {
                    position: pos,
                    ..params(1.0)
                },
            ) as usize] += 1;
        }
        for (i, want) in [5_000.0, 10_000.0, 15_000.0].iter().enumerate() {
            assert!((h[i] as f64 - want).abs() < 450.0, "{h:?}");
        }
    }

    #[test]
    fn top_p_keeps_the_nucleus_with_ties() {
        // probs ∝ [4, 2, 2, 1]: top_p 0.5 is reached by the first alone (4/9 < 0.5, so
        // the two tied 2s come in together).
        let row = [4f32.ln(), 2f32.ln(), 2f32.ln(), 0.0];
        let mut seen = [false; 4];
        for pos in 0..2_000 {
            let p = DrawParams {
                position: pos,
                top_p: 0.5,
                ..params(1.0)
            };
            seen[draw(&row, &p) as usize] = true;
        }
        assert_eq!(seen, [true, true, true, false]);
    }
}
