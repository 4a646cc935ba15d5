//! The paged KV cache's storage: per layer, one key and one value tensor laid out
//! `[num_blocks, block_size, kv_heads, head_dim]`, the layout vLLM-style and
//! FlashAttention's paged kernels read. A token's slot is `block * block_size +
//! offset`; new keys are written there in place. Which blocks a sequence owns is the
//! block allocator's business, not this file's.

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;

pub struct KvCacheTensors {
    layers: Vec<(Tensor, Tensor)>,
    dtype: DType,
    pub num_blocks: usize,
    pub block_size: usize,
}

/// `--kv-cache-dtype`: `auto` (None: see [`resolve_dtype`]), f32, f16, bf16.
pub fn parse_dtype(name: &str) -> Result<Option<DType>, String> {
    match name {
        "auto" => Ok(None),
        "f32" => Ok(Some(DType::F32)),
        "f16" => Ok(Some(DType::F16)),
        "bf16" => Ok(Some(DType::BF16)),
        other => Err(format!(
            "kv_cache_dtype {other:?} is not one of auto, f32, f16, bf16"
        )),
    }
}

/// The cache's element type: `requested` (`--kv-cache-dtype`) or, when None (`auto`),
/// f16 on the CPU under f32 activations (f32 and quantized models; llama.cpp's default:
/// long contexts read half the bytes; the CPU attention converts each block of keys
/// with F16C as it reads it) and the compute dtype otherwise. A cache narrower than the compute
/// dtype is for the CPU with f32 activations only (the CPU attention and cache write
/// convert; the CUDA kernels read one dtype).
pub fn resolve_dtype(
    requested: Option<DType>,
    compute: DType,
    device: &Device,
) -> Result<DType, String> {
    let Some(want) = requested else {
        return Ok(if device.is_cpu() && compute == DType::F32 {
            DType::F16
        } else {
            compute
        });
    };
    if !matches!(want, DType::F32 | DType::F16 | DType::BF16) {
        return Err(format!(
            "kv_cache_dtype {want:?} is not one of f32, f16, bf16"
        ));
    }
    if want == compute || (device.is_cpu() && compute == DType::F32 && want != DType::F32) {
        return Ok(want);
    }
    Err(format!(
        "kv_cache_dtype {want:?} with compute dtype {compute:?} on {}: a cache dtype other than the compute dtype needs f32 on the CPU",
        if device.is_cpu() { "the CPU" } else { "this device" }
    ))
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
            dtype,
            num_blocks,
            block_size,
        })
    }

    /// Frees the tensors (before a rebuild allocates new ones, so the two never need
    /// the device memory at once).
    pub fn release(&mut self) {
        self.layers.clear();
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn layer(&self, i: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[i];
        (k, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dtypes_narrower_than_the_compute_dtype_are_cpu_f32_only() {
        let cpu = Device::Cpu;
        // auto: f16 under f32 activations on the CPU, the compute dtype otherwise.
        assert_eq!(resolve_dtype(None, DType::F32, &cpu), Ok(DType::F16));
        assert_eq!(resolve_dtype(None, DType::BF16, &cpu), Ok(DType::BF16));
        assert_eq!(resolve_dtype(None, DType::F16, &cpu), Ok(DType::F16));
        assert_eq!(
            resolve_dtype(Some(DType::F32), DType::F32, &cpu),
            Ok(DType::F32)
        );
        assert_eq!(
            resolve_dtype(Some(DType::F16), DType::F32, &cpu),
            Ok(DType::F16)
        );
        assert_eq!(
            resolve_dtype(Some(DType::BF16), DType::F32, &cpu),
            Ok(DType::BF16)
        );
        assert_eq!(
            resolve_dtype(Some(DType::F16), DType::F16, &cpu),
            Ok(DType::F16)
        );
        let wider = resolve_dtype(Some(DType::F32), DType::F16, &cpu).unwrap_err();
        assert!(
            wider.contains("kv_cache_dtype F32") && wider.contains("F16"),
            "{wider}"
        );
        let odd = resolve_dtype(Some(DType::U8), DType::F32, &cpu).unwrap_err();
        assert!(odd.contains("not one of"), "{odd}");
        assert_eq!(parse_dtype("auto"), Ok(None));
        assert_eq!(parse_dtype("f16"), Ok(Some(DType::F16)));
        assert!(parse_dtype("q8").unwrap_err().contains("\"q8\""));
    }
}
