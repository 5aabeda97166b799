#!/usr/bin/env python3
"""The reference for benches/opsa_step.rs: the same OPSA step written with PyTorch + transformers
(random Qwen3-shaped model, ~42M parameters), on the same machine.

    python3 benches/opsa_step_torch.py [--threads N]

Step: sampled rollouts (T = 1) → teacher forward (no grad, 16 context tokens + prompt + response)
→ student forward → mixed(0.5) KL on the teacher's top-64, token mean → backward → AdamW.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen3Config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=32768, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=True,
    )
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    teacher.load_state_dict(student.state_dict())
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.01)
    b, plen, new = (int(os.environ.get(k, d)) for k, d in [("OPSA_BENCH_BATCH", 4), ("OPSA_BENCH_PROMPT", 64), ("OPSA_BENCH_NEW", 128)])
    prompts = torch.tensor([[(r * 7919 + j * 104729) % cfg.vocab_size for j in range(plen)] for r in range(b)])
    ctx = torch.tensor([(j * 31 + 5) for j in range(16)])
    for rnd in range(2):
        t0 = time.perf_counter()
        student.eval()
        with torch.no_grad():
            seqs = student.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        t_roll = time.perf_counter() - t0
        t1 = time.perf_counter()
        student.train()
        tseqs = torch.cat([ctx.expand(b, -1), seqs], dim=1)
        with torch.no_grad():
            tl = teacher(tseqs).logits[:, 16 + plen - 1:-1].float()
        t_teacher = time.perf_counter() - t1
        sl = student(seqs).logits[:, plen - 1:-1].float()
        t_student = time.perf_counter() - t1
        idx = tl.topk(64, dim=-1).indices
        lt = F.log_softmax(tl.gather(-1, idx), -1)
        ls = F.log_softmax(sl.gather(-1, idx), -1)
        fwd = (lt.exp() * (lt - ls)).sum(-1)
        rev = (ls.exp() * (ls - lt)).sum(-1)
        loss = (0.5 * fwd + 0.5 * rev).mean()
        loss.backward()
        t_backward = time.perf_counter() - t1
        opt.step()
        opt.zero_grad()
        t_train = time.perf_counter() - t1
        if rnd == 1:
            tokens = b * new
            print(json.dumps({"impl": "pytorch", "batch": b, "prompt": plen, "new": new, "rollout_tok_s": round(tokens / t_roll, 1),
                              "train_tok_s": round(tokens / t_train, 1), "step_s": round(t_roll + t_train, 3),
                              "phases_s": {"teacher_forward": round(t_teacher, 3), "student_forward_logits": round(t_student - t_teacher, 3),
                                           "loss_backward": round(t_backward - t_student, 3), "optimizer": round(t_train - t_backward, 3)}}), flush=True)


if __name__ == "__main__":
    main()
