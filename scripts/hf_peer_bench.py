"""The peer of `hearth bench` on the GPU machine: the Llama-3-8B shape in Hugging Face
transformers (random init from a LlamaConfig, bf16, CUDA, its default attention), timing
`model.generate` on one batch of random prompts, greedy, with min_new_tokens =
max_new_tokens so every sequence makes exactly --output-len tokens.

Prints one JSON line per batch size: output_throughput (new tokens / wall time of the
whole generate call, prefill included, as `hearth bench` counts it), total_token_throughput,
prefill_s (a generate of one new token on the same batch), peak_memory_gib. A batch that
does not fit prints {"batch": N, "error": "out of memory"} and the next is tried.

    python3 scripts/hf_peer_bench.py --batch 64 256 --input-len 512 --output-len 256
"""
import argparse
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
p.add_argument("--input-len", type=int, default=512)
p.add_argument("--output-len", type=int, default=256)
p.add_argument("--layers", type=int, default=32, help="fewer only to try the script out")
a = p.parse_args()

# meta-llama/Meta-Llama-3-8B's config.json
cfg = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=a.layers,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128001, pad_token_id=128001,
)
torch.manual_seed(0)
prev = torch.get_default_dtype()
torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 on the GPU: no fp32 copy
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg)
torch.set_default_dtype(prev)
model = model.to(device="cuda", dtype=torch.bfloat16).eval()
params = sum(t.numel() for t in model.parameters())
print(f"hf_peer_bench: {params / 1e9:.2f}B parameters, attention {getattr(model.config, '_attn_implementation', '?')}",
      file=sys.stderr)


def generate(ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id)


with torch.inference_mode():
    generate(torch.randint(0, cfg.vocab_size, (2, 16), device="cuda"), 4)  # warm-up
    for b in a.batch:
        ids = torch.randint(0, cfg.vocab_size, (b, a.input_len), device="cuda")
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t = time.perf_counter()
            generate(ids, 1)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            out = generate(ids, a.output_len)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
        except torch.OutOfMemoryError:
            out = None
            print(json.dumps({"backend": "transformers", "batch": b, "error": "out of memory"}), flush=True)
            continue
        new = (out.shape[1] - a.input_len) * b
        print(json.dumps({
            "backend": "transformers", "transformers": __import__("transformers").__version__,
            "torch": torch.__version__, "device": torch.cuda.get_device_name(), "batch": b,
            "input_len": a.input_len, "output_len": a.output_len, "output_tokens": new,
            "duration": dt, "output_throughput": new / dt,
            "total_token_throughput": (new + b * a.input_len) / dt, "prefill_s": prefill,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        }), flush=True)
        del out
