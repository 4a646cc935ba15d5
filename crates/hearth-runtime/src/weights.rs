//! Where a model's tensors come from: memory-mapped safetensors, or (for
//! `--load-format dummy`) seeded random values made on demand, per tensor, so that
//! even an 8B shape needs no files and no second copy in memory.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

use crate::error::{Result, RuntimeError};

pub enum WeightSource {
    Safetensors(Vec<PathBuf>),
    /// A GGUF file: read through `gguf::GgufTensors`, not a `VarBuilder`.
    Gguf(PathBuf),
    /// Random weights with this seed.
    Dummy(u64),
}

pub fn var_builder(
    source: &WeightSource,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    match source {
        WeightSource::Safetensors(paths) => {
            if paths.is_empty() {
                return Err(RuntimeError::Weights("no *.safetensors files found".into()));
            }
            // SAFETY: the files are memory-mapped read-only; like every safetensors
            // loader we rely on nobody truncating them while the server runs.
            let vb = unsafe { VarBuilder::from_mmaped_safetensors(paths, dtype, device) }?;
            Ok(vb)
        }
        WeightSource::Gguf(p) => Err(RuntimeError::Weights(format!(
            "{}: a GGUF file is read through gguf::GgufTensors",
            p.display()
        ))),
        WeightSource::Dummy(seed) => Ok(VarBuilder::from_backend(
            Box::new(SeededRandom { seed: *seed }),
            dtype,
            device.clone(),
        )),
    }
}

/// Deterministic random weights: the same seed and tensor name always give the same
/// values, whatever order the model asks for them in.
pub struct SeededRandom {
    pub seed: u64,
}

impl SeededRandom {
    pub fn tensor(
        &self,
        shape: &Shape,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        if name.ends_with("norm.weight") {
            // Unit norms keep activations in range however deep the model is.
            return Tensor::ones(shape, dtype, device);
        }
        if name.ends_with(".bias") {
            return Tensor::zeros(shape, dtype, device);
        }
        let mut h = self.seed ^ 0x9E37_79B9_7F4A_7C15;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
        }
        let mut rng = rand::rngs::SmallRng::seed_from_u64(h);
        // Uniform with the std of a normal(0, 0.02) init; uniform is much cheaper to draw
        // for billions of values and has the same effect on the compute.
        let a = 0.02f32 * 3f32.sqrt();
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(-a..a)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }
}

impl SimpleBackend for SeededRandom {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.tensor(&s, name, dtype, dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("dummy weights need a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}
