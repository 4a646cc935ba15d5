//! Compute kernels hearth runs on the CPU where candle's are slow or too coarse. A crate of
//! its own so that dev and test builds compile it optimized (see the workspace
//! Cargo.toml) while the rest of the runtime stays quick to build.

pub mod dense;
pub mod q8;
pub mod quant_matmul;
