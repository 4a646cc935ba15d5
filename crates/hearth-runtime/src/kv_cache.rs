//! The paged KV cache's storage: per layer, one key and one value tensor of
//! `num_blocks * block_size` slots. A token's slot is `block * block_size + offset`;
//! which blocks a sequence owns is the block allocator's business, not this file's.

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
        let width = cfg.num_key_value_heads * cfg.head_dim;
        let slots = num_blocks * block_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros((slots, width), dtype, device)?,
                    Tensor::zeros((slots, width), dtype, device)?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            num_blocks,
            block_size,
        })
    }

    pub fn layer(&self, i: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[i];
        (k, v)
    }
}
