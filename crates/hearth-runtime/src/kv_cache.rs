//! The paged KV cache's storage: per layer, one key and one value tensor laid out
//! `[num_blocks, block_size, kv_heads, head_dim]`, the layout vLLM-style and
//! FlashAttention's paged kernels read. A token's slot is `block * block_size +
//! offset`; new keys are written there in place. Which blocks a sequence owns is the
//! block allocator's business, not this file's.

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;

pub struct KvCacheTensors {
    layers: Vec<(Tensor, Tensor)>,
    pub num_blocks: usize,
    pub block_size: usize,
}

/// Bytes one token's keys and values take across all layers.
pub fn bytes_per_token(cfg: &ModelConfig, dtype: DType) -> usize {
    2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.size_in_bytes()
}

impl KvCacheTensors {
    pub fn new(
        cfg: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        crate::paged_attention::check_supported(
            cfg.head_dim,
            cfg.num_attention_heads / cfg.num_key_value_heads.max(1),
            block_size,
            device,
        )?;
        let shape = (
            num_blocks,
            block_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            num_blocks,
            block_size,
        })
    }

    /// Frees the tensors (before a rebuild allocates new ones, so the two never need
    /// the device memory at once).
    pub fn release(&mut self) {
        self.layers.clear();
    }

    pub fn layer(&self, i: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[i];
        (k, v)
    }
}
