//! With the `cuda` feature, compiles hearth's own CUDA kernels (kernels/*.cu) to PTX
//! with nvcc, for the compute capability in CUDA_COMPUTE_CAP (as candle-kernels does;
//! default 80: bf16 needs sm_80+, and PTX is JIT-compiled for newer GPUs).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels/paged_attention.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("paged_attention.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap = cap.trim().trim_start_matches("sm_").replace('.', "");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "--use_fast_math"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("kernels/paged_attention.cu")
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed on kernels/paged_attention.cu ({s})"),
        Err(e) => panic!(
            "the cuda feature needs nvcc to compile kernels/paged_attention.cu ({nvcc}: {e}); \
             scripts/build-cuda.sh sets one up"
        ),
    }
}
