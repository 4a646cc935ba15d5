//! The penalties' token table on the device: per live sequence that uses penalties, a
//! row of `vocab` u16 kept in device memory across steps (bit 15: the token was seen
//! in the prompt or the output, for the repetition penalty; bits 0-14: its count in the
//! output, for the presence and frequency penalties). The sampling kernel reads the
//! row instead of a list uploaded every step, and adds the token it picks; so what a
//! step uploads for a row's penalties no longer grows with its length.
//!
//! Lifecycle: a sequence gets a slot at its first sampled step after admission, and
//! that step's kernel writes the row from the host's counts (SamplerState keeps them:
//! they are the CPU sampler's, and the source the row is rebuilt from); preemption and
//! leaving give the slot back (a recomputed sequence is filled again when it samples
//! next). The host side is this file's bookkeeping; the kernel side is
//! kernels/sample.cu.
//!
//! Bounds: the table takes at most [`TABLE_BUDGET_BYTES`] (rows × vocab × 2 bytes;
//! e.g. a 128,256-token vocabulary: 250.5 KiB a row, 256 rows in 62.6 MiB), and only
//! sequences with a penalty hold a row. A count saturates at [`MAX_COUNT`]; a sequence
//! whose frequency penalty could see a larger count (`max_tokens` above it) keeps
//! listing its counts every step, as does any sequence when every row is taken: same
//! results, only more bytes uploaded.

use candle_core::{Device, Result};

use crate::device_sampler::SamplerState;

/// Device memory the table may take, all rows together.
pub const TABLE_BUDGET_BYTES: usize = 64 << 20;
/// Where a row's count stops (15 bits; bit 15 is "seen").
pub const MAX_COUNT: usize = 0x7fff;

/// A sequence's row in the table, and whether the kernel has written it yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSlot {
    pub slot: u32,
    pub filled: bool,
}

/// The rows of the table: which are free, and (on CUDA) the device memory.
pub struct PenaltyTable {
    vocab: usize,
    free: Vec<u32>,
    in_use: Vec<bool>,
    #[cfg(feature = "cuda")]
    device: Option<candle_core::cuda_backend::cudarc::driver::CudaSlice<u16>>,
}

impl PenaltyTable {
    /// Bookkeeping for up to `max_rows` rows of `vocab` tokens, within the budget.
    pub fn new(vocab: usize, max_rows: usize) -> Self {
        let rows = Self::rows_for(vocab, max_rows);
        Self {
            vocab,
            // Popped from the back: slot 0 first.
            free: (0..rows as u32).rev().collect(),
            in_use: vec![false; rows],
            #[cfg(feature = "cuda")]
            device: None,
        }
    }

    /// Rows a table for `vocab` and `max_rows` gets: as many as asked, within the budget.
    fn rows_for(vocab: usize, max_rows: usize) -> usize {
        let per_row = vocab.max(1) * 2;
        max_rows
            .min(TABLE_BUDGET_BYTES / per_row)
            .min(u32::MAX as usize)
    }

    /// Device bytes [`Self::for_device`] allocates on CUDA for `vocab` and `max_rows`
    /// (one element at least): what the KV cache's budget leaves for it (engine.rs).
    pub fn device_bytes(vocab: usize, max_rows: usize) -> u64 {
        (Self::rows_for(vocab, max_rows) * vocab).max(1) as u64 * 2
    }

    /// The table for `device`: rows in device memory on CUDA; none elsewhere (the CPU
    /// samples from the host's counts directly).
    pub fn for_device(device: &Device, vocab: usize, max_rows: usize) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            let mut t = Self::new(vocab, max_rows);
            // At least one element: the kernel takes a pointer even with no rows.
            t.device = Some(dev.alloc_zeros::<u16>((t.rows() * vocab).max(1))?);
            return Ok(t);
        }
        let _ = (device, max_rows);
        Ok(Self::new(vocab, 0))
    }

    pub fn rows(&self) -> usize {
        self.in_use.len()
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Device bytes the rows take.
    pub fn bytes(&self) -> usize {
        self.rows() * self.vocab * 2
    }

    pub fn free_rows(&self) -> usize {
        self.free.len()
    }

    /// Gives `state` a row if its penalties can use one and a row is free; a state
    /// that has one keeps it.
    pub fn attach(&mut self, state: &mut SamplerState) {
        if state.table.is_some() || !state.fits_penalty_table() {
            return;
        }
        if let Some(slot) = self.free.pop() {
            self.in_use[slot as usize] = true;
            state.table = Some(TableSlot {
                slot,
                filled: false,
            });
        }
    }

    /// Takes `state`'s row back (it left, or was preempted).
    pub fn detach(&mut self, state: &mut SamplerState) {
        if let Some(t) = state.table.take() {
            if let Some(used) = self.in_use.get_mut(t.slot as usize) {
                if *used {
                    *used = false;
                    self.free.push(t.slot);
                }
            }
        }
    }

    /// Every row free again (the engine rebuilt its state; the states went with it).
    pub fn clear(&mut self) {
        let rows = self.rows() as u32;
        self.free = (0..rows).rev().collect();
        self.in_use.iter_mut().for_each(|u| *u = false);
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn device_rows(
        &mut self,
    ) -> Option<&mut candle_core::cuda_backend::cudarc::driver::CudaSlice<u16>> {
        self.device.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::SamplingParams;

    fn state(p: SamplingParams) -> SamplerState {
        SamplerState::new(p, &[1, 2, 3])
    }

    #[test]
    fn rows_fit_the_budget_and_only_penalised_fitting_sequences_take_one() {
        let t = PenaltyTable::new(128_256, 1024);
        assert_eq!(t.rows(), TABLE_BUDGET_BYTES / (128_256 * 2));
        assert!(t.bytes() <= TABLE_BUDGET_BYTES);
        let mut t = PenaltyTable::new(100, 2);
        let mut plain = state(SamplingParams::default());
        t.attach(&mut plain);
        assert_eq!(plain.table, None, "no penalty, no row");
        let mut long = state(SamplingParams {
            frequency_penalty: 0.5,
            max_tokens: MAX_COUNT + 1,
            ..SamplingParams::default()
        });
        t.attach(&mut long);
        assert_eq!(long.table, None, "a count could pass the saturation");
        let rep = || SamplingParams {
            repetition_penalty: 1.2,
            max_tokens: MAX_COUNT + 1,
            ..SamplingParams::default()
        };
        let (mut a, mut b, mut c) = (state(rep()), state(rep()), state(rep()));
        t.attach(&mut a);
        t.attach(&mut b);
        t.attach(&mut c);
        assert_eq!(a.table.map(|s| s.slot), Some(0));
        assert_eq!(b.table.map(|s| s.slot), Some(1));
        assert_eq!(c.table, None, "table full: c lists its penalties");
        t.detach(&mut a);
        t.detach(&mut a);
        assert_eq!(t.free_rows(), 1, "a second release changes nothing");
        t.attach(&mut c);
        assert_eq!(c.table.map(|s| (s.slot, s.filled)), Some((0, false)));
        t.clear();
        assert_eq!(t.free_rows(), 2);
    }

    #[test]
    fn device_bytes_are_what_the_table_allocates_and_stay_within_the_budget() {
        // Llama-3's vocabulary: 261 rows of 250.5 KiB fit 64 MiB.
        let rows = TABLE_BUDGET_BYTES / (128_256 * 2);
        assert_eq!(rows, 261);
        assert_eq!(
            PenaltyTable::device_bytes(128_256, 1024),
            rows as u64 * 128_256 * 2
        );
        assert!(PenaltyTable::device_bytes(128_256, 1024) <= TABLE_BUDGET_BYTES as u64);
        // Fewer sequences than fit: a row each.
        assert_eq!(PenaltyTable::device_bytes(32_000, 8), 8 * 32_000 * 2);
        for (vocab, max_rows) in [(128_256, 1024), (32_000, 8), (100, 2), (1000, 1 << 20)] {
            let t = PenaltyTable::new(vocab, max_rows);
            assert_eq!(
                PenaltyTable::device_bytes(vocab, max_rows),
                t.bytes() as u64
            );
        }
        // No rows: the one-element stand-in the kernel takes a pointer to.
        assert_eq!(PenaltyTable::device_bytes(32_000, 0), 2);
    }
}
