//! Dense weights packed once at load for hearth-kernels' dense product (f32, or bf16
//! with `--cpu-weight-dtype bf16`), with candle tensors in and out: every dense
//! projection of a model on the CPU, at any row count, and a tied embedding table read
//! from the output projection's packed copy (so tying costs no second copy).

use candle_core::{DType, Device, Result, Storage, Tensor};
use hearth_kernels::dense::PackedWeight;

use crate::linear::Linear;

pub use hearth_kernels::dense::WeightDtype;

/// How a packed weight is named in the load log: `F32 packed`, `BF16 packed`.
pub fn label(dtype: WeightDtype) -> String {
    format!("{} packed", format!("{dtype:?}").to_uppercase())
}

/// `w [n, k]` (any float dtype, on the CPU) packed as `dtype`.
pub fn pack(w: &Tensor, dtype: WeightDtype) -> Result<PackedWeight> {
    let (n, k) = w.dims2()?;
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("packing a [{n}, {k}] weight: it is not on the CPU");
    };
    let start = layout.start_offset();
    let values = &cpu.as_slice::<f32>()?[start..start + n * k];
    Ok(PackedWeight::pack(values, n, k, dtype))
}

/// `x [.., k] · Wᵀ → [.., n]` in x's dtype, W's panels split over hearth's CPU pool.
pub fn linear(x: &Tensor, w: &PackedWeight) -> Result<Tensor> {
    let (n, k) = (w.n(), w.k());
    let mut dims = x.dims().to_vec();
    if k == 0 || dims.last() != Some(&k) || !x.device().is_cpu() {
        candle_core::bail!(
            "packed matmul: input {:?} on {:?} against weight [{n}, {k}] on the CPU",
            x.dims(),
            x.device().location()
        );
    }
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let out = {
        let (storage, layout) = x32.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("packed matmul: input not on the CPU");
        };
        let start = layout.start_offset();
        let xs = &cpu.as_slice::<f32>()?[start..start + x32.elem_count()];
        w.matmul(xs, &|panels, work| {
            crate::threads::parallel_chunks(panels, 1, work)
        })
    };
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(out, dims, &Device::Cpu)?.to_dtype(x.dtype())
}

/// The rows of `table` for token `ids` (any shape), as `[ids.., k]` in `dtype`.
pub fn embedding(ids: &Tensor, table: &PackedWeight, dtype: DType) -> Result<Tensor> {
    let (n, k) = (table.n(), table.k());
    let flat = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let mut out = vec![0f32; flat.len() * k];
    if k > 0 {
        for (row, &id) in out.chunks_exact_mut(k).zip(&flat) {
            if id as usize >= n {
                candle_core::bail!("token id {id} is not below the vocabulary size {n}");
            }
            table.row_into(id as usize, row);
        }
    }
    let mut dims = ids.dims().to_vec();
    dims.push(k);
    Tensor::from_vec(out, dims, &Device::Cpu)?.to_dtype(dtype)
}

/// Bytes of a dense weight that packing replaces (0 for others).
pub(crate) fn dense_bytes(l: &Linear) -> usize {
    match l {
        Linear::Dense(d) => d.weight().elem_count() * d.weight().dtype().size_in_bytes(),
        _ => 0,
    }
}

pub(crate) fn packed_bytes(l: &Linear) -> usize {
    match l {
        Linear::Packed { weight, .. } => weight.bytes(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// 3-D input keeps its leading dims; the product equals candle's matmul.
    #[test]
    fn linear_matches_candle_matmul() {
        let dev = Device::Cpu;
        for &(m, n, k) in &[(1, 7, 13), (5, 33, 64), (70, 100, 72)] {
            let x = Tensor::randn(0f32, 1.0, (2, m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            let got = linear(&x, &pack(&w, WeightDtype::F32).unwrap()).unwrap();
            assert_eq!(got.dims(), &[2, m, n]);
            let d = max_diff(&got, &want);
            assert!(d < 1e-4, "({m},{n},{k}): max diff {d}");
        }
        let x = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
        let w = pack(
            &Tensor::zeros((4, 6), DType::F32, &dev).unwrap(),
            WeightDtype::F32,
        );
        let err = linear(&x, &w.unwrap()).unwrap_err().to_string();
        assert!(err.contains("[3, 5]") && err.contains("[4, 6]"), "{err}");
    }

    #[test]
    fn embedding_reads_the_packed_rows() {
        let dev = Device::Cpu;
        let table = Tensor::randn(0f32, 1.0, (70, 24), &dev).unwrap();
        let ids = Tensor::new(&[[3u32, 69], [0, 33]], &dev).unwrap();
        let want = candle_nn::Embedding::new(table.clone(), 24);
        let want = candle_core::Module::forward(&want, &ids).unwrap();
        let packed = pack(&table, WeightDtype::F32).unwrap();
        let got = embedding(&ids, &packed, DType::F32).unwrap();
        assert_eq!(got.dims(), &[2, 2, 24]);
        assert_eq!(max_diff(&got, &want), 0.0);
        let bad = Tensor::new(&[70u32], &dev).unwrap();
        let err = embedding(&bad, &packed, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("70") && err.contains("vocabulary"), "{err}");
    }
}
