#!/usr/bin/env python3
"""The reference for benches/generate.rs: the same random Qwen3-shaped model (~42M parameters)
through PyTorch eager + transformers, on the same machine. Prints JSON lines in the same format.

    python3 benches/generate_torch.py [--threads N] [--device cpu|cuda]

Environment: OPSA_BENCH_PROMPT (default 128), OPSA_BENCH_NEW (default 64), OPSA_BENCH_BATCHES ("1,8").
"""
import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, Qwen3Config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attn", default="sdpa", help="attention implementation (sdpa or eager)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Qwen3Config(
        vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=args.attn).eval().to(args.device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    plen, new = int(os.environ.get("OPSA_BENCH_PROMPT", 128)), int(os.environ.get("OPSA_BENCH_NEW", 64))
    batches = [int(x) for x in os.environ.get("OPSA_BENCH_BATCHES", "1,8").split(",")]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for b in batches:
        ids = torch.tensor([[(r * 7919 + j * 104729) % cfg.vocab_size for j in range(plen)] for r in range(b)], device=args.device)
        mask = torch.ones_like(ids)

        def prefill():
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                model(ids, attention_mask=mask, logits_to_keep=1)
            sync()
            return time.perf_counter() - t0

        prefill()
        t_prefill = min(prefill() for _ in range(3))

        def gen():
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            sync()
            assert out.shape[1] == plen + new
            return time.perf_counter() - t0

        t_gen = min(gen() for _ in range(2))
        t_decode = max(t_gen - t_prefill, 1e-9)
        print(json.dumps({
            "impl": "pytorch", "backend": f"torch-{args.device}-{args.attn}", "params_m": round(params, 1), "batch": b,
            "prompt": plen, "new": new, "prefill_tok_s": round(b * plen / t_prefill, 1),
            "decode_tok_s": round(b * (new - 1) / t_decode, 1),
        }), flush=True)


if __name__ == "__main__":
    main()
