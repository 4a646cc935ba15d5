//! Two builds of hearth's own kernels (kernels/*.cu):
//! - with the `cuda-emulator` feature (test builds only): the CPU emulator's (kernels/emu/), the very same source compiled by the
//!   host C++ compiler through `cc`, plus deliberately broken copies of it that the
//!   test suite runs to show the emulator catches such bugs (see MUTANTS);
//! - with the `cuda` feature: PTX with nvcc, for the compute capability in
//!   CUDA_COMPUTE_CAP (as candle-kernels does; default 80: bf16 needs sm_80+, and PTX
//!   is JIT-compiled for newer GPUs).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel sources, each one translation unit for nvcc and the emulator.
const KERNELS: &[&str] = &[
    "paged_attention",
    "rope_cache",
    "sample",
    "layer_ops",
    "gemv",
];
/// Sources for the emulator alone (kernels/emu/): kernels that test the emulator.
const EMULATOR_ONLY: &[&str] = &["emu/selftest"];

/// Broken copies the emulator must reject: (kernel, name, replaced text, replacement).
/// Every occurrence is replaced; build.rs fails if the text is not there, so a mutant
/// cannot silently become a copy of the original.
const MUTANTS: &[(&str, &str, &str, &str)] = &[
    (
        "paged_attention",
        "block_table_off_by_one",
        "table[j / block_size]",
        "table[(j + 1) / block_size]",
    ),
    ("paged_attention", "no_syncthreads", "__syncthreads();", ";"),
    (
        "paged_attention",
        "combine_drops_partition",
        "combine_parts = (keys + partition_keys - 1) / partition_keys",
        "combine_parts = keys / partition_keys",
    ),
    (
        "paged_attention",
        "counter_not_reset",
        "counters[slot] = 0u;",
        ";",
    ),
    ("sample", "no_syncthreads", "__syncthreads();", ";"),
    (
        "sample",
        "gumbel_bound_too_low",
        "#define GUMBEL_BOUND 17.0f",
        "#define GUMBEL_BOUND 2.0f",
    ),
    (
        "sample",
        "head_mass_doubled",
        "q = __fadd_rn(q, ei);",
        "q = __fadd_rn(q, 2.0f * ei);",
    ),
    (
        "sample",
        "row_bisection_half_mass",
        "row_part = __fadd_rn(row_part, ei);",
        "row_part = __fadd_rn(row_part, 0.5f * ei);",
    ),
    (
        "sample",
        "table_not_updated",
        "trow[token] = (unsigned short)w;",
        "(void)w;",
    ),
    ("layer_ops", "no_syncthreads", "__syncthreads();", ";"),
    (
        "layer_ops",
        "up_off_by_one",
        "const T* u = g + width;",
        "const T* u = g + width - 1;",
    ),
    ("gemv", "no_syncthreads", "__syncthreads();", ";"),
    (
        "gemv",
        "tail_tile_dropped",
        "for (int k0 = 0; k0 < k_in; k0 += tile_k)",
        "for (int k0 = 0; k0 + tile_k <= k_in; k0 += tile_k)",
    ),
];

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    // The emulator's coroutine switch is x86-64 assembly; elsewhere the crate builds
    // without it (and without its tests).
    println!("cargo::rustc-check-cfg=cfg(hearth_cuda_emulator)");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    // Only test builds want it (this crate's dev-dependency on itself switches the
    // feature on), so release binaries carry no emulator.
    let wanted = std::env::var_os("CARGO_FEATURE_CUDA_EMULATOR").is_some();
    if wanted && os == "linux" && arch == "x86_64" {
        println!("cargo:rustc-cfg=hearth_cuda_emulator");
        build_emulator(&out_dir);
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        for k in KERNELS {
            build_ptx(k, &out_dir);
        }
    }
}

/// Removes `path` if it is there, so what is written next is a new file. A target
/// directory copied with hard links (as worktrees sharing a warmed one are) shares
/// OUT_DIR's files between copies: writing one in place (as `fs::write` and compilers'
/// `-o` do) would change every copy's.
fn unlink(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

fn write_new(path: &Path, text: &str) {
    unlink(path);
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn build_ptx(kernel: &str, out_dir: &Path) {
    let src = format!("kernels/{kernel}.cu");
    let out = out_dir.join(format!("{kernel}.ptx"));
    unlink(&out);
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap = cap.trim().trim_start_matches("sm_").replace('.', "");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "--use_fast_math"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed on {src} ({s})"),
        Err(e) => panic!(
            "the cuda feature needs nvcc to compile {src} ({nvcc}: {e}); \
             scripts/build-cuda.sh sets one up"
        ),
    }
}

fn emu_build() -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .include("kernels/emu")
        .opt_level(2)
        .warnings(false)
        .flag_if_supported("-Wno-unknown-pragmas")
        .cargo_warnings(false);
    b
}

/// One emulator translation unit per (kernel source, variant): the source text as nvcc
/// sees it, with only what C++ linkage and host shared memory need changed (see
/// `host_text`), inside its own namespace, and a table of its entry points.
fn build_emulator(out_dir: &Path) {
    // Objects and the archive from an earlier run, possibly hard links shared with
    // another copy of the target directory (see `unlink`).
    for entry in std::fs::read_dir(out_dir).expect("OUT_DIR").flatten() {
        let path = entry.path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("o" | "a" | "cpp")
        ) {
            unlink(&path);
        }
    }
    let mut units = Vec::new();
    for path in KERNELS.iter().chain(EMULATOR_ONLY) {
        let text = std::fs::read_to_string(format!("kernels/{path}.cu"))
            .unwrap_or_else(|e| panic!("kernels/{path}.cu: {e}"));
        let kernel = path.rsplit('/').next().unwrap_or(path);
        units.push((kernel.to_string(), "original".to_string(), text.clone()));
        for (k, name, from, to) in MUTANTS.iter().filter(|m| m.0 == kernel) {
            assert!(
                text.contains(from),
                "mutant {k}/{name}: `{from}` is not in the source"
            );
            units.push((k.to_string(), name.to_string(), text.replace(from, to)));
        }
    }
    let mut build = emu_build();
    build.file("kernels/emu/runtime.cpp");
    for (kernel, variant, text) in units {
        let (includes, body) = host_text(&text);
        let ns = format!("hearth_emu_{kernel}_{variant}");
        let unit = format!(
            "#include \"cuda_emu.h\"\n{includes}\nnamespace {ns} {{\n#line 1 \"{kernel}.cu\"\n{body}\n}}\n"
        );
        let listed = out_dir.join(format!("emu_{kernel}_{variant}_list.cpp"));
        write_new(&listed, &unit);
        let expanded = emu_build()
            .define("HEARTH_EMU_LIST_KERNELS", None)
            .file(&listed)
            .expand();
        let expanded = String::from_utf8_lossy(&expanded);
        let names = kernel_names(&expanded);
        assert!(
            !names.is_empty(),
            "no __global__ entry points in kernels/{kernel}.cu"
        );
        let mut table = format!("{unit}\nstatic const hearth_emu::KernelEntry {ns}_table[] = {{\n");
        for n in &names {
            table.push_str(&format!("    HEARTH_EMU_KERNEL(\"{n}\", {ns}::{n}),\n"));
        }
        table.push_str(&format!(
            "}};\nextern \"C\" const hearth_emu::KernelEntry* hearth_emu_kernels_{kernel}_{variant}(size_t i) {{\n    \
             return i < {len} ? &{ns}_table[i] : nullptr;\n}}\n",
            len = names.len()
        ));
        let path = out_dir.join(format!("emu_{kernel}_{variant}.cpp"));
        write_new(&path, &table);
        build.file(path);
    }
    build.compile("hearth_cuda_emu");
}

/// Entry points: the names after the mark `__global__` expands to when listing.
fn kernel_names(expanded: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mark = "hearth_emu_kernel_mark";
    let mut rest = expanded;
    while let Some(at) = rest.find(mark) {
        rest = &rest[at + mark.len()..];
        let decl = rest.trim_start();
        let Some(decl) = decl.strip_prefix("void") else {
            continue;
        };
        let name: String = decl
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // Templated kernels cannot be launched by name (no extern "C" symbol): skipped.
        if !name.is_empty()
            && decl.trim_start()[name.len()..]
                .trim_start()
                .starts_with('(')
        {
            names.push(name);
        }
    }
    names.sort();
    names.dedup();
    names
}

/// The source for the host compiler: `#include` lines lifted out (they go before the
/// namespace), `extern "C"` dropped (each variant's kernels live in their own
/// namespace), and `__shared__` declarations turned into the emulated block's shared
/// memory (`extern __shared__ T a[];` a pointer to the dynamic part, `__shared__ T
/// a[N];` a reference to an array allotted per block). Line numbers are kept.
fn host_text(src: &str) -> (String, String) {
    let mut includes = String::new();
    let mut body = String::new();
    for line in src.lines() {
        if line.trim_start().starts_with("#include") {
            includes.push_str(line);
            includes.push('\n');
            body.push('\n');
        } else {
            body.push_str(&line.replace("extern \"C\"", ""));
            body.push('\n');
        }
    }
    (includes, rewrite_shared(&body))
}

fn rewrite_shared(src: &str) -> String {
    let mut out = String::new();
    let mut rest = src;
    while let Some(at) = rest.find("__shared__") {
        let before = &rest[..at];
        let end = at
            + rest[at..]
                .find(';')
                .expect("a __shared__ declaration ends with ;");
        let decl = rest[at + "__shared__".len()..end].trim();
        let is_extern = before.trim_end().ends_with("extern");
        let before = if is_extern {
            before.trim_end().strip_suffix("extern").unwrap_or(before)
        } else {
            before
        };
        out.push_str(before);
        // Alignment requests are honoured by the allotment (16 bytes at least).
        let mut decl = decl.to_string();
        while let Some(a) = decl.find("__align__(") {
            let close = a + decl[a..].find(')').expect("__align__(n)");
            decl.replace_range(a..=close, "");
        }
        let (head, dims) = match decl.find('[') {
            Some(b) => (decl[..b].trim().to_string(), decl[b..].trim().to_string()),
            None => (decl.trim().to_string(), String::new()),
        };
        let name_at = head
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        let (ty, name) = (head[..name_at].trim(), &head[name_at..]);
        if is_extern {
            out.push_str(&format!(
                "{ty}* {name} = reinterpret_cast<{ty}*>(hearth_emu::dynamic_shared())"
            ));
        } else {
            let arr = format!("{ty}{dims}");
            out.push_str(&format!(
                "{ty} (&{name}){dims} = *reinterpret_cast<{ty} (*){dims}>(hearth_emu::static_shared(\
                 sizeof({arr}), alignof({arr}) < 16 ? 16 : alignof({arr}), [] {{ static char key; return (const void*)&key; }}()))"
            ));
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}
