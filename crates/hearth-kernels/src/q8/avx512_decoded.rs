//! The blocks of 32 on long prompts: a tile of sixteen weight rows decoded once
//! (`avx512::decode_32`) for a whole chunk of activation rows, which then go over it two at
//! a time with their sixteen group sums in registers. `avx512::tile_32` decodes every block
//! again for each eight activation rows and, with 64 group sums for eight rows, keeps them in
//! memory (a load and a store per `vpdpbusd`). Same integers and the same float order:
//! the same results to the bit.

use std::arch::x86_64::*;

use super::acts::QuantizedActs;
use super::avx2::TYPES_32;
use super::avx512::{
    block_32, decode_32, group_sums_in_hsum_order, prefetch_next, Block32, TileOut, ROWS,
};
use super::WeightType;

/// A tile of sixteen weight rows of a 32-value type, decoded.
pub(crate) struct Decoded32 {
    wt: WeightType,
    blocks: Vec<Block32>,
}

impl Decoded32 {
    pub(crate) fn new(wt: WeightType) -> Self {
        Self {
            wt,
            blocks: Vec::new(),
        }
    }

    /// Decodes the `nb` blocks of the sixteen rows `rp` (rows may repeat).
    ///
    /// # Safety
    /// The CPU has AVX512F/BW/VL/VNNI, AVX2, FMA and F16C; `self.wt` is a 32-value type;
    /// each `rp[r]` points at `nb` blocks of it.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(crate) unsafe fn decode(&mut self, rp: &[*const u8; ROWS], nb: usize) {
        self.blocks.clear();
        let bb = self.wt.block_bytes();
        for i in 0..nb {
            prefetch_next(rp, nb, bb, i);
            let b = match TYPES_32.iter().position(|&t| t == self.wt) {
                Some(0) => decode_32::<0>(rp, i),
                Some(1) => decode_32::<1>(rp, i),
                Some(2) => decode_32::<2>(rp, i),
                Some(3) => decode_32::<3>(rp, i),
                _ => decode_32::<4>(rp, i),
            };
            self.blocks.push(b);
        }
    }

    /// The decoded rows against activation rows `t0..t0 + tn` (`tn` is 1 or 2), into
    /// `out[t][r]`.
    ///
    /// # Safety
    /// As `decode`'s; the blocks were decoded for rows of `a.k` values; the activation rows
    /// exist in `a`, quantized for `self.wt` (the signed types' as `acts::unsigned_copy`
    /// gives them).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(crate) unsafe fn rows(&self, a: &QuantizedActs, t0: usize, tn: usize, out: &mut TileOut) {
        let b = &self.blocks;
        match (TYPES_32.iter().position(|&t| t == self.wt), tn) {
            (Some(0), 2) => rows_n::<0, 2>(b, a, t0, out),
            (Some(0), _) => rows_n::<0, 1>(b, a, t0, out),
            (Some(1), 2) => rows_n::<1, 2>(b, a, t0, out),
            (Some(1), _) => rows_n::<1, 1>(b, a, t0, out),
            (Some(2), 2) => rows_n::<2, 2>(b, a, t0, out),
            (Some(2), _) => rows_n::<2, 1>(b, a, t0, out),
            (Some(3), 2) => rows_n::<3, 2>(b, a, t0, out),
            (Some(3), _) => rows_n::<3, 1>(b, a, t0, out),
            (_, 2) => rows_n::<4, 2>(b, a, t0, out),
            _ => rows_n::<4, 1>(b, a, t0, out),
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows_n<const T: usize, const N: usize>(
    blocks: &[Block32],
    a: &QuantizedActs,
    t0: usize,
    out: &mut TileOut,
) {
    let mut acc = [[_mm512_setzero_ps(); 8]; N];
    let mut offs = [_mm512_setzero_ps(); N];
    for (i, b) in blocks.iter().enumerate() {
        for t in 0..N {
            block_32::<T>(b, a, t0 + t, i, &mut acc[t], &mut offs[t]);
        }
    }
    for t in 0..N {
        let sum = _mm512_add_ps(group_sums_in_hsum_order(&acc[t]), offs[t]);
        _mm512_storeu_ps(out[t].as_mut_ptr(), sum);
    }
}
