#!/usr/bin/env python3
"""Tokenizer goldens for GGUF files: what the same vocabulary's `tokenizers` JSON makes of a
few hundred strings (unicode, digits, whitespace runs, special tokens, chat markup).

The reference tokenizer is transformers' own GGUF conversion
(`PreTrainedTokenizerFast.from_pretrained(dir, gguf_file=...)`), code independent of hearth's. One
correction: transformers has no entry for `tokenizer.ggml.pre = smollm` and falls back to
GPT-2's split, which groups digits; SmolLM2's published tokenizer.json and llama.cpp
(LLAMA_VOCAB_PRE_TYPE_SMOLLM: `\\p{N}` first) split every digit, so for `smollm` the
reference's pre-tokenizer is SmolLM2's: Digits(individual_digits) then ByteLevel.

When llama.cpp's llama-server is at hand (LLAMA_SERVER=path, from benches/build-llama-cpp.sh),
every string is also tokenized by it (special tokens parsed) and must give the same ids.

Usage: gguf_tokenizer_goldens.py OUT.json FILE.gguf
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import types

from tokenizers import normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# transformers' GGUF metadata reader imports torch only to name float dtypes for weight
# loading; the tokenizer path never touches them. Give it those names, not a 2 GB install.
if "torch" not in sys.modules:
    _torch = types.ModuleType("torch")
    _torch.__getattr__ = lambda name: type(name, (), {})  # torch.float32, torch.Tensor, ...
    sys.modules["torch"] = _torch


def strings(tok) -> list[str]:
    specials = [t for t in tok.all_special_tokens if t]
    base = [
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "What is the capital of France?",
        "Once upon a time, there was a little dragon who loved to read books.",
        "I'm sure you'll see they've done it; we'd've known.",
        "Don't stop believing.",
        "e-mail: someone@example.com, url: https://example.org/path?q=1&r=2#frag",
        "Café au lait, crème brûlée, naïve façade, déjà vu, Straße, smørrebrød, jalapeño.",
        "Ελληνικά: Καλημέρα κόσμε. Русский: Привет, мир! Українська: Привіт.",
        "日本語のテキスト：こんにちは世界。東京は大きな都市です。",
        "中文：你好，世界。한국어: 안녕하세요. ไทย: สวัสดี. हिन्दी: नमस्ते. עברית: שלום. العربية: مرحبا",
        "Emoji: 🙂 😀 🚀 🌍 ❤️ 👍🏽 🎉 👨‍👩‍👧‍👦 🏳️‍🌈 — and an em dash, an ellipsis… and «guillemets».",
        "def main():\n    print(\"hello\")\n    return 0\n",
        "for (int i = 0; i < 10; ++i) { sum += a[i] * b[i]; }",
        "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
        "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
        "{\"key\": [1, 2, 3], \"nested\": {\"a\": null, \"b\": true}}",
        "$x^2 + y^2 = z^2$ and ∑_{i=1}^{n} i = n(n+1)/2, π ≈ 3.14159, √2, ∞, ≠, ≤",
        "ALL CAPS SENTENCE WITH NUMBERS 123 AND SYMBOLS !@#$%^&*()",
        "mIxEd CaSe wOrDs and camelCaseIdentifiers and snake_case_names",
        "",
        " ",
        "a",
        "\u00a0non-breaking\u00a0spaces\u2009and\u200bzero width",
        "tab\tseparated\tvalues\tend",
        "line one\nline two\r\nline three\rline four",
        "Mr. O'Neil's dog's bone—it's there.",
        "«Bonjour», dit-il. ¿Qué tal? ¡Hola!",
        "0x1F 0b1010 1e-9 6.022e23 -0.5 +7 1/2 50% 3:45pm",
    ]
    digits = [
        "1", "12", "123", "1234", "12345", "1234567890", "3.14159", "-42", "1,000,000",
        "2024-11-25", "+1 (555) 123-4567", "v1.2.3", "x86_64", "0.0001", " 7 8 9", "99 bottles",
        "I have 2 cats and 13 dogs", "10000000000000000000", "٣ ٤ ٥", "１２３", "Ⅷ", "007",
    ]
    spaces = [
        "a  b", "a   b", "a    b", "a        b", "  leading", "trailing  ", "   ", "\n", "\n\n",
        "\n\n\n\n", "\t", "\t\tindented", " \n \n ", "word \n\n next", "x\r\n\r\ny",
        "    four spaces", "end.  Two spaces.", "a \t b", "\u3000ideographic space",
    ]
    marked = []
    for s in specials:
        marked += [s, f"hello{s}world", f"{s} spaced {s}", f"before {s}\nafter", f"{s}{s}"]
    chat = []
    if tok.chat_template:
        convs = [
            [{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
            [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "And 3+3?"}],
            [{"role": "user", "content": "Ünïcödé 🙂 and\n\nnewlines"}],
        ]
        for c in convs:
            try:
                chat.append(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True))
            except Exception as e:  # a template may reject a system role
                print(f"  chat template skipped a conversation: {e}", file=sys.stderr)
    out = base + digits + spaces + marked + chat
    # Pairs of the pieces above, to reach a few hundred in mixed contexts.
    pieces = base[:14] + digits[:12] + spaces[:12]
    pairs = [(a, b) for a in pieces for b in pieces if a != b]
    for i, (a, b) in enumerate(pairs[:: max(1, len(pairs) // 180)]):
        out.append(a + (" " if i % 3 else "") + b)
    # Text assembled from the vocabulary itself: runs of 8 tokens spread over the ids.
    step = max(1, len(tok) // 640)
    vocab_ids = list(range(0, len(tok), step))
    for j in range(0, len(vocab_ids), 8):
        text = tok.decode(vocab_ids[j : j + 8], skip_special_tokens=True)
        if text and "\ufffd" not in text:
            out.append(text)
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def reference(gguf_path: Path):
    # AutoTokenizer would read the model config too (which needs torch); the tokenizer
    # class's own GGUF path is the same conversion.
    tok = PreTrainedTokenizerFast.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    from gguf import GGUFReader

    r = GGUFReader(str(gguf_path))
    f = r.fields.get("tokenizer.ggml.pre")
    pre = bytes(f.parts[f.data[0]]).decode() if f else None
    note = "transformers' GGUF tokenizer conversion"
    if pre == "smollm":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
        note += ", pre-tokenizer set to SmolLM2's (Digits(individual_digits) + ByteLevel)"
    f = r.fields.get("tokenizer.ggml.model")
    model = bytes(f.parts[f.data[0]]).decode() if f else None
    if model == "llama":
        # transformers builds SentencePiece vocabularies with Metaspace(prepend_scheme=first),
        # which adds no "▁" to text that already starts with a space nor after a special
        # token. SentencePiece itself, llama.cpp, and the tokenizer.json that Llama 2 and
        # Mistral 7B ship ("legacy") prepend it to every piece of text: use that form.
        tok.backend_tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        tok.backend_tokenizer.pre_tokenizer = None
        note += ", with the prefix-space normalizer of Llama 2's / Mistral 7B's tokenizer.json"
    return tok, note, model


def llama_cpp_tokens(gguf_path: Path, texts: list[str]):
    server = os.environ.get("LLAMA_SERVER")
    if not server or not Path(server).exists():
        return None
    port = 18400 + os.getpid() % 500
    proc = subprocess.Popen([server, "-m", str(gguf_path), "--port", str(port), "-t", "1", "-c", "512"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        out = []
        for t in texts:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/tokenize",
                data=json.dumps({"content": t, "add_special": False, "parse_special": True}).encode(),
                headers={"Content-Type": "application/json"})
            out.append(json.load(urllib.request.urlopen(req, timeout=30))["tokens"])
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    out_path, gguf_path = Path(sys.argv[1]), Path(sys.argv[2])
    tok, note, model = reference(gguf_path)
    texts = strings(tok)
    cases = []
    for t in texts:
        plain = tok(t, add_special_tokens=False)["input_ids"]
        special = tok(t, add_special_tokens=True)["input_ids"]
        case = {"text": t, "ids": plain}
        # Only where they differ from `ids` and `text`, to keep the file small.
        if special != plain:
            case["ids_with_special"] = special
        decoded = tok.decode(plain, skip_special_tokens=True)
        if decoded != t:
            case["decoded"] = decoded
        cases.append(case)
    llama = llama_cpp_tokens(gguf_path, texts)
    checked = "not compared with llama.cpp (LLAMA_SERVER unset)"
    if llama is not None:
        diff = [c["text"] for c, l in zip(cases, llama) if c["ids"] != l]
        if os.environ.get("SHOW_DIFF"):
            for c, l in zip(cases, llama):
                if c["ids"] != l:
                    print("  differs:", repr(c["text"])[:80], c["ids"][:8], l[:8])
        assert not diff, f"llama.cpp disagrees with the reference on {len(diff)} strings: {diff[:5]}"
        checked = f"llama.cpp agrees on all {len(cases)} strings"
    golden = {"gguf": gguf_path.name, "reference": note, "llama_cpp": checked, "cases": cases}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # One case per line: small, and diffs show which strings changed.
    head = {k: v for k, v in golden.items() if k != "cases"}
    lines = [json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in cases]
    text = json.dumps(head, ensure_ascii=False)[:-1] + ',"cases":[\n' + ",\n".join(lines) + "\n]}\n"
    assert json.loads(text) == golden
    out_path.write_text(text, encoding="utf-8")
    print(f"{out_path}: {len(cases)} strings; {checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
