//! One step's metadata packed for one host→device copy: token ids, positions, cache
//! slots, the rows that get logits, and the attention kernels' tables (token → sequence,
//! query starts, sequence lengths, block tables, decode and prefill rows) lie one after
//! another in one u32 buffer, each part starting on a 16-byte boundary. On CUDA the
//! model writes them into pinned host memory and copies the buffer once per step
//! (model.rs); every kernel then gets a pointer at its part's offset. The CPU emulator's
//! tests read the kernels' metadata out of the same packed buffer, so this layout is
//! what `cargo test` exercises.

use std::ops::Range;

use candle_core::Result;

use crate::paged_attention::launch::{Buffer, HostMeta};

/// Each part starts at a multiple of this many u32 (16 bytes: a vector load's
/// alignment, and what `cudaMalloc`'s 256-byte alignment keeps at any such offset).
pub const PART_ALIGN_WORDS: usize = 4;
/// The most words a step's buffer may hold (1 GiB): far above any step the scheduler
/// makes (block tables of 1,024 sequences × 8k blocks are 32 MiB), and offsets stay
/// within the kernels' 32-bit indexing.
pub const MAX_WORDS: usize = 1 << 28;

/// Where each part lies in the packed buffer, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedLayout {
    parts: Vec<(Buffer, Range<usize>)>,
    words: usize,
}

fn bad(what: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("step metadata: {what}"))
}

impl PackedLayout {
    /// Parts of `len` words each, in the order given. An empty part still gets one word
    /// (zero): a kernel takes a valid pointer even where it reads nothing.
    pub fn new(lens: &[(Buffer, usize)]) -> Result<Self> {
        let mut parts: Vec<(Buffer, Range<usize>)> = Vec::with_capacity(lens.len());
        let mut at = 0usize;
        for &(b, len) in lens {
            if parts.iter().any(|(x, _)| *x == b) {
                return Err(bad(format_args!("{b:?} packed twice")));
            }
            let end = at
                .checked_add(len.max(1))
                .filter(|&e| e <= MAX_WORDS)
                .ok_or_else(|| bad(format_args!("{b:?} of {len} words passes {MAX_WORDS}")))?;
            parts.push((b, at..at + len));
            at = end.next_multiple_of(PART_ALIGN_WORDS);
        }
        Ok(Self {
            parts,
            words: at.max(PART_ALIGN_WORDS),
        })
    }

    /// The words of `part` (its data, without padding).
    pub fn range(&self, part: Buffer) -> Option<Range<usize>> {
        self.parts
            .iter()
            .find(|(b, _)| *b == part)
            .map(|(_, r)| r.clone())
    }

    /// The words of `part` a kernel is given: its data, or the one zero word of an
    /// empty part.
    pub fn kernel_range(&self, part: Buffer) -> Option<Range<usize>> {
        self.range(part).map(|r| r.start..r.end.max(r.start + 1))
    }

    /// Words the whole buffer takes, padding included.
    pub fn words(&self) -> usize {
        self.words
    }

    #[cfg_attr(not(hearth_cuda_emulator), allow(dead_code))]
    pub fn parts(&self) -> impl Iterator<Item = Buffer> + '_ {
        self.parts.iter().map(|(b, _)| *b)
    }

    /// Writes `data` (each part as laid out, same order and lengths) into `dst`, the
    /// padding zeroed. `dst` may be longer than the layout (a reused buffer).
    pub fn write(&self, data: &[(Buffer, &[u32])], dst: &mut [u32]) -> Result<()> {
        if dst.len() < self.words {
            return Err(bad(format_args!(
                "a buffer of {} words for a layout of {}",
                dst.len(),
                self.words
            )));
        }
        if data.len() != self.parts.len() {
            return Err(bad(format_args!(
                "{} parts for a layout of {}",
                data.len(),
                self.parts.len()
            )));
        }
        dst[..self.words].fill(0);
        for ((b, src), (lb, r)) in data.iter().zip(&self.parts) {
            let to = dst
                .get_mut(r.clone())
                .filter(|_| b == lb && src.len() == r.len());
            let Some(to) = to else {
                return Err(bad(format_args!(
                    "{b:?} of {} words where the layout has {lb:?} of {}",
                    src.len(),
                    r.len()
                )));
            };
            to.copy_from_slice(src);
        }
        Ok(())
    }
}

/// The attention kernels' parts, from launch.rs's host metadata (each one non-empty).
pub(crate) fn attention_parts(host: &HostMeta) -> [(Buffer, &[u32]); 6] {
    [
        (Buffer::TokenSeq, &host.token_seq[..]),
        (Buffer::QueryStart, &host.query_start[..]),
        (Buffer::SeqLens, &host.seq_lens[..]),
        (Buffer::BlockTables, &host.block_tables[..]),
        (Buffer::DecodeRows, &host.decode_rows[..]),
        (Buffer::PrefillRows, &host.prefill_rows[..]),
    ]
}

/// `data` laid out and packed into a new buffer.
pub fn pack(data: &[(Buffer, &[u32])]) -> Result<(PackedLayout, Vec<u32>)> {
    let lens: Vec<(Buffer, usize)> = data.iter().map(|(b, d)| (*b, d.len())).collect();
    let layout = PackedLayout::new(&lens)?;
    let mut buf = vec![0u32; layout.words()];
    layout.write(data, &mut buf)?;
    Ok((layout, buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_aligned_in_order_apart_and_inside_the_buffer() {
        let ids = [7u32, 8, 9];
        let positions = [0u32, 1, 2];
        let table: Vec<u32> = (100..117).collect();
        let data: [(Buffer, &[u32]); 4] = [
            (Buffer::TokenIds, &ids),
            (Buffer::Positions, &positions),
            (Buffer::LogitsRows, &[]),
            (Buffer::BlockTables, &table),
        ];
        let (layout, buf) = pack(&data).unwrap();
        assert_eq!(layout.range(Buffer::TokenIds), Some(0..3));
        assert_eq!(layout.range(Buffer::Positions), Some(4..7));
        // Empty: no data, one zero word for the kernel's pointer.
        assert_eq!(layout.range(Buffer::LogitsRows), Some(8..8));
        assert_eq!(layout.kernel_range(Buffer::LogitsRows), Some(8..9));
        assert_eq!(layout.range(Buffer::BlockTables), Some(12..29));
        assert_eq!(layout.words(), 32);
        assert_eq!(buf.len(), 32);
        assert_eq!(layout.range(Buffer::Slots), None);
        let mut end = 0;
        for (b, d) in data {
            let r = layout.range(b).unwrap();
            assert_eq!(r.start % PART_ALIGN_WORDS, 0, "{b:?} at {r:?}");
            assert!(r.start >= end, "{b:?} overlaps the part before");
            end = layout.kernel_range(b).unwrap().end;
            assert!(end <= layout.words());
            assert_eq!(&buf[r], d, "{b:?}");
        }
        // Padding is zero.
        for w in [3, 7, 8, 9, 10, 11, 29, 30, 31] {
            assert_eq!(buf[w], 0, "word {w}");
        }
        assert_eq!(
            layout.parts().collect::<Vec<_>>(),
            [
                Buffer::TokenIds,
                Buffer::Positions,
                Buffer::LogitsRows,
                Buffer::BlockTables
            ]
        );
    }

    #[test]
    fn a_reused_buffer_gets_its_padding_cleared_and_a_short_one_is_refused() {
        let data: [(Buffer, &[u32]); 2] = [(Buffer::Slots, &[5]), (Buffer::SeqLens, &[6, 7])];
        let (layout, _) = pack(&data).unwrap();
        let mut dst = vec![0xdead_beef; 64];
        layout.write(&data, &mut dst).unwrap();
        assert_eq!(&dst[..8], &[5, 0, 0, 0, 6, 7, 0, 0]);
        assert_eq!(dst[8], 0xdead_beef, "past the layout: untouched");
        let err = layout.write(&data, &mut dst[..7]).unwrap_err().to_string();
        assert!(err.contains("7 words"), "{err}");
        let err = layout
            .write(
                &[(Buffer::Slots, &[5, 6]), (Buffer::SeqLens, &[6, 7])],
                &mut dst,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("Slots of 2 words"), "{err}");
        let err = layout.write(&data[..1], &mut dst).unwrap_err().to_string();
        assert!(err.contains("1 parts"), "{err}");
    }

    #[test]
    fn duplicates_and_oversized_layouts_are_refused() {
        let err = PackedLayout::new(&[(Buffer::Slots, 1), (Buffer::Slots, 2)]).unwrap_err();
        assert!(err.to_string().contains("Slots packed twice"), "{err}");
        let err =
            PackedLayout::new(&[(Buffer::Slots, MAX_WORDS - 2), (Buffer::SeqLens, 8)]).unwrap_err();
        assert!(err.to_string().contains("SeqLens of 8 words"), "{err}");
        assert!(PackedLayout::new(&[(Buffer::Slots, usize::MAX)]).is_err());
        let empty = PackedLayout::new(&[]).unwrap();
        assert_eq!(empty.words(), PART_ALIGN_WORDS);
    }

    #[test]
    fn attention_parts_carry_the_host_metadata() {
        let mut meta = crate::paged_attention::AttentionMetadata::new(4);
        meta.push(1, 6, &[3, 1]);
        meta.push(3, 3, &[2]);
        let host = HostMeta::new(&meta);
        let parts = attention_parts(&host);
        let (layout, buf) = pack(&parts).unwrap();
        assert_eq!(&buf[layout.range(Buffer::QueryStart).unwrap()], &[0, 1, 4]);
        assert_eq!(&buf[layout.range(Buffer::SeqLens).unwrap()], &[6, 3]);
        assert_eq!(
            &buf[layout.range(Buffer::BlockTables).unwrap()],
            &[3, 1, 2, 0]
        );
        assert_eq!(&buf[layout.range(Buffer::DecodeRows).unwrap()], &[0]);
        assert_eq!(&buf[layout.range(Buffer::PrefillRows).unwrap()], &[1, 2, 3]);
        assert_eq!(&buf[layout.range(Buffer::TokenSeq).unwrap()], &[0, 1, 1, 1]);
    }
}
