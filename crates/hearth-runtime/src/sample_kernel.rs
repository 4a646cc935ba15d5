//! The sampling kernel (kernels/sample.cu), packed and launched the same way for its
//! two runners: the CUDA path (`sample_cuda`, feature `cuda`) and the CPU emulator
//! (`sample_emulated`, test builds), whose tests hold it to the CPU sampler
//! (device_sampler.rs's `sample_one`) bit for bit.
//!
//! One upload per step: every row's parameters, banned ids, constraint mask and, for
//! a row without a penalty-table slot (or one whose slot is new), its penalised tokens
//! with their counts, packed into one u32 buffer; one small copy back: `[S, 2 + 2N]`
//! words per step (token, log-prob, N alternatives), never the logits. Rows with a
//! filled slot read their penalties from the device's table (penalty_table.rs).

#![cfg_attr(not(any(feature = "cuda", hearth_cuda_emulator)), allow(dead_code))]

use candle_core::Result;

use crate::device_sampler::{draw_params, penalty_entries, RowSampling};
use crate::seeded_draw::LANES;

/// Threads per block (one block per row): the lanes of the draw's fixed-order sums.
pub(crate) const THREADS: u32 = LANES as u32;
/// Words of a row's header in the packed buffer (kernels/sample.cu's SAMPLE_ROW_WORDS).
pub(crate) const ROW_WORDS: usize = 19;
const FLAG_GREEDY: u32 = 1;
const FLAG_MASK: u32 = 2;
const FLAG_TOP_P: u32 = 4;
const FLAG_LOGPROBS: u32 = 8;
const FLAG_TABLE: u32 = 16;
const FLAG_TABLE_FILL: u32 = 32;
const FLAG_TABLE_COUNT: u32 = 64;
const FLAG_TABLE_SEEN: u32 = 128;
const NO_SLOT: u32 = u32::MAX;
pub(crate) const KERNEL: &str = "hearth_sample";

/// Words per output row for these rows: token, log-prob, then (id, log-prob) pairs.
pub(crate) fn out_width(rows: &[RowSampling]) -> usize {
    2 + 2 * rows.iter().filter_map(|r| r.top_n()).max().unwrap_or(0)
}

/// The step's one upload: `rows.len()` headers, then each row's lists. A row's table
/// slot must be below `table_rows` and its own in this step (the kernel writes it).
pub(crate) fn pack(rows: &[RowSampling], vocab: usize, table_rows: usize) -> Result<Vec<u32>> {
    if vocab == 0 || vocab > i32::MAX as usize {
        candle_core::bail!("sampling kernel: vocabulary of {vocab} tokens");
    }
    let mask_words = vocab.div_ceil(32);
    let mut meta = vec![0u32; rows.len() * ROW_WORDS];
    let mut slots = std::collections::HashSet::new();
    for (i, r) in rows.iter().enumerate() {
        let p = r.params;
        let d = draw_params(r);
        if let Some(t) = r.table {
            if t.slot as usize >= table_rows || !slots.insert(t.slot) {
                candle_core::bail!(
                    "sampling kernel: penalty-table slot {} (of {table_rows}) given twice or out of range",
                    t.slot
                );
            }
        }
        // A filled table row already holds the penalties: nothing to list.
        let entries = match r.table {
            Some(t) if t.filled => Vec::new(),
            _ => penalty_entries(r),
        };
        let at = |meta: &Vec<u32>| -> Result<u32> {
            u32::try_from(meta.len())
                .map_err(|_| candle_core::Error::Msg("sampling kernel: step too large".into()))
        };
        let entries_at = at(&meta)?;
        for &(t, seen, count) in &entries {
            meta.push(t);
            meta.push(count.min(0x7fff_ffff) | ((seen as u32) << 31));
        }
        let banned_at = at(&meta)?;
        meta.extend_from_slice(r.banned);
        let mask_at = at(&meta)?;
        if let Some(mask) = r.allowed {
            // Words past the mask's end allow nothing (constraint::mask_allows).
            meta.extend((0..mask_words).map(|w| mask.get(w).copied().unwrap_or(0)));
        }
        let mut flags = 0;
        if p.temperature <= 1e-5 {
            flags |= FLAG_GREEDY;
        }
        if r.allowed.is_some() {
            flags |= FLAG_MASK;
        }
        if d.top_p < 1.0 {
            flags |= FLAG_TOP_P;
        }
        if r.top_n().is_some() {
            flags |= FLAG_LOGPROBS;
        }
        if let Some(t) = r.table {
            flags |= FLAG_TABLE;
            if !t.filled {
                flags |= FLAG_TABLE_FILL;
            }
            if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
                flags |= FLAG_TABLE_COUNT;
            }
            if p.repetition_penalty != 1.0 {
                flags |= FLAG_TABLE_SEEN;
            }
        }
        let h = &mut meta[i * ROW_WORDS..(i + 1) * ROW_WORDS];
        h.copy_from_slice(&[
            flags,
            d.temperature.to_bits(),
            u32::try_from(d.top_k).unwrap_or(u32::MAX),
            d.top_p.to_bits(),
            d.min_p.to_bits(),
            crate::seeded_draw::flush(p.repetition_penalty).to_bits(),
            crate::seeded_draw::flush(p.frequency_penalty).to_bits(),
            crate::seeded_draw::flush(p.presence_penalty).to_bits(),
            d.seed as u32,
            (d.seed >> 32) as u32,
            d.position as u32,
            (d.position >> 32) as u32,
            r.top_n().unwrap_or(0) as u32,
            entries_at,
            entries.len() as u32,
            banned_at,
            r.banned.len() as u32,
            mask_at,
            r.table.map_or(NO_SLOT, |t| t.slot),
        ]);
    }
    Ok(meta)
}

/// Words of the step's upload for these rows (a row with a filled table slot lists
/// no penalties: its share does not grow with its length).
pub fn upload_words(rows: &[RowSampling], vocab: usize, table_rows: usize) -> Result<usize> {
    Ok(pack(rows, vocab, table_rows)?.len())
}

/// The launch: one block of [`THREADS`] per row, static shared memory only.
pub(crate) fn geometry(rows: usize) -> Result<([u32; 3], [u32; 3])> {
    let limits = crate::paged_attention::SM90_LIMITS;
    if rows == 0 || rows > limits.max_grid[0] as usize {
        candle_core::bail!("sampling kernel: {rows} rows in one launch");
    }
    Ok(([rows as u32, 1, 1], [THREADS, 1, 1]))
}

/// Runs the kernel in the CPU emulator on `logits` (`[rows, vocab]`): each row's packed
/// output, as the CUDA path copies it back. No penalty table: rows must hold no slot.
#[cfg(hearth_cuda_emulator)]
pub fn sample_emulated(
    logits: &[f32],
    vocab: usize,
    rows: &[RowSampling],
    emu: &crate::cuda_emulator::Emulator,
) -> Result<Vec<Vec<u32>>> {
    let mut none = emulated_table(0, vocab);
    sample_emulated_with(logits, vocab, rows, &mut none, emu)
}

/// An emulated device's penalty table of `rows` rows (penalty_table.rs), zeroed, as the
/// CUDA path allocates it (one element at least).
#[cfg(hearth_cuda_emulator)]
pub fn emulated_table(rows: usize, vocab: usize) -> crate::cuda_emulator::DeviceBuffer {
    crate::cuda_emulator::DeviceBuffer::from_bytes(&vec![0u8; (rows * vocab).max(1) * 2], "u16")
}

/// [`sample_emulated`] with `table` (from [`emulated_table`]) as the device's penalty
/// table, which the kernel reads and updates: keep it between steps as the engine does.
#[cfg(hearth_cuda_emulator)]
pub fn sample_emulated_with(
    logits: &[f32],
    vocab: usize,
    rows: &[RowSampling],
    table: &mut crate::cuda_emulator::DeviceBuffer,
    emu: &crate::cuda_emulator::Emulator,
) -> Result<Vec<Vec<u32>>> {
    use crate::cuda_emulator::{DeviceBuffer, KernelArg, LaunchGeometry};
    let s = rows.len();
    if logits.len() != s * vocab {
        candle_core::bail!("sampling kernel: {} logits for {s} x {vocab}", logits.len());
    }
    let meta = pack(rows, vocab, table.bytes().len() / 2 / vocab.max(1))?;
    let width = out_width(rows);
    let (grid, block) = geometry(s)?;
    let bytes = |v: &[u32]| v.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
    let f32_bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_ne_bytes()).collect();
    let mut logits_buf = DeviceBuffer::from_bytes(&f32_bytes, "f32");
    let mut meta_buf = DeviceBuffer::from_bytes(&bytes(&meta), "u32");
    let mut scratch = DeviceBuffer::uninit(s * 2 * vocab * 4, "f32");
    let mut out = DeviceBuffer::uninit(s * width * 4, "u32");
    emu.launch(
        &LaunchGeometry {
            kernel: KERNEL,
            grid,
            block,
            dynamic_shared_bytes: 0,
            shared_limit_bytes: crate::paged_attention::SM90_LIMITS.default_shared_bytes,
        },
        &mut [
            KernelArg::Buffer(&mut logits_buf),
            KernelArg::Buffer(&mut meta_buf),
            KernelArg::Buffer(table),
            KernelArg::Buffer(&mut scratch),
            KernelArg::Buffer(&mut out),
            KernelArg::I32(vocab as i32),
            KernelArg::I32(width as i32),
        ],
    )?;
    let words: Vec<u32> = out
        .bytes()
        .chunks_exact(4)
        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(words.chunks(width).map(|c| c.to_vec()).collect())
}

/// Runs the kernel on the GPU over `logits` (`[rows, vocab]` f32 on a CUDA device): the
/// packed `[rows, width]` result, copied back (the only copy to the host). `table`: the
/// device's penalty table, which rows holding a slot read and update.
#[cfg(feature = "cuda")]
pub(crate) fn sample_cuda(
    logits: &candle_core::Tensor,
    rows: &[RowSampling],
    table: Option<&mut crate::penalty_table::PenaltyTable>,
) -> Result<Vec<Vec<u32>>> {
    let (s, vocab) = logits.dims2()?;
    if s != rows.len() {
        candle_core::bail!(
            "sampling kernel: {s} rows of logits for {} requests",
            rows.len()
        );
    }
    let (table_rows, table) = match table {
        Some(t) if t.vocab() == vocab => (t.rows(), t.device_rows()),
        Some(t) => candle_core::bail!(
            "sampling kernel: a penalty table of {} tokens for logits of {vocab}",
            t.vocab()
        ),
        None => (0, None),
    };
    let op = cuda::SampleKernelOp {
        meta: pack(rows, vocab, if table.is_some() { table_rows } else { 0 })?,
        width: out_width(rows),
        table: std::sync::Mutex::new(table),
    };
    logits
        .to_dtype(candle_core::DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&op)?
        .to_vec2::<u32>()
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Result, Shape};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sample.ptx"));

    pub(super) struct SampleKernelOp<'a> {
        pub meta: Vec<u32>,
        pub width: usize,
        /// The penalty table (written by the kernel), when the engine has one.
        pub table: std::sync::Mutex<Option<&'a mut CudaSlice<u16>>>,
    }

    impl CustomOp1 for SampleKernelOp<'_> {
        fn name(&self) -> &'static str {
            "hearth-sample-kernel"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("sampling kernel: CUDA only (the CPU samples in device_sampler.rs)")
        }

        fn cuda_fwd(&self, st: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let (s, vocab) = l.shape().dims2()?;
            let dev = st.device().clone();
            let (grid, block) = super::geometry(s)?;
            let logits: CudaView<f32> = st.as_cuda_slice::<f32>()?.slice(l.start_offset()..);
            let meta: CudaSlice<u32> = dev.clone_htod(&self.meta)?;
            // SAFETY: the kernel writes every scratch element it reads (the adjusted row
            // and e) and every output word (zeroed first).
            let scratch: CudaSlice<f32> = unsafe { dev.alloc::<f32>(s * 2 * vocab)? };
            let out: CudaSlice<u32> = unsafe { dev.alloc::<u32>(s * self.width)? };
            let mut table = self
                .table
                .lock()
                .map_err(|_| candle_core::Error::Msg("sampling kernel: table lock".into()))?;
            // No table: a one-element stand-in for the pointer (pack() gave no row a slot).
            let mut stand_in = match table.as_ref() {
                Some(_) => None,
                None => Some(dev.alloc_zeros::<u16>(1)?),
            };
            let table: &mut CudaSlice<u16> = match (table.as_deref_mut(), stand_in.as_mut()) {
                (Some(t), _) => t,
                (None, Some(t)) => t,
                (None, None) => candle_core::bail!("sampling kernel: no penalty table"),
            };
            let func = dev.get_or_load_custom_func(super::KERNEL, "hearth_sample", PTX)?;
            let cfg = LaunchConfig {
                grid_dim: (grid[0], grid[1], grid[2]),
                block_dim: (block[0], block[1], block[2]),
                shared_mem_bytes: 0,
            };
            let (v, w) = (vocab as i32, self.width as i32);
            let mut b = func.builder();
            b.arg(&logits);
            b.arg(&meta);
            b.arg(table);
            b.arg(&scratch);
            b.arg(&out);
            b.arg(&v);
            b.arg(&w);
            // SAFETY: the arguments are the kernel's signature (the emulator's tests run
            // the same list against the compiled source); pack() wrote every offset
            // inside `meta` and checked the vocabulary's size.
            unsafe { b.launch(cfg) }.w()?;
            crate::launch_count::note(1);
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from((s, self.width)),
            ))
        }
    }
}
