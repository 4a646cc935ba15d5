#!/usr/bin/env python3
"""Generate tiny, seeded, random-weight Hugging Face model fixtures + golden outputs.

Writes models/fixtures/{llama,mistral,qwen2,qwen3}/ (config.json, safetensors weights,
tokenizer.json, tokenizer_config.json, generation_config.json, golden.json) and
models/fixtures/README.md.

Nothing is downloaded: the tokenizer is trained locally on an embedded corpus and the
weights are drawn from fixed-seed generators. Run through scripts/make-fixtures.sh.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "models" / "fixtures"

MAX_NEW_TOKENS = 12
MIN_MARGIN = 1e-3  # required (asserted) top1 - top2 logit gap at every greedy step
# Prompts are selected with stricter margins than MIN_MARGIN, for headroom:
SELECT_MARGIN = 5e-3  # top1 - top2 gap at every greedy step
SELECT_TOP5_GAP = 1e-4  # gap between consecutive top5 logits of the prompt forward pass
MAX_TOTAL_BYTES = 5 * 1024 * 1024

# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, EOT, START_HEADER, END_HEADER]

# Number of tokens produced by BPE training (256 byte alphabet + merges). The five special
# tokens are appended afterwards (as in Llama 3, where they sit at the end of the vocab),
# giving a total vocab of BPE_VOCAB_SIZE + 5.
BPE_VOCAB_SIZE = 395

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran "
    "back into the forest before anyone could see where it had gone.",
    "Once upon a time there was a small village at the edge of a great river. The people "
    "of the village were farmers and fishermen, and every morning they walked down to the "
    "water to see what the river had brought them during the night.",
    "A language model predicts the next token given the tokens that came before it. When "
    "the model is small and its weights are random, the predictions are meaningless, but "
    "they are still deterministic, which is exactly what a test fixture needs.",
    "In the beginning the server loads the weights, builds the tokenizer, and waits for "
    "requests. Each request carries a prompt; the server encodes it, runs the model, "
    "samples a token, and repeats until it reaches the end of the text.",
    "Hello, world! How are you today? I am fine, thank you. What time is it? It is half "
    "past seven in the evening, and the sun is going down over the hills.",
    "Numbers and symbols: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 -17 +5 = 50% #hash "
    "@user (parentheses) [brackets] {braces} <angle> \"quotes\" 'single' a_b c-d e/f.",
    "Café au lait, crème brûlée, naïve façade, déjà vu, Straße, smørrebrød, jalapeño, "
    "São Paulo, Zürich, Kraków, Ångström.",
    "Ελληνικά: Καλημέρα κόσμε. Η γλώσσα είναι όμορφη και παλιά.",
    "日本語のテキスト：こんにちは世界。東京は大きな都市です。中文：你好，世界。한국어: 안녕하세요.",
    "Emoji: 🙂 😀 🚀 🌍 ❤️ 👍 🎉 — and an em dash, an ellipsis… and «guillemets».",
    "def main():\n    print(\"hello\")\n    return 0\n\nfor i in range(10):\n    x = i * 2\n",
]

CHAT_TEMPLATE_WITH_BOS = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
# Same Llama-3 style template without the leading BOS, for the no-BOS (Qwen) fixtures.
CHAT_TEMPLATE_NO_BOS = CHAT_TEMPLATE_WITH_BOS.replace("{{- bos_token }}", "")


def train_base_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=False)
    assert n == BPE_VOCAB_SIZE, f"BPE training produced {n} tokens, expected {BPE_VOCAB_SIZE}"
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def build_tokenizer(base: Tokenizer, add_bos: bool) -> Tokenizer:
    tok = Tokenizer.from_str(base.to_str())
    if add_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0",
            pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
            special_tokens=[(BOS, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    hidden_act="silu",
    initializer_range=0.2,
    max_position_embeddings=512,
    use_cache=True,
    attention_dropout=0.0,
)


def model_specs(vocab_size: int, ids: dict[str, int]):
    bos, eos, eot = ids[BOS], ids[EOS], ids[EOT]
    return [
        dict(
            name="llama",
            seed=1001,
            config_cls=LlamaConfig,
            model_cls=LlamaForCausalLM,
            add_bos=True,
            config=dict(
                COMMON,
                vocab_size=vocab_size,
                num_key_value_heads=2,
                intermediate_size=128,
                rms_norm_eps=1e-5,
                tie_word_embeddings=True,
                attention_bias=False,
                mlp_bias=False,
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
                bos_token_id=bos,
                eos_token_id=[eos, eot],
            ),
            # legacy (transformers 4.x / Hub-style) keys added to config.json next to rope_parameters
            legacy=dict(
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            ),
            shard=None,
        ),
        dict(
            name="mistral",
            seed=2002,
            config_cls=MistralConfig,
            model_cls=MistralForCausalLM,
            add_bos=True,
            config=dict(
                COMMON,
                vocab_size=vocab_size,
                num_key_value_heads=1,
                intermediate_size=96,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                sliding_window=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                bos_token_id=bos,
                eos_token_id=[eos, eot],
            ),
            legacy=dict(rope_theta=1000000.0, rope_scaling=None),
            shard=None,
        ),
        dict(
            name="qwen2",
            seed=3003,
            config_cls=Qwen2Config,
            model_cls=Qwen2ForCausalLM,
            add_bos=False,
            config=dict(
                COMMON,
                vocab_size=vocab_size,
                num_key_value_heads=2,
                intermediate_size=128,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                use_sliding_window=False,
                sliding_window=None,
                max_window_layers=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                bos_token_id=None,
                eos_token_id=[eos, eot],
            ),
            legacy=dict(rope_theta=1000000.0, rope_scaling=None),
            shard="100KB",
        ),
        dict(
            name="qwen3",
            seed=4004,
            config_cls=Qwen3Config,
            model_cls=Qwen3ForCausalLM,
            add_bos=False,
            config=dict(
                COMMON,
                vocab_size=vocab_size,
                num_key_value_heads=2,
                head_dim=32,
                intermediate_size=128,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                attention_bias=False,
                use_sliding_window=False,
                sliding_window=None,
                max_window_layers=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                bos_token_id=None,
                eos_token_id=[eos, eot],
            ),
            legacy=dict(rope_theta=1000000.0, rope_scaling=None),
            shard=None,
        ),
    ]


def randomize_weights(model: torch.nn.Module, seed: int, std: float) -> None:
    """Deterministically overwrite every parameter, independent of transformers' init code.

    Linear / embedding weights ~ N(0, std); RMSNorm weights ~ 1 + 0.1 N(0,1); biases ~ 0.2 N(0,1).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        seen = set()
        for name, p in sorted(model.named_parameters(remove_duplicate=False), key=lambda kv: kv[0]):
            if id(p) in seen:  # tied lm_head shares the embedding tensor
                continue
            seen.add(id(p))
            leaf = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            if name.endswith(".bias"):
                val = 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float32)
            elif "norm" in leaf:
                val = 1.0 + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32)
            else:
                val = std * torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(val)


def build_model(spec) -> torch.nn.Module:
    config = spec["config_cls"](**spec["config"])
    config._attn_implementation = "eager"
    torch.manual_seed(spec["seed"])
    model = spec["model_cls"](config)
    model = model.to(torch.float32)
    randomize_weights(model, spec["seed"], spec["config"]["initializer_range"])
    if spec["config"]["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.eval()
    return model


# ---------------------------------------------------------------------------------------
# Goldens
# ---------------------------------------------------------------------------------------

# Five prompt slots; each slot lists deterministic fallbacks, tried in order until every
# greedy step of the case has a top1-top2 margin > MIN_MARGIN.
PROMPT_SLOTS = [
    # 1 word
    ["Hello", "Once", "The", "Hi", "Today", "World"],
    # ~10 tokens
    [
        "The quick brown fox",
        "A quick brown fox",
        "Hello, world!",
        "Once upon a time",
        "The lazy dog",
    ],
    # ~20 tokens
    [
        "Once upon a time there was a small village.",
        "What time is it? It is half past seven.",
        "The people of the village were farmers.",
        "Every morning they walked to the water.",
        "The server loads the weights and waits.",
    ],
    # multi-byte UTF-8 (accented Latin, Greek, CJK, emoji), ~30-60 tokens
    [
        "Café au lait à Zürich — Ελληνικά, 東京 🚀",
        "déjà vu in Kraków — Η γλώσσα, 中文 👍",
        "Straße, smørrebrød, São Paulo — γλώσσα, 你好 世界 🎉",
        "Café crème, naïve façade — Καλημέρα κόσμε, 日本語 こんにちは 🙂",
        "crème brûlée — κόσμε 世界 🌍",
    ],
    # ~60 tokens
    [
        "A language model predicts the next token given the tokens that came before it. "
        "The predictions are meaningless but deterministic.",
        "It is half past seven in the evening, and the sun is going down over the hills. "
        "The people of the village were farmers.",
        "Each request carries a prompt; the server encodes it, runs the model, samples a token, "
        "and repeats until the end of the text.",
        "The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran "
        "back into the forest.",
        "def main():\n    print(\"hello\")\n    return 0\n\nfor i in range(10):\n    x = i * 2\n",
    ],
]


def margin_of(logits_row: torch.Tensor) -> float:
    top2 = torch.topk(logits_row, 2)
    return float(top2.values[0] - top2.values[1])


@torch.no_grad()
def run_case(model, input_ids: list[int]):
    """Return (top5, greedy_ids, min_margin) following the golden definition.

    min_margin is the smallest top1 - top2 logit gap over all greedy steps."""
    ids = torch.tensor([input_ids], dtype=torch.long)
    logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
    top = torch.topk(logits, 5)
    top5 = [[int(i), float(v)] for v, i in zip(top.values.tolist(), top.indices.tolist())]
    # sanity: topk returns highest first
    assert all(top5[k][1] >= top5[k + 1][1] for k in range(4))

    seq = list(input_ids)
    greedy = []
    min_margin = float("inf")
    for _ in range(MAX_NEW_TOKENS):
        out = model(input_ids=torch.tensor([seq], dtype=torch.long), use_cache=False).logits[0, -1].float()
        min_margin = min(min_margin, margin_of(out))
        nxt = int(torch.argmax(out))
        greedy.append(nxt)
        seq.append(nxt)
    return top5, greedy, min_margin


def make_goldens(model, tok: PreTrainedTokenizerFast, spec) -> list[dict]:
    cases = []
    for slot, candidates in enumerate(PROMPT_SLOTS):
        chosen = None
        for prompt in candidates:
            input_ids = tok(prompt)["input_ids"]
            top5, greedy, m = run_case(model, input_ids)
            gap5 = min(top5[k][1] - top5[k + 1][1] for k in range(4))
            if m > SELECT_MARGIN and gap5 > SELECT_TOP5_GAP:
                assert m > MIN_MARGIN
                chosen = dict(prompt=prompt, input_ids=input_ids, greedy_ids=greedy, top5=top5)
                print(
                    f"  [{spec['name']}] slot {slot}: {len(input_ids)} prompt tokens, "
                    f"min margin {m:.4f}, min top5 gap {gap5:.4f}"
                )
                break
            print(
                f"  [{spec['name']}] slot {slot}: prompt {prompt!r} rejected "
                f"(min margin {m:.2e}, min top5 gap {gap5:.2e})"
            )
        assert chosen is not None, f"{spec['name']}: no prompt in slot {slot} satisfies the margin"
        cases.append(chosen)
    return cases


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_golden(path: Path, golden: dict) -> None:
    """Like write_json, but with each case's lists on one line (easier to read and diff)."""
    dumps = lambda v: json.dumps(v, ensure_ascii=False)  # noqa: E731
    lines = ["{"]
    for k, v in golden.items():
        if k != "cases":
            lines.append(f"  {dumps(k)}: {dumps(v)},")
    lines.append('  "cases": [')
    for i, case in enumerate(golden["cases"]):
        fields = [f"      {dumps(k)}: {dumps(v)}" for k, v in case.items()]
        lines.append("    {\n" + ",\n".join(fields) + "\n    }" + ("," if i + 1 < len(golden["cases"]) else ""))
    lines.append("  ]")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == golden
    path.write_text(text, encoding="utf-8")


def save_fixture(spec, model, base_tok: Tokenizer, out: Path) -> PreTrainedTokenizerFast:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    # --- weights + config ---
    kwargs = dict(safe_serialization=True)
    if spec["shard"]:
        kwargs["max_shard_size"] = spec["shard"]
    model.save_pretrained(out, **kwargs)

    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # Hub checkpoints written by transformers 4.x carry top-level rope_theta/rope_scaling and
    # torch_dtype; transformers 5 writes rope_parameters and dtype. Keep both spellings so a
    # loader that understands either one works (transformers 5 still loads this fine).
    cfg.update(spec["legacy"])
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    cfg.pop("_name_or_path", None)
    cfg.pop("transformers_version", None)  # keep output bytes independent of the env
    write_json(cfg_path, dict(sorted(cfg.items())))

    # --- generation config ---
    gen = {
        "eos_token_id": spec["config"]["eos_token_id"],
        "do_sample": False,
    }
    if spec["add_bos"]:
        gen["bos_token_id"] = spec["config"]["bos_token_id"]
    write_json(out / "generation_config.json", gen)
    # sanity: transformers understands it
    GenerationConfig.from_pretrained(out)

    # --- tokenizer ---
    raw = build_tokenizer(base_tok, spec["add_bos"])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS if spec["add_bos"] else None,
        eos_token=EOT,
        pad_token=None,
        unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOT)],
        add_bos_token=spec["add_bos"],
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=spec["config"]["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE_WITH_BOS if spec["add_bos"] else CHAT_TEMPLATE_NO_BOS,
    )
    hf_tok.save_pretrained(out, save_jinja_files=False)

    # Normalize tokenizer_config.json: drop env-specific keys, ensure required keys exist.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.pop("transformers_version", None)
    tc["bos_token"] = BOS if spec["add_bos"] else None
    tc["eos_token"] = EOT
    tc["chat_template"] = CHAT_TEMPLATE_WITH_BOS if spec["add_bos"] else CHAT_TEMPLATE_NO_BOS
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(tc_path, dict(sorted(tc.items())))
    # the template lives in tokenizer_config.json only
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return hf_tok


@torch.no_grad()
def verify_roundtrip(out: Path, golden: dict, add_bos: bool, bos_id: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.architectures == [golden["architecture"]], model.config.architectures
    assert type(model).__name__ == golden["architecture"]
    for case in golden["cases"]:
        ids = tok(case["prompt"])["input_ids"]
        assert ids == case["input_ids"], (case["prompt"], ids, case["input_ids"])
        assert (ids[0] == bos_id) == add_bos, (out.name, ids[:3])
        assert tok.decode(ids, skip_special_tokens=True) == case["prompt"], tok.decode(ids)
        top5, greedy, m = run_case(model, ids)
        assert greedy == case["greedy_ids"], (out.name, greedy, case["greedy_ids"])
        assert [t[0] for t in top5] == [t[0] for t in case["top5"]]
        for (_, a), (_, b) in zip(top5, case["top5"]):
            assert abs(a - b) < 1e-4, (a, b)
        assert m > MIN_MARGIN
    # chat template renders
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    expected = (BOS if add_bos else "") + (
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert rendered == expected, repr(rendered)


README = """\
# Test fixtures: tiny random-weight models

Generated by `scripts/make_fixtures.py` — do not edit by hand. Regenerate with

```sh
scripts/make-fixtures.sh            # creates/uses the venv .venv-fixtures (override with FIXTURE_VENV=...)
```

Each directory is a real Hugging Face model folder (`save_pretrained`, safetensors, float32)
of a real architecture with tiny dimensions and **seeded random weights** (weights ~ N(0, 0.2),
RMSNorm weights ~ 1 + 0.1·N(0,1), biases ~ 0.2·N(0,1), so a loader that ignores norms or
biases fails the goldens). Nothing was downloaded; everything is built locally.

| dir       | architecture       | hidden | layers | heads / kv | head_dim | ffn | notes |
|-----------|--------------------|--------|--------|------------|----------|-----|-------|
| `llama`   | LlamaForCausalLM   | 64 | 2 | 4 / 2 | 16 | 128 | tied embeddings (no `lm_head.weight` in the file), llama3 RoPE scaling (factor 8, orig 64), theta 5e5, BOS added |
| `mistral` | MistralForCausalLM | 64 | 2 | 4 / 1 | 16 | 96  | untied, `sliding_window: null`, BOS added |
| `qwen2`   | Qwen2ForCausalLM   | 64 | 2 | 4 / 2 | 16 | 128 | q/k/v biases, **sharded** (`model.safetensors.index.json` + shards), no BOS |
| `qwen3`   | Qwen3ForCausalLM   | 64 | 2 | 4 / 2 | **32** | 128 | `head_dim` != hidden/heads, q_norm/k_norm, untied, no BOS |

`config.json` carries both the transformers-5 spelling (`rope_parameters`, `dtype`) and the
Hub/transformers-4 spelling (`rope_theta`, `rope_scaling`, `torch_dtype`) of the same values.

## Tokenizer

All four share one byte-level BPE (ByteLevel pre-tokenizer, `add_prefix_space: false`,
ByteLevel decoder) trained on a small embedded corpus (English, accented Latin, Greek, CJK,
emoji): VOCAB_SIZE tokens = 256 bytes + merges (ids 0..BPE_LAST) followed by the Llama-3 style
special tokens SPECIAL_IDS.
`llama`/`mistral` add `<|begin_of_text|>` via the post-processor (TemplateProcessing);
`qwen2`/`qwen3` add nothing. `tokenizer_config.json` has a Llama-3 style `chat_template`,
`bos_token` (null for the Qwen fixtures) and `eos_token` = `<|eot_id|>`;
`generation_config.json` has `eos_token_id` = [`<|end_of_text|>`, `<|eot_id|>`].

## golden.json

```json
{"model": "llama", "architecture": "LlamaForCausalLM", "dtype": "float32",
 "torch_version": "...", "transformers_version": "...", "max_new_tokens": 12,
 "cases": [{"prompt": "...", "input_ids": [...], "greedy_ids": [...],
            "top5": [[token_id, logit], ...]}]}
```

* `input_ids` = `tokenizer(prompt)["input_ids"]` (BOS included where the tokenizer adds it).
* `top5` = the 5 largest logits at the **last prompt position** of one forward pass over the
  prompt, highest first, as `[token_id, logit]`.
* `greedy_ids` = the `max_new_tokens` **new** tokens of greedy decoding (full forward pass,
  argmax of the last position, append; repeated). No EOS stopping: EOS ids may appear.
* Computed in float32, eval mode, eager attention, on CPU. At every greedy step the gap
  between the top-1 and top-2 logit is > 1e-3 (asserted), so f32 kernels that differ in
  rounding still reproduce the ids exactly; compare logits with a tolerance (~1e-3).
"""


def main() -> int:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    np.random.seed(0)
    torch.manual_seed(0)

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}, safetensors {safetensors.__version__}, numpy {np.__version__}"
    )

    base_tok = train_base_tokenizer()
    vocab_size = base_tok.get_vocab_size(with_added_tokens=True)
    ids = {t: base_tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert vocab_size == BPE_VOCAB_SIZE + len(SPECIAL_TOKENS)
    assert sorted(ids.values()) == list(range(BPE_VOCAB_SIZE, vocab_size)), ids
    print(f"tokenizer: vocab {vocab_size}, special ids {ids}")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for spec in model_specs(vocab_size, ids):
        name = spec["name"]
        print(f"== {name}")
        model = build_model(spec)
        out = OUT_DIR / name
        hf_tok = save_fixture(spec, model, base_tok, out)
        assert len(hf_tok) == vocab_size == model.config.vocab_size

        cases = make_goldens(model, hf_tok, spec)
        golden = {
            "model": name,
            "architecture": type(model).__name__,
            "dtype": "float32",
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "max_new_tokens": MAX_NEW_TOKENS,
            "cases": cases,
        }
        write_golden(out / "golden.json", golden)
        verify_roundtrip(out, golden, spec["add_bos"], ids[BOS])
        print(f"  [{name}] round-trip OK")

    readme = (
        README.replace("VOCAB_SIZE", str(vocab_size))
        .replace("BPE_LAST", str(BPE_VOCAB_SIZE - 1))
        .replace("SPECIAL_IDS", ", ".join(f"`{t}`={i}" for t, i in ids.items()))
    )
    (OUT_DIR / "README.md").write_text(readme, encoding="utf-8")

    total = sum(p.stat().st_size for p in OUT_DIR.rglob("*") if p.is_file())
    print(f"total size of {OUT_DIR.relative_to(REPO_ROOT)}: {total} bytes")
    assert total < MAX_TOTAL_BYTES, total
    return 0


if __name__ == "__main__":
    sys.exit(main())
