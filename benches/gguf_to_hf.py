"""Dequantizes a Llama-architecture GGUF into identical f32 weights for both engines:
an HF folder for hearth (config.json, tokenizer.json built from the GGUF's vocabulary
and merges, tokenizer_config.json with the chat template, generation_config.json,
model.safetensors) and an f32 GGUF for llama.cpp.

Usage: python gguf_to_hf.py MODEL.gguf OUT_DIR   (needs llama.cpp's gguf-py and numpy)
Writes OUT_DIR/hf/ and OUT_DIR/model-f32.gguf.
"""

import json
import os
import struct
import sys

import numpy as np
import gguf
from gguf.quants import dequantize


def field(r, key, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


def unpermute(w, n_head):
    # convert_hf_to_gguf.py permutes q/k rows so that RoPE pairs are adjacent
    # (llama.cpp's rope layout); transformers' Llama rotates halves. Undo it.
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_safetensors(path, tensors):
    header, offset = {}, 0
    for name, arr in tensors:
        n = arr.nbytes
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in tensors:
            f.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())


def tokenizer_json(r):
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = field(r, "tokenizer.ggml.merges")
    model = field(r, "tokenizer.ggml.model")
    pre = field(r, "tokenizer.ggml.pre")
    if model != "gpt2":
        sys.exit(f"gguf_to_hf: tokenizer model {model!r} is not supported (only gpt2 byte-level BPE)")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    # llama.cpp's "smollm" (and starcoder-like) pre-tokenizers split digits one by one
    # before the GPT-2 regex, as SmolLM2's own tokenizer.json does.
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        pre_tok = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre in ("gpt-2", "default", None):
        pre_tok = byte_level
    else:
        sys.exit(f"gguf_to_hf: pre-tokenizer {pre!r} is not supported")
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tok,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }


def main():
    src, out = sys.argv[1], sys.argv[2]
    r = gguf.GGUFReader(src)
    arch = field(r, "general.architecture")
    if arch != "llama":
        sys.exit(f"gguf_to_hf: architecture {arch!r} is not supported")
    n_head = int(field(r, "llama.attention.head_count"))
    n_kv = int(field(r, "llama.attention.head_count_kv", n_head))
    hidden = int(field(r, "llama.embedding_length"))
    tokens = field(r, "tokenizer.ggml.tokens")

    weights = {}
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        weights[t.name] = w
    tied = "output.weight" not in weights

    # The f32 GGUF for llama.cpp: same metadata, every tensor in f32, layout untouched.
    os.makedirs(out, exist_ok=True)
    gguf_out = os.path.join(out, "model-f32.gguf")
    w = gguf.GGUFWriter(gguf_out + ".tmp", arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type",
                                               "general.quantization_version"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in r.tensors:
        w.add_tensor(t.name, weights[t.name], raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(gguf_out + ".tmp", gguf_out)

    # The HF folder for hearth.
    hf = os.path.join(out, "hf")
    os.makedirs(hf, exist_ok=True)
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    tensors = [("model.embed_tokens.weight", weights["token_embd.weight"]),
               ("model.norm.weight", weights["output_norm.weight"])]
    if not tied:
        tensors.append(("lm_head.weight", weights["output.weight"]))
    for i in range(int(field(r, "llama.block_count"))):
        for g, h in names.items():
            x = weights[f"blk.{i}.{g}.weight"]
            if g == "attn_q":
                x = unpermute(x, n_head)
            elif g == "attn_k":
                x = unpermute(x, n_kv)
            tensors.append((f"model.layers.{i}.{h}.weight", x))
    write_safetensors(os.path.join(hf, "model.safetensors"), tensors)

    bos = field(r, "tokenizer.ggml.bos_token_id")
    eos = field(r, "tokenizer.ggml.eos_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "intermediate_size": int(field(r, "llama.feed_forward_length")),
        "num_hidden_layers": int(field(r, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(field(r, "llama.rope.dimension_count", hidden // n_head)),
        "rms_norm_eps": float(field(r, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(r, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field(r, "llama.context_length")),
        "tie_word_embeddings": tied,
        "bos_token_id": int(bos),
        "eos_token_id": int(eos),
        "torch_dtype": "float32",
    }
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(hf, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": int(bos), "eos_token_id": int(eos)}, f, indent=2)
    tok_cfg = {
        "bos_token": tokens[int(bos)],
        "eos_token": tokens[int(eos)],
        "add_bos_token": bool(field(r, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": field(r, "tokenizer.chat_template"),
    }
    with open(os.path.join(hf, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2)
    with open(os.path.join(hf, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(r), f, ensure_ascii=False)
    print(out)


if __name__ == "__main__":
    main()
