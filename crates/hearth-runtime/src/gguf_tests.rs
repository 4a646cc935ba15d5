use super::*;

#[test]
fn names_map_to_llama_cpp() {
    assert_eq!(
        gguf_name("model.layers.3.self_attn.q_proj.weight").as_deref(),
        Some("blk.3.attn_q.weight")
    );
    assert_eq!(
        gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
        Some("blk.0.ffn_norm.weight")
    );
    assert_eq!(
        gguf_name("model.embed_tokens.weight").as_deref(),
        Some("token_embd.weight")
    );
    assert_eq!(
        gguf_name("lm_head.weight").as_deref(),
        Some("output.weight")
    );
    assert_eq!(gguf_name("model.layers.0.bogus.weight"), None);
}

/// A Q2_K-style file whose narrow rows are IQ4_NL: the error names the tensor and type.
#[test]
fn unsupported_tensor_type_is_named() {
    let mut b = Vec::new();
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(2u64.to_le_bytes()); // tensors
    b.extend(2u64.to_le_bytes()); // metadata
    string(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    string(&mut b, "llama");
    string(&mut b, "tokenizer.ggml.scores");
    b.extend(9u32.to_le_bytes());
    b.extend(6u32.to_le_bytes());
    b.extend(3u64.to_le_bytes());
    b.extend([0u8; 12]);
    for (name, ty) in [("token_embd.weight", 0u32), ("blk.0.ffn_down.weight", 20)] {
        string(&mut b, name);
        b.extend(2u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(0u64.to_le_bytes());
    }
    b.extend([0u8; 512]);
    let dir = std::env::temp_dir().join(format!("hearth-iq4nl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.gguf");
    std::fs::write(&path, &b).unwrap();
    let err = GgufFile::open(&path)
        .err()
        .expect("must not load")
        .to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        err.contains("blk.0.ffn_down.weight") && err.contains("IQ4_NL"),
        "{err}"
    );
}

#[test]
fn unpermute_inverts_llama_cpp_permutation() {
    // Two heads of four rows, one byte per row: llama.cpp's order for HF rows
    // [0 1 2 3 | 4 5 6 7] is [0 2 1 3 | 4 6 5 7].
    let permuted = [0u8, 2, 1, 3, 4, 6, 5, 7];
    let back = unpermute_rows(&permuted, 8, 1, 2).unwrap();
    assert_eq!(back, vec![0, 1, 2, 3, 4, 5, 6, 7]);
    assert!(unpermute_rows(&permuted, 8, 1, 3).is_err());
}
