//! Choosing the device and dtype, and how much memory the KV cache may take.

use candle_core::{DType, Device};

use crate::error::{Result, RuntimeError};

/// `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn select_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0).map_err(|e| RuntimeError::Device(e.to_string()))
            } else {
                Ok(Device::Cpu)
            }
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()
                .map_err(|_| RuntimeError::Device(format!("bad device {s:?}: expected cuda:N")))?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                return Err(RuntimeError::Device(
                    "this hearth was built without CUDA; rebuild with `--features cuda` or use --device cpu".into(),
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| RuntimeError::Device(e.to_string()))
        }
        other => Err(RuntimeError::Device(format!(
            "unknown device {other:?}: expected auto, cpu, cuda or cuda:N"
        ))),
    }
}

/// `auto` is bf16 on CUDA (what checkpoints ship in) and f32 on CPU (where bf16
/// matmuls are slow).
pub fn resolve_dtype(spec: &str, device: &Device) -> Result<DType> {
    match spec {
        "auto" => Ok(if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        }),
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(RuntimeError::Device(format!(
            "unknown dtype {other:?}: expected auto, f32, f16 or bf16"
        ))),
    }
}

/// The KV cache budget when none is given. On CUDA: what `gpu_memory_utilization` of
/// the card leaves after the weights. On CPU: enough for 64 full-length sequences,
/// at most 2 GiB, since host memory is shared with everything else.
pub fn default_kv_budget(
    device: &Device,
    gpu_memory_utilization: f32,
    bytes_per_token: usize,
    max_model_len: usize,
    _max_num_seqs: usize,
) -> Result<u64> {
    if device.is_cuda() {
        return cuda_kv_budget(gpu_memory_utilization);
    }
    let want = bytes_per_token as u64 * max_model_len as u64 * 64;
    Ok(want.min(2 << 30))
}

#[cfg(feature = "cuda")]
fn cuda_kv_budget(util: f32) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
    let (free, total) =
        mem_get_info().map_err(|e| RuntimeError::Device(format!("cudaMemGetInfo: {e:?}")))?;
    let reserve = ((1.0 - util.clamp(0.05, 0.99) as f64) * total as f64) as u64;
    let budget = (free as u64).saturating_sub(reserve);
    if budget == 0 {
        return Err(RuntimeError::Device(format!(
            "no device memory left for the KV cache ({free} bytes free of {total}; gpu_memory_utilization {util})"
        )));
    }
    Ok(budget)
}

#[cfg(not(feature = "cuda"))]
fn cuda_kv_budget(_util: f32) -> Result<u64> {
    Err(RuntimeError::Device("built without CUDA".into()))
}

/// The KV cache's share of a budget measured from free device memory, once `reserved`
/// bytes of other per-engine device allocations (the penalty table) are taken out: those
/// are allocated after the cache, from the same free memory.
pub fn kv_budget_after(budget: u64, reserved: u64) -> Result<u64> {
    match budget.checked_sub(reserved) {
        Some(left) if left > 0 => Ok(left),
        _ => Err(RuntimeError::Device(format!(
            "no device memory left for the KV cache: {budget} bytes free for it, \
             {reserved} needed by the penalty table"
        ))),
    }
}

/// Parses `512MiB`, `2GiB`, `1.5GB`, `1000000` (bytes).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512MiB or 4GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("{s:?} must be a positive size"));
    }
    Ok((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse() {
        assert_eq!(super::parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(super::parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(super::parse_bytes("1000").unwrap(), 1000);
        assert!(super::parse_bytes("lots").is_err());
        assert!(super::parse_bytes("-1GiB").is_err());
    }

    #[test]
    fn the_penalty_table_comes_out_of_the_kv_budget() {
        use crate::penalty_table::PenaltyTable;
        // An H100's measured budget and Llama-3's table (261 rows of its vocabulary).
        let table = PenaltyTable::device_bytes(128_256, 256);
        assert_eq!(table, 256 * 128_256 * 2);
        let left = super::kv_budget_after(60 << 30, table).unwrap();
        assert_eq!(left, (60 << 30) - 256 * 128_256 * 2);
        assert_eq!(super::kv_budget_after(1000, 0).unwrap(), 1000);
        // Nothing (or less than nothing) left: an error naming both sizes.
        for budget in [table, table - 1] {
            let err = super::kv_budget_after(budget, table)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&table.to_string()) && err.contains("penalty table"),
                "{err}"
            );
        }
    }
}
