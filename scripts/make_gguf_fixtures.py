#!/usr/bin/env python3
"""GGUF versions of the tiny fixture models, with goldens. Run through scripts/make-fixtures.sh
(or `scripts/make-fixtures.sh --gguf-only`), with llama.cpp's own gguf-py and numpy.

For each fixture in models/fixtures/{llama,mistral,qwen2,qwen3} it writes, into
models/fixtures/gguf/:

* NAME.gguf      every tensor F32, written the way llama.cpp's convert_hf_to_gguf.py writes it
                 (q/k rows permuted for the `llama` architecture, Llama 3.1 RoPE scaling as a
                 `rope_freqs.weight` tensor, no `output.weight` when the embeddings are tied).
                 Same weights as the safetensors fixture: its golden.json (from transformers)
                 applies unchanged.
* NAME-q.gguf    the same weights quantized, a different mix of types per fixture.
* NAME-q.golden.json  the last-position top-5 logits and 12 greedy tokens of each golden prompt,
                 computed by a numpy forward pass (float64) over the weights as gguf-py
                 dequantizes them. That forward pass is first checked against transformers'
                 goldens on the exact weights (1e-4), so it is a reference, not a copy of hearth.

Tokenizers: `llama` keeps the fixtures' byte-level vocabulary under `tokenizer.ggml.pre =
llama-bpe`, `qwen2`/`qwen3` under `qwen2`, `mistral` gets a SentencePiece-style vocabulary
(`tokenizer.ggml.model = llama`: byte fallback, scores, no merges) trained here. The reference
for each GGUF tokenizer is transformers' own GGUF tokenizer conversion, run by
scripts/gguf_tokenizer_goldens.py.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "models" / "fixtures"
OUT = FIX / "gguf"

# Which type each tensor gets in NAME-q.gguf: (embedding, q/k, v/o, gate, up, down, output).
QUANT_MIX = {
    "llama": dict(embd=Q.Q8_0, qk=Q.Q4_0, vo=Q.Q4_1, gate=Q.Q5_0, up=Q.Q5_1, down=Q.Q8_0, out=None),
    "mistral": dict(embd=Q.F16, qk=Q.F16, vo=Q.BF16, gate=Q.Q8_0, up=Q.Q8_0, down=Q.Q8_0, out=Q.Q8_0),
    "qwen2": dict(embd=Q.Q8_0, qk=Q.Q8_0, vo=Q.Q8_0, gate=Q.Q8_0, up=Q.Q8_0, down=Q.Q8_0, out=Q.Q8_0),
    "qwen3": dict(embd=Q.Q8_0, qk=Q.Q4_1, vo=Q.Q4_1, gate=Q.Q4_1, up=Q.Q4_1, down=Q.Q4_1, out=Q.Q4_1),
}
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PRE = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            assert info["dtype"] == "F32", (name, info["dtype"])
            a, b = info["data_offsets"]
            out[name] = np.frombuffer(raw[base + a : base + b], dtype=np.float32).reshape(info["shape"]).copy()
    return out


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for rope_type llama3."""
    rs = cfg["rope_scaling"]
    base = cfg["rope_theta"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    low_wl, high_wl = old / low, old / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------
# A SentencePiece-style vocabulary for the mistral fixture
# ---------------------------------------------------------------------------------------


def spm_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, the 256 byte tokens, then BPE pieces over `▁`-joined words of the
    fixtures' corpus, scored by merge order, as SentencePiece BPE models are."""
    import ast

    # The fixtures' training corpus, read from make_fixtures.py without importing torch.
    tree = ast.parse((REPO / "scripts" / "make_fixtures.py").read_text())
    CORPUS = next(
        ast.literal_eval(n.value) for n in tree.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "CORPUS"
    )

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    words: dict[tuple[str, ...], int] = {}
    for line in CORPUS:
        for w in line.replace("\n", " ").split(" "):
            if w:
                key = tuple("\u2581" + w)
                words[key] = words.get(key, 0) + 1
    # Single characters first (as SentencePiece keeps its character set), most frequent first.
    chars: dict[str, int] = {}
    for w, n in words.items():
        for c in w:
            chars[c] = chars.get(c, 0) + n
    budget = size - len(tokens)
    n_chars = min(len(chars), budget // 2)
    for c, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[:n_chars]:
        tokens.append(c)
        types.append(1)
        scores.append(-float(len(tokens)))
    known = set(tokens)
    while len(tokens) < size:
        pairs: dict[tuple[str, str], int] = {}
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                if a in known and b in known:
                    pairs[(a, b)] = pairs.get((a, b), 0) + n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = a + b
        new_words = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + n
        words = new_words
        if merged not in known:
            tokens.append(merged)
            types.append(1)
            scores.append(-float(len(tokens)))
            known.add(merged)
    assert len(tokens) == size, (len(tokens), size)
    return tokens, scores, types


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------


def hf_to_gguf_name(name: str) -> str:
    table = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    stem, leaf = name.rsplit(".", 1)
    if stem == "lm_head":
        return f"output.{leaf}"
    if stem == "model.embed_tokens":
        return f"token_embd.{leaf}"
    if stem == "model.norm":
        return f"output_norm.{leaf}"
    _, _, i, rest = stem.split(".", 3)
    return f"blk.{i}.{table[rest]}.{leaf}"


def qtype_for(gname: str, mix: dict | None) -> Q:
    if mix is None or not gname.endswith(".weight") or "norm" in gname:
        return Q.F32
    if gname.startswith("token_embd"):
        return mix["embd"]
    if gname.startswith("output."):
        return mix["out"] or Q.F32
    part = gname.split(".")[2]
    return {
        "attn_q": mix["qk"], "attn_k": mix["qk"], "attn_v": mix["vo"], "attn_output": mix["vo"],
        "ffn_gate": mix["gate"], "ffn_up": mix["up"], "ffn_down": mix["down"],
    }[part]


def write_gguf(path: Path, name: str, cfg: dict, weights: dict[str, np.ndarray], tok: dict, mix: dict | None) -> dict[str, np.ndarray]:
    """Writes the file; returns the weights (HF names and layout) as a reader dequantizes them."""
    arch = ARCH[name]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"hearth fixture {name}")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(1 if mix else 0)
    w.add_tokenizer_model(tok["model"])
    if tok.get("pre"):
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if tok.get("scores") is not None:
        w.add_token_scores(tok["scores"])
    if tok.get("merges") is not None:
        w.add_token_merges(tok["merges"])
    if tok.get("bos") is not None:
        w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    if tok.get("eot") is not None:
        w.add_eot_token_id(tok["eot"])
    if tok.get("unk") is not None:
        w.add_unk_token_id(tok["unk"])
    w.add_add_bos_token(tok["add_bos"])
    if tok["model"] == "llama":
        w.add_add_space_prefix(True)
    w.add_chat_template(tok["chat_template"])

    rs = cfg.get("rope_scaling")
    if rs and rs.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    seen = {}
    for hf in sorted(weights):
        t = weights[hf]
        gname = hf_to_gguf_name(hf)
        if arch == "llama" and ".attn_q." in gname:
            t = permute(t, heads)
        elif arch == "llama" and ".attn_k." in gname:
            t = permute(t, kv)
        qt = qtype_for(gname, mix)
        data = gguf.quants.quantize(np.ascontiguousarray(t, dtype=np.float32), qt)
        w.add_tensor(gname, data, raw_dtype=qt)
        back = gguf.quants.dequantize(data, qt).astype(np.float32).reshape(t.shape)
        # back to Hugging Face order: permute is undone by permuting with the inverse
        if arch == "llama" and ".attn_q." in gname:
            back = unpermute(back, heads)
        elif arch == "llama" and ".attn_k." in gname:
            back = unpermute(back, kv)
        seen[hf] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return seen


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------
# Reference forward pass (float64)
# ---------------------------------------------------------------------------------------


def inv_freq(cfg: dict) -> np.ndarray:
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    f = 1.0 / (cfg["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.get("rope_scaling")
    if rs and rs.get("rope_type") == "llama3":
        f = f / llama3_rope_factors(cfg).astype(np.float64)
    return f


def forward(cfg: dict, W: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits of the last position; the Llama-family forward pass of transformers."""
    g = lambda n: W[n].astype(np.float64)  # noqa: E731
    eps = cfg["rms_norm_eps"]
    h, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // h
    t = len(ids)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    ang = np.arange(t)[:, None] * inv_freq(cfg)[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # x [t, heads, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        rot = np.concatenate([-x2, x1], -1)
        return x * cos[:, None, :] + rot * sin[:, None, :]

    x = g("model.embed_tokens.weight")[ids]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, g(p + "input_layernorm.weight"))

        def proj(n):
            y = a @ g(p + f"self_attn.{n}.weight").T
            if p + f"self_attn.{n}.bias" in W:
                y = y + g(p + f"self_attn.{n}.bias")
            return y

        q = proj("q_proj").reshape(t, h, d)
        k = proj("k_proj").reshape(t, kvh, d)
        v = proj("v_proj").reshape(t, kvh, d)
        if p + "self_attn.q_norm.weight" in W:
            q = rms(q, g(p + "self_attn.q_norm.weight"))
            k = rms(k, g(p + "self_attn.k_norm.weight"))
        q, k = rope(q), rope(k)
        rep = h // kvh
        k = np.repeat(k, rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(d) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(t, h * d)
        x = x + o @ g(p + "self_attn.o_proj.weight").T
        m = rms(x, g(p + "post_attention_layernorm.weight"))
        gate = m @ g(p + "mlp.gate_proj.weight").T
        up = m @ g(p + "mlp.up_proj.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ g(p + "mlp.down_proj.weight").T
    x = rms(x[-1], g("model.norm.weight"))
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"]).astype(np.float64)
    return head @ x


def greedy(cfg, W, ids, n):
    seq, out, margin = list(ids), [], float("inf")
    for _ in range(n):
        lg = forward(cfg, W, seq)
        top = np.argsort(-lg)
        margin = min(margin, lg[top[0]] - lg[top[1]])
        out.append(int(top[0]))
        seq.append(int(top[0]))
    return out, margin


# ---------------------------------------------------------------------------------------


def byte_level_tokenizer(name: str) -> dict:
    tj = json.loads((FIX / name / "tokenizer.json").read_text())
    tc = json.loads((FIX / name / "tokenizer_config.json").read_text())
    vocab = tj["model"]["vocab"]
    added = {a["content"]: a["id"] for a in tj["added_tokens"]}
    n = max(list(vocab.values()) + list(added.values())) + 1
    tokens = [""] * n
    types = [1] * n
    for t, i in vocab.items():
        tokens[i] = t
    for t, i in added.items():
        tokens[i] = t
        types[i] = 3
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    bos = added.get("<|begin_of_text|>")
    return dict(
        model="gpt2", pre=PRE[name], tokens=tokens, types=types, merges=merges,
        bos=bos if tc.get("bos_token") else None, eos=added["<|eot_id|>"], eot=added["<|end_of_text|>"],
        add_bos=bool(tc.get("bos_token")), chat_template=tc["chat_template"],
    )


def spm_tokenizer(vocab_size: int) -> dict:
    tokens, scores, types = spm_vocab(vocab_size)
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    return dict(model="llama", pre=None, tokens=tokens, types=types, scores=scores, merges=None,
                bos=1, eos=2, unk=0, add_bos=True, chat_template=template)


README = """\
# GGUF fixtures

Generated by `scripts/make-gguf-fixtures.sh` (run by `scripts/make-fixtures.sh`) -- do not edit.

| file | what |
|---|---|
| `NAME.gguf` | the `../NAME` fixture's weights, all F32, written as llama.cpp's converter writes them (q/k rows permuted for `llama`, `rope_freqs.weight` for Llama 3.1 scaling, no `output.weight` when tied). `../NAME/golden.json` (transformers) applies unchanged. |
| `NAME-q.gguf` | the same weights quantized: TYPES |
| `NAME-q.golden.json` | top-5 logits and greedy tokens of a float64 numpy forward pass over the weights as gguf-py dequantizes them (the forward pass reproduces transformers' goldens on the exact weights to 1e-4, checked at generation) |
| `tokenizer/NAME.json` | strings and the ids the same vocabulary's `tokenizers` JSON gives them (transformers' GGUF conversion; checked against llama.cpp's llama-server when it was available) |

Tokenizers: `llama` is the fixtures' byte-level vocabulary under `tokenizer.ggml.pre = llama-bpe`;
`qwen2`/`qwen3` under `qwen2`; `mistral` has a SentencePiece-style vocabulary (`tokenizer.ggml.model
= llama`: byte tokens, scores, no merges) built by the script, as Mistral 7B's is.
`tokenizer/smollm2-135m-instruct.json` is for the real SmolLM2-135M-Instruct Q4_1 file
(scripts/fetch-smollm2.sh).
"""


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in ["llama", "mistral", "qwen2", "qwen3"]:
        cfg = json.loads((FIX / name / "config.json").read_text())
        golden = json.loads((FIX / name / "golden.json").read_text())
        weights = read_safetensors(FIX / name)
        tok = spm_tokenizer(cfg["vocab_size"]) if name == "mistral" else byte_level_tokenizer(name)
        assert len(tok["tokens"]) == cfg["vocab_size"], (name, len(tok["tokens"]))

        exact = write_gguf(OUT / f"{name}.gguf", name, cfg, weights, tok, None)
        # The reference forward pass must reproduce transformers' goldens on exact weights.
        worst = 0.0
        for case in golden["cases"]:
            lg = forward(cfg, exact, case["input_ids"])
            for tid, val in case["top5"]:
                worst = max(worst, abs(lg[tid] - val))
            assert [int(i) for i in np.argsort(-lg)[:5]] == [t[0] for t in case["top5"]], name
        assert worst < 1e-4, (name, worst)
        print(f"[{name}] numpy reference matches transformers' goldens (max |Δlogit| {worst:.2e})")

        deq = write_gguf(OUT / f"{name}-q.gguf", name, cfg, weights, tok, QUANT_MIX[name])
        cases = []
        for case in golden["cases"]:
            lg = forward(cfg, deq, case["input_ids"])
            top = np.argsort(-lg)[:5]
            ids, margin = greedy(cfg, deq, case["input_ids"], golden["max_new_tokens"])
            cases.append(dict(
                prompt=case["prompt"], input_ids=case["input_ids"],
                top5=[[int(i), float(lg[i])] for i in top], greedy_ids=ids, min_margin=float(margin),
            ))
        mix = {k: (v.name if v is not None else "F32") for k, v in QUANT_MIX[name].items()}
        out = dict(model=name, gguf=f"{name}-q.gguf", types=mix, max_new_tokens=golden["max_new_tokens"],
                   reference="numpy float64 forward pass over gguf-py's dequantization", cases=cases)
        (OUT / f"{name}-q.golden.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
        print(f"[{name}] wrote {name}.gguf, {name}-q.gguf ({mix})")
    types = "; ".join(
        f"`{n}`: " + ", ".join(f"{k} {v.name if v is not None else 'F32'}" for k, v in m.items())
        for n, m in QUANT_MIX.items()
    )
    (OUT / "README.md").write_text(README.replace("TYPES", types), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
