//! The built-in demo model: a tiny Llama with seeded weights and a byte-level BPE
//! tokenizer trained here from a built-in text. It is written out as an ordinary
//! Hugging Face folder and loaded through the same path as any user's model, so the
//! demo exercises the real loader, tokenizer, chat template and engine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

use crate::error::{Result, RuntimeError};
use crate::weights::SeededRandom;

pub const DEMO_VOCAB_SIZE: usize = 512;
/// Bump when anything below changes, so stale cached copies are not reused.
const DEMO_REVISION: &str = "demo-v2";
const DEMO_SEED: u64 = 20_261_125;

pub const SPECIAL_TOKENS: [&str; 5] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
];

pub const LLAMA3_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

const CORPUS: &str = "The hearth is the heart of the house. A fire burns low through the night, and in \
the morning someone stirs the embers and adds wood. Bread is baked, water is boiled, and the kitchen \
fills with the smell of coffee and toast. People come and go; they talk about the weather, the \
garden, the news of the town, and the work of the day. A server answers requests: it reads the \
prompt, runs the model one step at a time, and streams the words back as they are made. Many \
requests share one step, so the machine is never idle while there is work to do. Numbers: 0 1 2 3 \
4 5 6 7 8 9 10 100 1000. Punctuation: (a), [b], {c}; \"quoted\" and 'single'. Code: fn main() { \
println!(\"hello, world\"); } def f(x): return x * 2. Français : le café est prêt, à bientôt. \
Deutsch: Grüße aus München, schöne Straße. Ελληνικά: Καλημέρα κόσμε. Русский: Привет, мир. \
日本語: こんにちは世界。中文：你好，世界。한국어: 안녕하세요. Emoji: 🔥🎉🙂.";

pub fn default_cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("HEARTH_CACHE") {
        return PathBuf::from(d);
    }
    if let Ok(d) = std::env::var("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("hearth");
    }
    match std::env::var("HOME") {
        Ok(h) => PathBuf::from(h).join(".cache").join("hearth"),
        Err(_) => std::env::temp_dir().join("hearth-cache"),
    }
}

/// Writes the demo model under `cache_dir` (once) and returns its folder.
pub fn ensure_demo_model(cache_dir: &Path) -> Result<PathBuf> {
    let dir = cache_dir.join(DEMO_REVISION);
    if dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache_dir).map_err(|e| RuntimeError::io(cache_dir, e))?;
    // Build in a private folder and rename, so concurrent first starts (tests run in
    // parallel) never see a half-written model.
    let tmp = cache_dir.join(format!(
        "{DEMO_REVISION}.tmp-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| RuntimeError::io(&tmp, e))?;
    write_demo_model(&tmp)?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if dir.join("model.safetensors").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(RuntimeError::io(&dir, e)),
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| RuntimeError::Json {
        path: path.into(),
        source: e,
    })?;
    std::fs::write(path, text).map_err(|e| RuntimeError::io(path, e))
}

fn write_demo_model(dir: &Path) -> Result<()> {
    let mut cfg = crate::presets::preset("demo")
        .ok_or_else(|| RuntimeError::Config("demo preset missing".into()))?;
    cfg.bos_token_id = Some(0);
    cfg.eos_token_ids = vec![1, 4];
    write_demo_tokenizer(&dir.join("tokenizer.json"))?;
    write_json(&dir.join("config.json"), &cfg.to_hf_json())?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({
            "bos_token": SPECIAL_TOKENS[0],
            "eos_token": SPECIAL_TOKENS[4],
            "chat_template": LLAMA3_CHAT_TEMPLATE,
            "model_max_length": cfg.max_position_embeddings,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &serde_json::json!({"bos_token_id": 0, "eos_token_id": [1, 4], "temperature": 0.6, "top_p": 0.9}),
    )?;
    // Weights: every tensor the model asks for, drawn by the same seeded generator as
    // dummy loads, saved as a real safetensors file.
    let random = SeededRandom { seed: DEMO_SEED };
    let mut tensors = HashMap::new();
    let (h, d) = (cfg.hidden_size, cfg.head_dim);
    let mut add = |name: String, shape: (usize, usize)| -> Result<()> {
        let t = random.tensor(&shape.into(), &name, DType::F32, &Device::Cpu)?;
        tensors.insert(name, t);
        Ok(())
    };
    add("model.embed_tokens.weight".into(), (cfg.vocab_size, h))?;
    add("lm_head.weight".into(), (cfg.vocab_size, h))?;
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        add(
            format!("{p}.self_attn.q_proj.weight"),
            (cfg.num_attention_heads * d, h),
        )?;
        add(
            format!("{p}.self_attn.k_proj.weight"),
            (cfg.num_key_value_heads * d, h),
        )?;
        add(
            format!("{p}.self_attn.v_proj.weight"),
            (cfg.num_key_value_heads * d, h),
        )?;
        add(
            format!("{p}.self_attn.o_proj.weight"),
            (h, cfg.num_attention_heads * d),
        )?;
        add(
            format!("{p}.mlp.gate_proj.weight"),
            (cfg.intermediate_size, h),
        )?;
        add(
            format!("{p}.mlp.up_proj.weight"),
            (cfg.intermediate_size, h),
        )?;
        add(
            format!("{p}.mlp.down_proj.weight"),
            (h, cfg.intermediate_size),
        )?;
    }
    let mut vectors = vec!["model.norm.weight".to_string()];
    for i in 0..cfg.num_hidden_layers {
        vectors.push(format!("model.layers.{i}.input_layernorm.weight"));
        vectors.push(format!("model.layers.{i}.post_attention_layernorm.weight"));
    }
    for name in vectors {
        let t = random.tensor(&h.into(), &name, DType::F32, &Device::Cpu)?;
        tensors.insert(name, t);
    }
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    Ok(())
}

fn write_demo_tokenizer(path: &Path) -> Result<()> {
    let err = |e: tokenizers::Error| RuntimeError::Tokenizer(e.to_string());
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(DEMO_VOCAB_SIZE)
        .min_frequency(1)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .build();
    let bos = TemplateProcessing::builder()
        .try_single(format!("{} $A", SPECIAL_TOKENS[0]))
        .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?
        .special_tokens(vec![(SPECIAL_TOKENS[0], 0u32)])
        .build()
        .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(Some(bos.into()))
    .with_decoder(Some(ByteLevel::new(false, true, true).into()))
    .build()
    .map_err(err)?;
    let lines: Vec<&str> = CORPUS.split(". ").collect();
    tok.train(&mut trainer, lines.iter()).map_err(err)?;
    tok.save(path, false).map_err(err)
}

/// A tokenizer for `dummy:SHAPE` models: the demo's, padded with plain added tokens
/// (`<|t123|>`) up to the model's vocabulary, so every id a random model samples
/// decodes to text and streams like a real token would.
pub fn ensure_dummy_tokenizer(cache_dir: &Path, vocab_size: usize) -> Result<PathBuf> {
    let demo = ensure_demo_model(cache_dir)?;
    let path = cache_dir.join(format!("{DEMO_REVISION}-tokenizer-{vocab_size}.json"));
    if path.exists() {
        return Ok(path);
    }
    let mut tok = tokenizers::Tokenizer::from_file(demo.join("tokenizer.json"))
        .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
    let have = tok.get_vocab_size(true);
    let extra: Vec<AddedToken> = (have..vocab_size)
        .map(|i| AddedToken::from(format!("<|t{i}|>"), false))
        .collect();
    tok.add_tokens(extra)
        .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
    let tmp = cache_dir.join(format!(
        "{DEMO_REVISION}-tokenizer-{vocab_size}.json.tmp-{}",
        std::process::id()
    ));
    tok.save(&tmp, false)
        .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| RuntimeError::io(&path, e))?;
    Ok(path)
}
