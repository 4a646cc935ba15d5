//! GGUF files (llama.cpp's format): the hyper-parameters from the `ARCH.*` metadata keys,
//! and the tensors by the Hugging Face names the model asks for, with llama.cpp's q/k
//! row permutation undone so the model's RoPE (rotate-half) applies unchanged.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{Result, RuntimeError};

/// The GGUF architectures hearth runs. Mistral 7B-style models are `llama` in GGUF.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3"];

/// A GGUF file's header: metadata and where each tensor is.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
}

fn bad(path: &Path, reason: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Weights(format!("{}: {reason}", path.display()))
}

pub(crate) fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) if x >= 0 => Some(x as u64),
        Value::I16(x) if x >= 0 => Some(x as u64),
        Value::I32(x) if x >= 0 => Some(x as u64),
        Value::I64(x) if x >= 0 => Some(x as u64),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => Some(x as f64),
        Value::F64(x) => Some(x),
        _ => as_u64(v).map(|x| x as f64),
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = File::open(path).map_err(|e| RuntimeError::io(path, e))?;
        let content = Content::read(&mut f).map_err(|e| match unsupported_tensor(path) {
            Some((name, ty)) => bad(
                path,
                format!("tensor {name} is stored as ggml type {ty} ({}), which hearth cannot load (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)", ggml_type_name(ty)),
            ),
            None => bad(path, format!("not a GGUF file: {e}")),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(as_u64)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(as_f64)
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(b) => Some(*b),
            v => as_u64(v).map(|x| x != 0),
        }
    }

    fn required(&self, key: &str) -> Result<usize> {
        self.get_u64(key)
            .map(|v| v as usize)
            .ok_or_else(|| bad(&self.path, format!("metadata key {key} is missing")))
    }

    pub fn architecture(&self) -> Result<&str> {
        let arch = self
            .get_str("general.architecture")
            .ok_or_else(|| bad(&self.path, "metadata key general.architecture is missing"))?;
        if !SUPPORTED_ARCHITECTURES.contains(&arch) {
            return Err(bad(
                &self.path,
                format!(
                    "general.architecture {arch:?} is not supported (supported: {})",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ),
            ));
        }
        Ok(arch)
    }

    /// The model's configuration from the `ARCH.*` keys, the vocabulary and which
    /// tensors are present.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?;
        let k = |name: &str| format!("{arch}.{name}");
        let hidden = self.required(&k("embedding_length"))?;
        let heads = self.required(&k("attention.head_count"))?;
        if heads == 0 || hidden == 0 {
            return Err(bad(
                &self.path,
                "embedding_length and attention.head_count must be > 0",
            ));
        }
        let kv_heads = self
            .get_u64(&k("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(bad(
                &self.path,
                format!("{arch}.attention.head_count {heads} is not a multiple of head_count_kv {kv_heads}"),
            ));
        }
        let head_dim = self
            .get_u64(&k("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(hidden / heads);
        if let Some(v) = self.get_u64(&k("attention.value_length")) {
            if v as usize != head_dim {
                return Err(bad(
                    &self.path,
                    format!("{arch}.attention.value_length {v} differs from key_length {head_dim}: not supported"),
                ));
            }
        }
        if let Some(r) = self.get_u64(&k("rope.dimension_count")) {
            if r as usize != head_dim {
                return Err(bad(
                    &self.path,
                    format!("{arch}.rope.dimension_count {r} is not the head size {head_dim}: partial rotary embeddings are not supported"),
                ));
            }
        }
        if !head_dim.is_multiple_of(2) {
            return Err(bad(
                &self.path,
                format!("head size {head_dim} must be even"),
            ));
        }
        let vocab_size = match self.get_u64(&k("vocab_size")) {
            Some(v) => v as usize,
            None => match self.get("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => self
                    .content
                    .tensor_infos
                    .get("token_embd.weight")
                    .and_then(|t| t.shape.dims().first().copied())
                    .ok_or_else(|| bad(&self.path, "cannot tell the vocabulary size"))?,
            },
        };
        let rope_scaling = self.rope_scaling(arch, head_dim)?;
        let architecture = match arch {
            "qwen2" => Architecture::Qwen2,
            "qwen3" => Architecture::Qwen3,
            _ => Architecture::Llama,
        };
        let tensors = &self.content.tensor_infos;
        let mut eos: Vec<u32> = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = self.get_u64(key) {
                if !eos.contains(&(id as u32)) {
                    eos.push(id as u32);
                }
            }
        }
        Ok(ModelConfig {
            architecture,
            vocab_size,
            hidden_size: hidden,
            intermediate_size: self.required(&k("feed_forward_length"))?,
            num_hidden_layers: self.required(&k("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: self
                .get_f64(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6),
            rope_theta: self.get_f64(&k("rope.freq_base")).unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: self
                .get_u64(&k("context_length"))
                .map(|v| v as usize)
                .unwrap_or(4096),
            tie_word_embeddings: !tensors.contains_key("output.weight"),
            attention_bias: tensors.contains_key("blk.0.attn_q.bias"),
            qk_norm: tensors.contains_key("blk.0.attn_q_norm.weight"),
            bos_token_id: self
                .get_u64("tokenizer.ggml.bos_token_id")
                .map(|v| v as u32),
            eos_token_ids: eos,
        })
    }

    fn rope_scaling(&self, arch: &str, head_dim: usize) -> Result<RopeScaling> {
        // Llama 3.1-style scaling is stored as per-frequency divisors in a tensor.
        if let Some(info) = self.content.tensor_infos.get("rope_freqs.weight") {
            if info.ggml_dtype != GgmlDType::F32 || info.shape.elem_count() != head_dim / 2 {
                return Err(bad(
                    &self.path,
                    format!(
                        "rope_freqs.weight must be {} f32 values, got {:?} {:?}",
                        head_dim / 2,
                        info.ggml_dtype,
                        info.shape
                    ),
                ));
            }
            let bytes = read_raw(&self.path, &self.content, "rope_freqs.weight")?;
            let factors = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect();
            return Ok(RopeScaling::Factors(factors));
        }
        let kind = self
            .get_str(&format!("{arch}.rope.scaling.type"))
            .unwrap_or("none");
        match kind {
            "none" => Ok(RopeScaling::None),
            "linear" => {
                let factor = self
                    .get_f64(&format!("{arch}.rope.scaling.factor"))
                    .ok_or_else(|| bad(&self.path, "rope.scaling.type is linear but rope.scaling.factor is missing"))?;
                Ok(if factor == 1.0 {
                    RopeScaling::None
                } else {
                    RopeScaling::Linear { factor }
                })
            }
            other => Err(bad(
                &self.path,
                format!("{arch}.rope.scaling.type {other:?} is not supported (supported: none, linear, llama3 via rope_freqs)"),
            )),
        }
    }

    /// What the file's tensors are stored as, most common first (for logs).
    pub fn dtype_summary(&self) -> String {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for t in self.content.tensor_infos.values() {
            *counts.entry(format!("{:?}", t.ggml_dtype)).or_default() += 1;
        }
        let mut v: Vec<_> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.iter()
            .map(|(d, n)| format!("{n}×{d}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// llama.cpp's names for the ggml types candle does not know.
fn ggml_type_name(ty: u32) -> &'static str {
    match ty {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// The first tensor whose ggml type candle cannot read (Q2_K/Q3_K files put IQ4_NL on
/// rows not divisible by 256), by walking the GGUF header: candle's reader fails on it
/// without naming the tensor. None when the header is fine or unreadable another way.
fn unsupported_tensor(path: &Path) -> Option<(String, u32)> {
    use std::io::BufReader;
    let mut r = BufReader::new(File::open(path).ok()?);
    let mut b4 = [0u8; 4];
    let mut b8 = [0u8; 8];
    let mut u32_ = |r: &mut BufReader<File>| -> Option<u32> {
        r.read_exact(&mut b4).ok()?;
        Some(u32::from_le_bytes(b4))
    };
    let u64_ = |r: &mut BufReader<File>, b8: &mut [u8; 8]| -> Option<u64> {
        r.read_exact(b8).ok()?;
        Some(u64::from_le_bytes(*b8))
    };
    if u32_(&mut r)? != 0x4655_4747 || u32_(&mut r)? < 2 {
        return None;
    }
    let n_tensors = u64_(&mut r, &mut b8)?;
    let n_kv = u64_(&mut r, &mut b8)?;
    fn skip(r: &mut BufReader<File>, n: u64) -> Option<()> {
        r.seek_relative(i64::try_from(n).ok()?).ok()
    }
    fn string(r: &mut BufReader<File>) -> Option<String> {
        let mut b8 = [0u8; 8];
        r.read_exact(&mut b8).ok()?;
        let n = u64::from_le_bytes(b8);
        if n > 1 << 20 {
            return None;
        }
        let mut s = vec![0u8; n as usize];
        r.read_exact(&mut s).ok()?;
        String::from_utf8(s).ok()
    }
    fn value(r: &mut BufReader<File>, ty: u32, depth: u32) -> Option<()> {
        let fixed = |ty: u32| match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        match ty {
            8 => string(r).map(|_| ()),
            9 if depth < 4 => {
                let mut b4 = [0u8; 4];
                r.read_exact(&mut b4).ok()?;
                let inner = u32::from_le_bytes(b4);
                let mut b8 = [0u8; 8];
                r.read_exact(&mut b8).ok()?;
                let n = u64::from_le_bytes(b8);
                match fixed(inner) {
                    Some(size) => skip(r, n.checked_mul(size)?),
                    None => (0..n).try_for_each(|_| value(r, inner, depth + 1)),
                }
            }
            _ => skip(r, fixed(ty)?),
        }
    }
    for _ in 0..n_kv {
        string(&mut r)?;
        let ty = u32_(&mut r)?;
        value(&mut r, ty, 0)?;
    }
    for _ in 0..n_tensors {
        let name = string(&mut r)?;
        let dims = u32_(&mut r)?;
        if dims > 8 {
            return None;
        }
        skip(&mut r, 8 * dims as u64)?;
        let ty = u32_(&mut r)?;
        if !matches!(ty, 0..=3 | 6..=15 | 30) {
            return Some((name, ty));
        }
        skip(&mut r, 8)?;
    }
    None
}

fn read_raw(path: &Path, content: &Content, name: &str) -> Result<Vec<u8>> {
    let mut f = File::open(path).map_err(|e| RuntimeError::io(path, e))?;
    read_raw_from(&mut f, path, content, name)
}

fn tensor_bytes(dtype: GgmlDType, elems: usize) -> Option<usize> {
    if !elems.is_multiple_of(dtype.block_size()) {
        return None;
    }
    Some(elems / dtype.block_size() * dtype.type_size())
}

fn read_raw_from(f: &mut File, path: &Path, content: &Content, name: &str) -> Result<Vec<u8>> {
    let info = content
        .tensor_infos
        .get(name)
        .ok_or_else(|| bad(path, format!("tensor {name} is missing")))?;
    let size = tensor_bytes(info.ggml_dtype, info.shape.elem_count()).ok_or_else(|| {
        bad(
            path,
            format!(
                "tensor {name}: {} values do not fill whole {:?} blocks",
                info.shape.elem_count(),
                info.ggml_dtype
            ),
        )
    })?;
    let start = content
        .tensor_data_offset
        .checked_add(info.offset)
        .ok_or_else(|| bad(path, format!("tensor {name}: offset overflows")))?;
    let len = f.metadata().map_err(|e| RuntimeError::io(path, e))?.len();
    if start.saturating_add(size as u64) > len {
        return Err(bad(
            path,
            format!("tensor {name} needs {size} bytes at {start}, the file has {len}: truncated?"),
        ));
    }
    let mut buf = vec![0u8; size];
    f.seek(SeekFrom::Start(start))
        .and_then(|_| f.read_exact(&mut buf))
        .map_err(|e| RuntimeError::io(path, e))?;
    Ok(buf)
}

/// The GGUF name of a Hugging Face tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let (stem, leaf) = hf.rsplit_once('.')?;
    if stem == "lm_head" {
        return Some(format!("output.{leaf}"));
    }
    let stem = stem.strip_prefix("model.")?;
    let base = match stem {
        "embed_tokens" => "token_embd".to_string(),
        "norm" => "output_norm".to_string(),
        _ => {
            let rest = stem.strip_prefix("layers.")?;
            let (i, part) = rest.split_once('.')?;
            let part = match part {
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.q_norm" => "attn_q_norm",
                "self_attn.k_norm" => "attn_k_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                _ => return None,
            };
            format!("blk.{i}.{part}")
        }
    };
    Some(format!("{base}.{leaf}"))
}

/// Reads tensors out of a GGUF file by Hugging Face name.
#[derive(Clone)]
pub struct GgufTensors {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    content: Content,
    file: Mutex<File>,
    /// llama.cpp's converter interleaves the two rotary halves of every q/k head of
    /// `llama` models (its RoPE rotates adjacent pairs); `(heads, kv_heads)` to undo it.
    permuted_qk: Option<(usize, usize)>,
}

impl GgufTensors {
    pub fn new(file: GgufFile, cfg: &ModelConfig) -> Result<Self> {
        let f = File::open(&file.path).map_err(|e| RuntimeError::io(&file.path, e))?;
        let permuted_qk = (file.get_str("general.architecture") == Some("llama"))
            .then_some((cfg.num_attention_heads, cfg.num_key_value_heads));
        Ok(Self {
            inner: Arc::new(Inner {
                path: file.path,
                content: file.content,
                file: Mutex::new(f),
                permuted_qk,
            }),
        })
    }

    fn info(&self, hf: &str) -> Option<(String, &candle_core::quantized::gguf_file::TensorInfo)> {
        let name = gguf_name(hf)?;
        let info = self.inner.content.tensor_infos.get(&name)?;
        Some((name, info))
    }

    pub fn contains(&self, hf: &str) -> bool {
        self.info(hf).is_some()
    }

    /// Stored as F32/F16/BF16: such weights run as dense matrices.
    pub fn is_float(&self, hf: &str) -> bool {
        self.info(hf).is_some_and(|(_, i)| {
            matches!(
                i.ggml_dtype,
                GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
            )
        })
    }

    /// The tensor `hf` (a Hugging Face name), checked against the shape the model expects.
    pub fn tensor(
        &self,
        hf: &str,
        shape: &[usize],
        device: &Device,
    ) -> candle_core::Result<QTensor> {
        let path = &self.inner.path;
        let Some((name, info)) = self.info(hf) else {
            candle_core::bail!(
                "{}: no tensor {} (for {hf})",
                path.display(),
                gguf_name(hf).unwrap_or_else(|| hf.to_string())
            );
        };
        if info.shape.dims() != shape {
            candle_core::bail!(
                "{}: tensor {name} has shape {:?}, the metadata implies {shape:?}",
                path.display(),
                info.shape.dims()
            );
        }
        let mut bytes = {
            let mut f = self
                .inner
                .file
                .lock()
                .map_err(|_| candle_core::Error::Msg("gguf file lock poisoned".into()))?;
            read_raw_from(&mut f, path, &self.inner.content, &name)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
        };
        if let Some((heads, kv_heads)) = self.inner.permuted_qk {
            let n_head = if name.contains(".attn_q.") {
                Some(heads)
            } else if name.contains(".attn_k.") {
                Some(kv_heads)
            } else {
                None
            };
            if let Some(n) = n_head {
                let rows = shape[0];
                let row_bytes = bytes.len() / rows;
                bytes = unpermute_rows(&bytes, rows, row_bytes, n)?;
            }
        }
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            info.ggml_dtype,
            &bytes,
            info.shape.dims().to_vec(),
            device,
        )
    }
}

/// llama.cpp writes row `h·d + 2i + j` (head h, pair i, member j) where Hugging Face has
/// row `h·d + j·d/2 + i`. Rows are whole blocks of quantized bytes, so this moves bytes.
fn unpermute_rows(
    bytes: &[u8],
    rows: usize,
    row_bytes: usize,
    n_head: usize,
) -> candle_core::Result<Vec<u8>> {
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        candle_core::bail!("cannot undo the q/k permutation: {rows} rows over {n_head} heads");
    }
    let d = rows / n_head;
    let half = d / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * half + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "gguf_tests.rs"]
mod tests;
