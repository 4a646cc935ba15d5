//! hearth's greedy output against llama.cpp's on the same quantized file, 5 prompts × 32
//! tokens, from the continuations llama-server produced on that file
//! (scripts/llama-cpp-goldens.sh records them in tests/goldens/):
//! - SmolLM2-135M-Instruct Q4_K_M, made from the Q4_1 wheel file by llama.cpp's
//!   `llama-quantize` (scripts/make-smollm2-q4km.sh): Q4_K/Q6_K/Q5_0/Q8_0 layers;
//! - the Q4_1 file itself (scripts/fetch-smollm2.sh), the demo model: Q4_1 with a Q8_0
//!   output layer, plus a chat turn through the file's template;
//! - SmolLM2 Q8_0 (scripts/bench-gguf.sh q8_0, llama-quantize's);
//! - a random-weight Llama of dummy:bench-small's shape, every width a multiple of 256,
//!   as Q4_K_M and Q6_K (scripts/bench-gguf.sh small-q4_k_m / small-q6_k): the K-quant
//!   blocks with no legacy fallbacks.
//!
//! Both engines quantize activations to 8 bits the same way for every layer, so their
//! integer products agree; what still differs is attention — llama.cpp keeps its KV
//! cache in f16 and runs attention on f16 queries — and the order of float sums. On a
//! near-tie that moves a token, and a free-running continuation follows it from there:
//! Q4_K_M continuations are equal to the last token on 3 of 5 prompts (the other two part
//! at tokens 16 and 28), Q4_1's part at tokens 5–16 (its distributions are flatter).
//! So the tests also compare teacher-forced: hearth's top-1 after each prefix of
//! llama.cpp's continuation, where a near-tie costs one position. Measured (this CPU):
//!
//! | file   | forced, 8-bit acts | forced, 16-bit acts (before) | chat turn equal for |
//! |--------|--------------------|------------------------------|---------------------|
//! | Q4_K_M | 137 / 139          | 136 / 139 (Q8_0 layers)      |                     |
//! | Q4_1   | 155 / 160          | 153 / 160                    | 15 tokens (16-bit: 0, "Paris") |
//!
//! The bounds below fail for the 16-bit kernel and pass with llama.cpp's arithmetic;
//! the f16 KV cache (issue 22) should close the rest.

mod common;

use std::path::{Path, PathBuf};

use candle_core::DType;
use hearth_runtime::kv_cache::KvCacheTensors;
use hearth_runtime::model::ForwardBatch;
use hearth_runtime::{
    EngineConfig, GenerationEvent, GenerationRequest, ModelSpec, PromptSpec, SamplingParams,
};
use sha2::{Digest, Sha256};

/// The bounds measured with full-precision keys and values (the engine's CPU default
/// is an f16 cache; `f16_kv_cache_against_llama_cpp` checks that one).
const F32_CACHE: Option<DType> = Some(DType::F32);

/// SmolLM2 Q8_0, measured on main at 35c0cad (this CPU, AVX-512 VNNI; the K-quant tiles opt-in there): teacher-forced 148 of 157
/// positions (94%), free-running equal on 2 of 5 prompts, the others parting at tokens
/// 1, 11 and 23. Lower than Q4_K_M's 137/139 on weights of twice the bits: hearth's Q8_0
/// arithmetic is not yet llama.cpp's (issue 22's goal is 5 of 5); these bounds hold what
/// is measured so that a regression fails.
const Q8_0_FORCED_PERCENT: usize = 94;
const Q8_0_EQUAL: usize = 2;
const Q8_0_PREFIX: usize = 1;

/// bench-small (random weights) Q4_K_M and Q6_K, measured likewise: teacher-forced 142 and
/// 143 of 160 (89%; Q4_K_M 147 since Q4_K follows llama.cpp's repacked order); free-running 2 of 5 and 0 of 5 equal (first departures at tokens 0
/// and 0: a random model's top two logits are close, but a wrong block decode or scale
/// drops agreement to a few percent).
const SMALL_FORCED_PERCENT: usize = 88;

fn q4_k_m() -> PathBuf {
    bench_gguf("q4_k_m", "HEARTH_SMOLLM2_Q4KM_GGUF")
}

/// A GGUF file of scripts/bench-gguf.sh (made once into the cache by llama.cpp's
/// `llama-quantize`), or the path in `env` when that is set.
fn bench_gguf(format: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench-gguf.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(format)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "the {format} GGUF cannot be made (needed by this test): {} {format}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn engine(
    path: &Path,
    golden: &serde_json::Value,
    kv_cache_dtype: Option<DType>,
) -> hearth_runtime::EngineHandle {
    assert_eq!(
        sha256(path),
        golden["file_sha256"].as_str().unwrap(),
        "{} is not the file the goldens were recorded on (rerun scripts/llama-cpp-goldens.sh)",
        path.display()
    );
    let mut spec = ModelSpec::new(path.to_string_lossy());
    spec.device = "cpu".into();
    spec.dtype = "f32".into();
    hearth_runtime::load(
        &spec,
        &EngineConfig {
            kv_cache_memory: Some(128 << 20),
            kv_cache_dtype,
            ..Default::default()
        },
    )
    .unwrap()
    .engine
}

fn ids(case: &serde_json::Value, key: &str) -> Vec<u32> {
    case[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn greedy(engine: &hearth_runtime::EngineHandle, prompt: Vec<u32>, n: usize) -> Vec<u32> {
    let mut s = engine
        .submit(GenerationRequest {
            prompt,
            params: SamplingParams::greedy(n),
        })
        .unwrap();
    let mut got = Vec::new();
    while let Some(ev) = s.blocking_next() {
        match ev {
            GenerationEvent::Token { id, .. } => got.push(id),
            GenerationEvent::Finished(_) => break,
            GenerationEvent::Started { .. } => {}
        }
    }
    got
}

/// Where hearth's greedy continuation of `prompt` first departs from `want` (llama.cpp's),
/// and by how much hearth preferred its own token there: its log-prob minus that of
/// llama.cpp's token (infinite when llama.cpp's is not in hearth's top 5; 0 when it never
/// departs).
fn departure(
    engine: &hearth_runtime::EngineHandle,
    prompt: Vec<u32>,
    want: &[u32],
) -> (usize, f32) {
    let mut s = engine
        .submit(GenerationRequest {
            prompt,
            params: SamplingParams {
                logprobs: Some(5),
                ..SamplingParams::greedy(want.len())
            },
        })
        .unwrap();
    let mut at = 0;
    while let Some(ev) = s.blocking_next() {
        match ev {
            GenerationEvent::Token { id, logprobs, .. } => {
                if id != want[at] {
                    let lp = logprobs.unwrap();
                    let theirs = lp.top.iter().find(|(t, _)| *t == want[at]);
                    return (at, theirs.map_or(f32::INFINITY, |(_, l)| lp.logprob - l));
                }
                at += 1;
            }
            GenerationEvent::Finished(_) => break,
            GenerationEvent::Started { .. } => {}
        }
    }
    (at, 0.0)
}

/// A departure from llama.cpp's continuation by less than this (nats) is a near-tie that
/// the order of float sums decides, not a fault. On the Q4_1 file it is that fragile:
/// 8-bit activation rounding turns a 1e-7 relative change in attention's sums (the tiled
/// prefill kernel against the streaming one; on the same file dequantized to f32 the
/// logits move by 2e-5) into logit moves of up to 0.54, measured over a 150-token prompt.
const NEAR_TIE_NATS: f32 = 0.25;

/// The five continuations, free-running: at least `min_equal` equal to llama.cpp's to the
/// last token, every one equal for its first `min_prefix`.
fn check_cases(
    engine: &hearth_runtime::EngineHandle,
    golden: &serde_json::Value,
    min_equal: usize,
    min_prefix: usize,
) {
    let (mut failures, mut equal, mut earliest) = (Vec::new(), 0, usize::MAX);
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let want = ids(case, "tokens");
        let got = greedy(engine, ids(case, "prompt_tokens"), want.len());
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        if got == want {
            equal += 1;
        } else {
            earliest = earliest.min(same);
            failures.push(format!(
                "{:?}: first difference at token {same}\n  hearth:    {got:?}\n  llama.cpp: {want:?} ({:?})",
                case["prompt"], case["text"]
            ));
        }
    }
    let report = failures.join("\n");
    eprintln!(
        "{}: greedy equal to llama.cpp on {equal} of 5 prompts\n{report}",
        golden["file"]
    );
    assert!(
        equal >= min_equal,
        "only {equal} of 5 continuations equal:\n{report}"
    );
    assert!(
        earliest >= min_prefix,
        "a continuation differs at token {earliest}, within its first {min_prefix}:\n{report}"
    );
}

/// Teacher forcing on llama.cpp's continuations: hearth's logits after the prompt and
/// each prefix of llama.cpp's tokens, one row per continuation token, with the KV cache in
/// `kv_dtype` (None: the compute dtype).
fn forced_logits(
    path: &Path,
    golden: &serde_json::Value,
    kv_dtype: Option<DType>,
) -> Vec<Vec<f32>> {
    let mut spec = ModelSpec::new(path.to_string_lossy());
    spec.device = "cpu".into();
    spec.dtype = "f32".into();
    let (_, model) = hearth_runtime::loader::load_model(&spec).unwrap();
    let mut rows = Vec::new();
    for case in golden["cases"].as_array().unwrap() {
        let (prompt, want) = (ids(case, "prompt_tokens"), ids(case, "tokens"));
        let tokens: Vec<u32> = prompt.iter().chain(&want).copied().collect();
        let t = tokens.len();
        let dtype = kv_dtype.unwrap_or(model.dtype());
        let cache = KvCacheTensors::new(model.config(), t, 1, dtype, model.device()).unwrap();
        // Block size 1: every position is a one-token sequence over the slots before it.
        let mut batch = ForwardBatch::new(1);
        let table: Vec<u32> = (0..t as u32).collect();
        for (i, tok) in tokens.iter().enumerate() {
            batch.push(&[*tok], i, &table[..=i], true);
        }
        let logits = model
            .forward(&batch, &cache)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        rows.extend(logits.into_iter().skip(prompt.len() - 1).take(want.len()));
    }
    rows
}

/// Positions where hearth's top-1 is llama.cpp's next token: (agreeing, positions). One
/// near-tie that goes the other way costs one position here, where it derails the rest
/// of a free-running continuation.
fn forced_agreement(
    path: &Path,
    golden: &serde_json::Value,
    kv_dtype: Option<DType>,
) -> (usize, usize) {
    let rows = forced_logits(path, golden, kv_dtype);
    let want: Vec<u32> = golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| ids(c, "tokens"))
        .collect();
    assert_eq!(rows.len(), want.len());
    let agree = rows
        .iter()
        .zip(&want)
        .filter(|(row, w)| hearth_runtime::sampler::argmax(row) == **w)
        .count();
    eprintln!(
        "{} ({kv_dtype:?} KV cache): teacher-forced top-1 equal to llama.cpp's at {agree} of {} positions",
        golden["file"],
        want.len()
    );
    (agree, want.len())
}

#[test]
fn q4_1_teacher_forced_agrees_with_llama_cpp() {
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("goldens/llama_cpp_smollm2_q4_1.json")).unwrap();
    let (agree, total) = forced_agreement(&common::smollm2(), &golden, F32_CACHE);
    assert!(agree * 100 >= total * 96, "{agree} of {total}");
}

#[test]
fn q4_k_m_teacher_forced_agrees_with_llama_cpp() {
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("goldens/llama_cpp_smollm2_q4_k_m.json")).unwrap();
    let (agree, total) = forced_agreement(&q4_k_m(), &golden, F32_CACHE);
    // 137 of 139 with Q4_K in ggml's vec_dot lane order, 136 since Q4_K follows
    // llama.cpp's repacked GEMV/GEMM order (q8::SumOrder), which took bench-small's Q4_K_M
    // from 142 to 147 of 160: one near-tie either way.
    assert!(agree * 100 >= total * 97, "{agree} of {total}");
}

#[test]
fn q4_k_m_greedy_equals_llama_cpp() {
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("goldens/llama_cpp_smollm2_q4_k_m.json")).unwrap();
    // 3 of 5 (first departure at token 20) in the lane order, 2 of 5 in llama.cpp's
    // repacked order (the third flips a near-tie at token 1): see the test above.
    check_cases(&engine(&q4_k_m(), &golden, F32_CACHE), &golden, 2, 1);
}

/// SmolLM2 Q8_0 (llama-quantize's, every projection Q8_0: scripts/bench-gguf.sh q8_0),
/// through the engine with its default (f16, llama.cpp's) KV cache and teacher-forced
/// with an f32 one.
#[test]
fn q8_0_agrees_with_llama_cpp() {
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("goldens/llama_cpp_smollm2_q8_0.json")).unwrap();
    let path = bench_gguf("q8_0", "HEARTH_SMOLLM2_Q8_0_GGUF");
    let (agree, total) = forced_agreement(&path, &golden, F32_CACHE);
    assert!(
        agree * 100 >= total * Q8_0_FORCED_PERCENT,
        "{agree} of {total}"
    );
    check_cases(
        &engine(&path, &golden, None),
        &golden,
        Q8_0_EQUAL,
        Q8_0_PREFIX,
    );
}

/// dummy:bench-small's shape with random weights (every width a multiple of 256, so
/// llama-quantize makes real K-quant files with no legacy fallbacks: Q4_K_M is Q4_K and
/// Q6_K, Q6_K all Q6_K): the K-quant kernels themselves against llama.cpp's.
#[test]
fn bench_small_k_quants_agree_with_llama_cpp() {
    for (format, env, golden) in [
        (
            "small-q4_k_m",
            "HEARTH_BENCH_SMALL_Q4KM_GGUF",
            include_str!("goldens/llama_cpp_bench_small_q4_k_m.json"),
        ),
        (
            "small-q6_k",
            "HEARTH_BENCH_SMALL_Q6K_GGUF",
            include_str!("goldens/llama_cpp_bench_small_q6_k.json"),
        ),
    ] {
        let golden: serde_json::Value = serde_json::from_str(golden).unwrap();
        let path = bench_gguf(format, env);
        let (agree, total) = forced_agreement(&path, &golden, F32_CACHE);
        assert!(
            agree * 100 >= total * SMALL_FORCED_PERCENT,
            "{format}: {agree} of {total}"
        );
    }
}

/// A chat turn end to end: hearth's rendering of the file's chat template (with its
/// default system message) is llama.cpp's to the token, and the answer is llama.cpp's
/// (French verse, not "Paris": the file's 4-bit weights on 8-bit activations) for at
/// least its first 12 tokens.
#[test]
fn q4_1_chat_turn_equals_llama_cpp() {
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("goldens/llama_cpp_smollm2_q4_1.json")).unwrap();
    let engine = engine(&common::smollm2(), &golden, F32_CACHE);
    let chat = &golden["chat"];
    let prompt = engine
        .tokenizer()
        .prompt_tokens(&PromptSpec {
            prompt: chat["prompt"].as_str().unwrap().into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        prompt,
        ids(chat, "prompt_tokens"),
        "templated prompt differs from llama.cpp's {:?}",
        chat["templated"]
    );
    let want = ids(chat, "tokens");
    let got = greedy(&engine, prompt.clone(), want.len());
    let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
    let text = engine.tokenizer().inner().decode(&got, true).unwrap();
    let (at, gap) = departure(&engine, prompt, &want);
    eprintln!(
        "chat answer equal to llama.cpp's for {same} tokens: {text:?}; departs at {at} by {gap} nats"
    );
    assert!(
        same >= 12 || (at == same && gap < NEAR_TIE_NATS),
        "chat answer differs at token {same}: {text:?}, llama.cpp {:?}",
        chat["text"]
    );
}

/// The f16 KV cache (`--kv-cache-dtype f16`, llama.cpp's default) on both files, against
/// the f32 cache and llama.cpp. Rounding keys and values to f16 moves SmolLM2's next-token
/// distributions by a total variation of at most 0.19 (Q4_K_M) and 0.13 (Q4_1) over these
/// 299 positions (measured; logits by up to 2.2: a few heads hold large values), bounded
/// here by 0.3 — a cache written to the wrong slots or read unconverted moves them by
/// most of 1. Teacher-forced agreement with llama.cpp keeps the f32 cache's bounds
/// (measured 137/139 and 156/160, f32: 137 and 155), and through the engine every
/// continuation follows llama.cpp's for at least its first 5 tokens (the f32 cache's
/// least too).
#[test]
fn f16_kv_cache_against_llama_cpp() {
    for (golden, path, bound) in [
        (
            include_str!("goldens/llama_cpp_smollm2_q4_k_m.json"),
            q4_k_m(),
            // 134 of 139 since Q4_K follows llama.cpp's repacked order (q8::SumOrder).
            96,
        ),
        (
            include_str!("goldens/llama_cpp_smollm2_q4_1.json"),
            common::smollm2(),
            96,
        ),
    ] {
        let golden: serde_json::Value = serde_json::from_str(golden).unwrap();
        let f32_rows = forced_logits(&path, &golden, F32_CACHE);
        let f16_rows = forced_logits(&path, &golden, Some(DType::F16));
        let probs = |r: &Vec<f32>| {
            let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = r.iter().map(|x| ((x - m) as f64).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(move |x| x / z)
        };
        let (mut tv, mut dp) = (0f64, 0f64);
        for (a, b) in f32_rows.iter().zip(&f16_rows) {
            let d: Vec<f64> = probs(a).zip(probs(b)).map(|(x, y)| (x - y).abs()).collect();
            tv = tv.max(d.iter().sum::<f64>() / 2.0);
            dp = dp.max(d.iter().copied().fold(0.0, f64::max));
        }
        eprintln!(
            "{}: f16 against f32 KV: max total variation {tv}, max prob diff {dp}",
            golden["file"]
        );
        assert!(tv < 0.3, "{}: total variation {tv}", golden["file"]);
        let (agree, total) = forced_agreement(&path, &golden, Some(DType::F16));
        assert!(agree * 100 >= total * bound, "{agree} of {total}");
        let engine = engine(&path, &golden, Some(DType::F16));
        for case in golden["cases"].as_array().unwrap() {
            let want = ids(case, "tokens");
            let got = greedy(&engine, ids(case, "prompt_tokens"), want.len());
            let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
            let (at, gap) = departure(&engine, ids(case, "prompt_tokens"), &want);
            eprintln!(
                "{:?}: equal for {same} tokens, departs at {at} by {gap} nats",
                case["prompt"]
            );
            assert!(
                same >= 5 || (at == same && gap < NEAR_TIE_NATS),
                "{:?}: differs at token {same} by {gap} nats",
                case["prompt"]
            );
        }
    }
}
