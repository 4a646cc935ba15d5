"""Writes an f32 GGUF of `dummy:bench-small`'s shape (crates/hearth-runtime/src/presets.rs:
Llama, hidden 768, MLP 2048, 8 layers, 12 heads, 4 KV heads, RoPE theta 500000, context
4096, untied output layer) with random weights from a fixed seed, so that both hearth and
llama.cpp load the same file and every width is a multiple of 256: llama-quantize then
makes real K-quant files (Q4_K_M, Q6_K) with no legacy fallbacks, which SmolLM2's 576-wide
rows never give.

The vocabulary is SmolLM2-135M's (49,152 tokens, its BPE merges, special tokens and chat
template, copied from its GGUF): the preset's 32,000 has no real tokenizer of that size
here, and a real one lets both servers tokenize the same prompt text. The only shape
change from the preset is that vocabulary (and so the embedding and output tables).

The weights are uniform, drawn from splitmix64 over a per-tensor counter (not numpy's
generators, whose streams may change between versions), scaled so that each sublayer adds
about unit variance to the residual stream and the logits spread over a few nats: a
random model, but one whose greedy tokens are decided by margins, not exact ties. The
same seed gives the same bytes on any machine (the tests check the file's sha256).

Usage: python make_bench_small_gguf.py SMOLLM2.gguf OUT.gguf [SEED]
(needs llama.cpp's gguf-py and numpy: benches/build-llama-cpp.sh's venv)
"""

import os
import sys

import numpy as np
import gguf

HIDDEN, MLP, LAYERS, HEADS, KV_HEADS = 768, 2048, 8, 12, 4
HEAD_DIM = HIDDEN // HEADS
CONTEXT, ROPE_THETA, RMS_EPS = 4096, 500000.0, 1e-5

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(counter):
    z = counter + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniform(shape, seed, tensor_index, std):
    """Values uniform in [-a, a] with standard deviation `std`, element i of tensor t
    from splitmix64(seed * 2^40 + t * 2^32 + i)."""
    n = int(np.prod(shape))
    out = np.empty(n, dtype=np.float32)
    base = (np.uint64(seed) << np.uint64(40)) + (np.uint64(tensor_index) << np.uint64(32))
    a = np.float32(std * np.sqrt(3.0))
    chunk = 1 << 22
    with np.errstate(over="ignore"):
        for start in range(0, n, chunk):
            i = np.arange(start, min(n, start + chunk), dtype=np.uint64)
            bits = splitmix64(base + i) >> np.uint64(40)  # 24 bits
            u = bits.astype(np.float32) / np.float32(1 << 24)
            out[start : start + len(i)] = (u * 2 - 1) * a
    return out.reshape(shape)


def field(r, key):
    f = r.fields.get(key)
    return None if f is None else f.contents()


def main():
    src, out = sys.argv[1], sys.argv[2]
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    r = gguf.GGUFReader(src)
    tokens = field(r, "tokenizer.ggml.tokens")
    if not tokens:
        sys.exit(f"make_bench_small_gguf: {src} has no tokenizer.ggml.tokens")
    vocab = len(tokens)

    w = gguf.GGUFWriter(out + ".tmp", "llama")
    w.add_name("bench-small (random weights, seed %d)" % seed)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(MLP)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, f in r.fields.items():
        if key.startswith("tokenizer."):
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, f.contents(), vtype, sub_type=sub)

    # Residual contributions of about unit variance: 1/sqrt(fan-in) for the value,
    # output and MLP matrices; queries and keys smaller so attention is neither uniform
    # nor one-hot; the output layer spreads the logits by ~3 nats.
    proj = 1 / np.sqrt(HIDDEN)
    t = 0

    def add(name, shape, std):
        nonlocal t
        w.add_tensor(name, uniform(shape, seed, t, std), raw_dtype=gguf.GGMLQuantizationType.F32)
        t += 1

    def add_norm(name):
        nonlocal t
        # Around 1 (a freshly initialized RMSNorm), not exactly 1, so a misread weight shows.
        w.add_tensor(name, 1 + uniform((HIDDEN,), seed, t, 0.1), raw_dtype=gguf.GGMLQuantizationType.F32)
        t += 1

    add("token_embd.weight", (vocab, HIDDEN), 1.0)
    for i in range(LAYERS):
        b = f"blk.{i}"
        add_norm(f"{b}.attn_norm.weight")
        add(f"{b}.attn_q.weight", (HEADS * HEAD_DIM, HIDDEN), 0.5 * proj)
        add(f"{b}.attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), 0.5 * proj)
        add(f"{b}.attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN), proj)
        add(f"{b}.attn_output.weight", (HIDDEN, HEADS * HEAD_DIM), proj)
        add_norm(f"{b}.ffn_norm.weight")
        add(f"{b}.ffn_gate.weight", (MLP, HIDDEN), proj)
        add(f"{b}.ffn_up.weight", (MLP, HIDDEN), proj)
        add(f"{b}.ffn_down.weight", (HIDDEN, MLP), 2 / np.sqrt(MLP))
    add_norm("output_norm.weight")
    add("output.weight", (vocab, HIDDEN), 3 * proj)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(out + ".tmp", out)
    print(out)


if __name__ == "__main__":
    main()
