//! Not a check: hearth's element-wise ops, projections and attention fed llama.cpp's own
//! inputs, op by op (issue 22). From a dump of every f32 tensor of llama.cpp's graph
//! (scripts/llama-dump-tensors.sh: the prompt in one ubatch, then one token per step,
//! `OUT/<step>/NNNN-name.f32` + `.shape`):
//!
//!   LLAMA_DUMP=OUT/<step> HEARTH_GGUF=FILE HEARTH_LAYERS=30 cargo test --workspace \
//!     --test llama_cpp_ops llama_cpp_ops_report -- --ignored --nocapture
//!
//! each output is compared with llama.cpp's bit for bit (`OP ... N of M differ`): the
//! first op that differs is where the two engines part. A dump without flash attention
//! (`FA=0`: f32 cache) checks hearth's f32 attention modes; one with flash attention
//! (`FA=1|auto`, llama-server's defaults: f16 cache) checks `--attention-numerics
//! llama-cpp` over an f16 cache. A decode step's attention reads the keys and values of
//! steps `0..=step` (the sibling folders).

use std::path::{Path, PathBuf};

use hearth_runtime::paged_attention::AttentionNumerics;

/// One step's dump: its tensors by (name, op).
struct Dump {
    dir: PathBuf,
    names: Vec<String>,
}

impl Dump {
    fn open(dir: PathBuf) -> Self {
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".shape"))
            .collect();
        names.sort();
        Self { dir, names }
    }

    /// The values and `ne` of tensor `name` computed by `op`.
    fn find(&self, name: &str, op: &str) -> Option<(Vec<f32>, Vec<usize>)> {
        self.names.iter().find_map(|f| {
            let stem = f.strip_suffix(".shape")?;
            if stem.split_once('-')?.1 != name {
                return None;
            }
            let shape = std::fs::read_to_string(self.dir.join(f)).ok()?;
            let parts: Vec<&str> = shape.split_whitespace().collect();
            if parts.get(4) != Some(&op) {
                return None;
            }
            let ne: Vec<usize> = parts[..4].iter().map(|x| x.parse().unwrap()).collect();
            let bytes = std::fs::read(self.dir.join(format!("{stem}.f32"))).ok()?;
            let v = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            Some((v, ne))
        })
    }
}

#[test]
#[ignore]
fn llama_cpp_ops_report() {
    use candle_core::{Device, Tensor};
    use half::f16;
    use hearth_runtime::cpu_ops;
    let dir = PathBuf::from(std::env::var("LLAMA_DUMP").expect("LLAMA_DUMP is not set"));
    let dump = Dump::open(dir.clone());
    let find = |name: &str, op: &str| dump.find(name, op);
    // The earlier steps of the same run (`OUT/0` .. `OUT/<step - 1>`), for their keys.
    let step: usize = dir
        .file_name()
        .and_then(|n| n.to_str()?.parse().ok())
        .unwrap_or(0);
    let earlier: Vec<Dump> = (0..step)
        .map(|s| Dump::open(dir.parent().unwrap().join(s.to_string())))
        .collect();
    // Flash attention's output is a reshaped view; without it a `cont`.
    let flash = find("kqv_out-0", "CONT").is_none();
    let kqv_op = if flash { "RESHAPE" } else { "CONT" };
    eprintln!(
        "dump {} (step {step}): {}",
        dir.display(),
        if flash {
            "flash attention, f16 cache"
        } else {
            "no flash attention, f32 cache"
        }
    );
    let cmp = |what: String, got: &[f32], want: &[f32]| {
        assert_eq!(got.len(), want.len(), "{what}");
        let diff = got
            .iter()
            .zip(want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        let max = got
            .iter()
            .zip(want)
            .map(|(a, b)| ((a - b) / b.abs().max(1e-30)).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "OP {what}: {diff} of {} differ (max rel {max:e})",
            got.len()
        );
    };
    let dev = Device::Cpu;
    // This step's first position: the tokens of the earlier steps.
    let p0: usize = earlier
        .iter()
        .map(|d| d.find("Kcur-0", "ROPE").map_or(0, |(_, ne)| ne[2]))
        .sum();
    let eps: f64 = std::env::var("HEARTH_EPS").map_or(1e-5, |e| e.parse().unwrap());
    let theta: f32 = std::env::var("HEARTH_THETA").map_or(100000.0, |e| e.parse().unwrap());
    let layers = std::env::var("HEARTH_LAYERS").map_or(3, |e| e.parse().unwrap());
    // The quantized projections, on llama.cpp's inputs (`HEARTH_GGUF`: the dumped file).
    let weights = std::env::var_os("HEARTH_GGUF").map(|p| {
        let file = hearth_runtime::gguf::GgufFile::open(Path::new(&p)).unwrap();
        let cfg = file.config().unwrap();
        let tensors = hearth_runtime::gguf::GgufTensors::new(file, &cfg).unwrap();
        hearth_runtime::weight_loader::WeightLoader::gguf(
            tensors,
            false,
            candle_core::DType::F32,
            dev.clone(),
        )
    });
    let project = |l: usize, hf: &str, input: (&str, &str), output: (&str, &str)| {
        use candle_core::Module;
        let (Some(w), Some((x, ne)), Some((want, wne))) = (
            weights.as_ref(),
            find(input.0, input.1),
            find(output.0, output.1),
        ) else {
            return;
        };
        let lin = w
            .pp(format!("model.layers.{l}.{hf}"))
            .linear(ne[0], wne[0], false)
            .unwrap();
        let xt = Tensor::from_vec(x, (ne[1], ne[0]), &dev).unwrap();
        let got: Vec<f32> = lin
            .forward(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let n = got.len().min(want.len());
        cmp(
            format!("layer {l} {hf} ({}) {} rows", lin.kind(), ne[1]),
            &got[got.len() - n..],
            &want[want.len() - n..],
        );
    };
    for l in 0..layers {
        project(
            l,
            "self_attn.v_proj",
            (&format!("attn_norm-{l}"), "MUL"),
            (&format!("Vcur-{l}"), "MUL_MAT"),
        );
        project(
            l,
            "self_attn.o_proj",
            (&format!("kqv_out-{l}"), kqv_op),
            (&format!("attn_out-{l}"), "MUL_MAT"),
        );
        project(
            l,
            "mlp.gate_proj",
            (&format!("ffn_norm-{l}"), "MUL"),
            (&format!("ffn_gate-{l}"), "MUL_MAT"),
        );
        project(
            l,
            "mlp.up_proj",
            (&format!("ffn_norm-{l}"), "MUL"),
            (&format!("ffn_up-{l}"), "MUL_MAT"),
        );
        project(
            l,
            "mlp.down_proj",
            (&format!("ffn_swiglu-{l}"), "SWIGLU"),
            (&format!("ffn_out-{l}"), "MUL_MAT"),
        );
        // RMSNorm (llama.cpp's norm-L is x·scale; its weight is a separate MUL).
        let x = if l == 0 {
            find("embd", "GET_ROWS")
        } else {
            find(&format!("l_out-{}", l - 1), "ADD")
        };
        if let (Some((x, ne)), Some((want, _))) = (x, find(&format!("norm-{l}"), "RMS_NORM")) {
            let xt = Tensor::from_vec(x, (ne[1], ne[0]), &dev).unwrap();
            let ones = Tensor::ones(ne[0], candle_core::DType::F32, &dev).unwrap();
            let got: Vec<f32> = cpu_ops::rms_norm(&xt, &ones, eps)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            cmp(format!("layer {l} rms_norm"), &got, &want);
        }
        // SwiGLU.
        if let (Some((g, ne)), Some((u, _)), Some((want, _))) = (
            find(&format!("ffn_gate-{l}"), "MUL_MAT"),
            find(&format!("ffn_up-{l}"), "MUL_MAT"),
            find(&format!("ffn_swiglu-{l}"), "SWIGLU"),
        ) {
            let gt = Tensor::from_vec(g, (ne[1], ne[0]), &dev).unwrap();
            let ut = Tensor::from_vec(u, (ne[1], ne[0]), &dev).unwrap();
            let got: Vec<f32> = cpu_ops::silu_mul(&gt, &ut)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            cmp(format!("layer {l} swiglu"), &got, &want);
        }
        // RoPE on Q, in hearth's rotate-half order (GGUF rows interleave the halves).
        if let (Some((pre, ne)), Some((want, _))) = (
            find(&format!("Qcur-{l}"), "RESHAPE"),
            find(&format!("Qcur-{l}"), "ROPE"),
        ) {
            let (d, h, t) = (ne[0], ne[1], ne[2]);
            let half = d / 2;
            let deint = |v: &[f32]| -> Vec<f32> {
                v.chunks(d)
                    .flat_map(|r| {
                        (0..half)
                            .map(|i| r[2 * i])
                            .chain((0..half).map(|i| r[2 * i + 1]))
                            .collect::<Vec<_>>()
                    })
                    .collect()
            };
            let theta_scale = theta.powf(-2.0 / d as f32);
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            for p in p0..p0 + t {
                let mut a = p as f32;
                for _ in 0..half {
                    cos.push(a.cos());
                    sin.push(a.sin());
                    a *= theta_scale;
                }
            }
            let positions: Vec<u32> = (0..t as u32).collect(); // rows of `cos`/`sin`
            let rope = cpu_ops::Rope {
                cos: &cos,
                sin: &sin,
                positions: &positions,
            };
            let qt = Tensor::from_vec(deint(&pre), (t, h, d), &dev).unwrap();
            let got: Vec<f32> = cpu_ops::rope(&qt, rope)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            cmp(
                format!("layer {l} rope (llama.cpp angles)"),
                &got,
                &deint(&want),
            );
            // The rotation with GCC's contraction: x0·c − x1·s as fma(x0, c, −x1·s).
            let pre_h = deint(&pre);
            let mut fused = vec![0f32; pre_h.len()];
            for (r, row) in pre_h.chunks(d).enumerate() {
                let p = r / h;
                for i in 0..half {
                    let (c, s) = (cos[p * half + i], sin[p * half + i]);
                    let (x0, x1) = (row[i], row[i + half]);
                    fused[r * d + i] = x0.mul_add(c, -(x1 * s));
                    fused[r * d + i + half] = x0.mul_add(s, x1 * c);
                }
            }
            cmp(
                format!("layer {l} rope fused fma(x0,c,-x1s)"),
                &fused,
                &deint(&want),
            );
        }
        // Attention over llama.cpp's rotated Q, its K and V of this step and the earlier
        // ones, as one sequence whose last `t` tokens are this step's (one ubatch).
        let kv = |name: &str, op: &str| -> Option<Vec<f32>> {
            let mut all = Vec::new();
            for d in &earlier {
                all.extend(d.find(name, op)?.0);
            }
            all.extend(find(name, op)?.0);
            Some(all)
        };
        if let (Some((q, qne)), Some((_, kne)), Some(k), Some(v), Some((want, _))) = (
            find(&format!("Qcur-{l}"), "ROPE"),
            find(&format!("Kcur-{l}"), "ROPE"),
            kv(&format!("Kcur-{l}"), "ROPE"),
            kv(&format!("Vcur-{l}"), "MUL_MAT"),
            find(&format!("kqv_out-{l}"), kqv_op),
        ) {
            let (d, h, t, kvh) = (qne[0], qne[1], qne[2], kne[1]);
            let keys = k.len() / (kvh * d);
            let half = d / 2;
            let re = |v: &[f32], perm: bool| -> Vec<f32> {
                if !perm {
                    return v.to_vec();
                }
                v.chunks(d)
                    .flat_map(|r| {
                        (0..half)
                            .map(|i| r[2 * i])
                            .chain((0..half).map(|i| r[2 * i + 1]))
                            .collect::<Vec<_>>()
                    })
                    .collect()
            };
            let modes: &[(&str, bool, AttentionNumerics)] = if flash {
                &[
                    (
                        "hearth's kernels, f16 cache",
                        true,
                        AttentionNumerics::Hearth,
                    ),
                    (
                        "llama-cpp numerics, f16 cache",
                        true,
                        AttentionNumerics::LlamaCpp,
                    ),
                ]
            } else {
                &[
                    ("interleaved", false, AttentionNumerics::Hearth),
                    ("rotate-half", true, AttentionNumerics::Hearth),
                    ("llama-cpp numerics", true, AttentionNumerics::LlamaCpp),
                ]
            };
            for &(order, perm, numerics) in modes {
                let bs = 16;
                let nb = keys.div_ceil(bs) + 1;
                let mut kc = vec![0f32; nb * bs * kvh * d];
                let mut vc = vec![0f32; nb * bs * kvh * d];
                kc[..keys * kvh * d].copy_from_slice(&re(&k, perm));
                vc[..keys * kvh * d].copy_from_slice(&v);
                let mut meta = hearth_runtime::paged_attention::AttentionMetadata::new(bs);
                meta.numerics = numerics;
                let blocks: Vec<u32> = (0..nb as u32).collect();
                meta.push(t, keys, &blocks);
                let shape = (nb, bs, kvh, d);
                // llama.cpp writes K and V to its f16 cache rounded to nearest.
                let (kt, vt) = if flash {
                    let h16 = |x: Vec<f32>| x.into_iter().map(f16::from_f32).collect::<Vec<_>>();
                    (
                        Tensor::from_vec(h16(kc), shape, &dev).unwrap(),
                        Tensor::from_vec(h16(vc), shape, &dev).unwrap(),
                    )
                } else {
                    (
                        Tensor::from_vec(kc, shape, &dev).unwrap(),
                        Tensor::from_vec(vc, shape, &dev).unwrap(),
                    )
                };
                let qt = Tensor::from_vec(re(&q, perm), (t, h, d), &dev).unwrap();
                let got: Vec<f32> = hearth_runtime::paged_attention::paged_attention(
                    &qt,
                    &kt,
                    &vt,
                    &meta,
                    1.0 / (d as f32).sqrt(),
                )
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
                cmp(
                    format!("layer {l} attention ({order}; {t} queries over {keys} keys)"),
                    &got,
                    &want,
                );
            }
        }
    }
}
