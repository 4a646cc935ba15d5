"""The same Llama-3-8B shape in Hugging Face transformers (random weights, bf16, CUDA):
output tokens/s of `generate` over one batch, as the peer of `hearth bench`."""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=64)
p.add_argument("--input-len", type=int, default=512)
p.add_argument("--output-len", type=int, default=256)
a = p.parse_args()
cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
ids = torch.randint(0, cfg.vocab_size, (a.batch, a.input_len), device="cuda")
kw = dict(max_new_tokens=a.output_len, min_new_tokens=a.output_len, do_sample=False, pad_token_id=0)
with torch.no_grad():
    model.generate(ids[:2, :16], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize(); t = time.time()
    model.generate(ids, **kw)
    torch.cuda.synchronize(); dt = time.time() - t
print(json.dumps({"backend": "transformers", "batch": a.batch, "output_tokens": a.batch * a.output_len,
                  "duration": dt, "output_throughput": a.batch * a.output_len / dt}))
