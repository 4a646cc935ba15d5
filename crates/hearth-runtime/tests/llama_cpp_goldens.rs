//! Greedy output equal to llama.cpp's on the same quantized file: SmolLM2-135M-Instruct
//! Q4_K_M (made from the Q4_1 wheel file by llama.cpp's `llama-quantize`,
//! scripts/make-smollm2-q4km.sh), 5 prompts × 32 tokens, against the continuations
//! llama-server produced on that file (scripts/llama-cpp-goldens.sh records them in
//! tests/goldens/). For the Q4_K/Q6_K/Q5_0 layers both engines quantize activations to 8
//! bits the same way, so their integer products agree — but not yet every token: the 15
//! Q8_0 layers still take 16-bit activations here, and llama.cpp keeps its KV cache in f16
//! where hearth's CPU cache is f32; on 2 of the 5 prompts that moves a near-tie (at tokens
//! 16 and 28). Until the f16 cache lands (issue 22), the test demands 3 of 5 continuations equal
//! to the last token and every continuation equal for its first 16 tokens; candle's
//! generic kernels (before) differed early on every prompt.

use std::path::PathBuf;

use hearth_runtime::{EngineConfig, GenerationEvent, GenerationRequest, ModelSpec, SamplingParams};
use sha2::{Digest, Sha256};

fn q4_k_m() -> PathBuf {
    if let Some(p) = std::env::var_os("HEARTH_SMOLLM2_Q4KM_GGUF") {
        return PathBuf::from(p);
    }
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-smollm2-q4km.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "SmolLM2 Q4_K_M cannot be made (needed by this test): {}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn sha256(path: &PathBuf) -> String {
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn q4_k_m_greedy_equals_llama_cpp() {
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("goldens/llama_cpp_smollm2_q4_k_m.json")).unwrap();
    let path = q4_k_m();
    assert_eq!(
        sha256(&path),
        golden["file_sha256"].as_str().unwrap(),
        "{} is not the file the goldens were recorded on (rerun scripts/llama-cpp-goldens.sh)",
        path.display()
    );
    let mut spec = ModelSpec::new(path.to_string_lossy());
    spec.device = "cpu".into();
    spec.dtype = "f32".into();
    let engine = hearth_runtime::load(
        &spec,
        &EngineConfig {
            kv_cache_memory: Some(128 << 20),
            ..Default::default()
        },
    )
    .unwrap()
    .engine;
    let (mut failures, mut equal, mut earliest) = (Vec::new(), 0, usize::MAX);
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let ids = |key: &str| -> Vec<u32> {
            case[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let want = ids("tokens");
        let mut s = engine
            .submit(GenerationRequest {
                prompt: ids("prompt_tokens"),
                params: SamplingParams::greedy(want.len()),
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
    eprintln!("greedy equal to llama.cpp on {equal} of 5 prompts\n{report}");
    assert!(
        equal >= 3,
        "only {equal} of 5 continuations equal:\n{report}"
    );
    assert!(
        earliest >= 16,
        "a continuation differs at token {earliest}, within its first 16:\n{report}"
    );
}
