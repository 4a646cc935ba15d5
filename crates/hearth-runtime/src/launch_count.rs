//! hearth's own kernel launches, counted where they are launched: the CUDA path
//! (paged attention, fused RoPE + cache write, the small-batch GEMV, fused add + norm
//! and SiLU·mul, sampling) and the CPU emulator that runs
//! the same plans. Per thread, so the engine thread reads its own steps' launches
//! (and tests running side by side do not see each other's). candle's kernels
//! (projections, embedding, the first norm, copies) are launched inside candle and are
//! not counted here (at most gemv::MAX_ROWS rows the projections are hearth's GEMV and
//! counted).

use std::cell::Cell;

thread_local! {
    static LAUNCHES: Cell<u64> = const { Cell::new(0) };
}

/// Counts `n` launches made on this thread.
pub fn note(n: u64) {
    LAUNCHES.with(|c| c.set(c.get().saturating_add(n)));
}

/// The launches made on this thread since the last call, and starts counting afresh.
pub fn take() -> u64 {
    LAUNCHES.with(|c| c.replace(0))
}

/// hearth's launches in one forward pass of `layers` layers whose attention call
/// launches `attention_launches` kernels (launch.rs's plan): per layer the fused RoPE
/// and cache write, the attention plan and `layer_op_launches` more
/// (layer_kernels::launches_per_layer: the four GEMVs at few rows, the fused
/// element-wise ops otherwise); then `after_layers` (layer_kernels::launches_after_layers:
/// the LM head's GEMV) and the sampling kernel when the step needs it (a greedy step
/// without penalties, masks or log-probs is candle's argmax).
pub fn per_step(
    layers: usize,
    attention_launches: usize,
    layer_op_launches: usize,
    after_layers: usize,
    sampling_kernel: bool,
) -> u64 {
    (layers * (1 + attention_launches + layer_op_launches) + after_layers) as u64
        + u64::from(sampling_kernel)
}
