"""Time one training step (forward + backward + AdamW) of GalacticaLM against two references, in fp32 and bf16.

    .venv/bin/python bench/model_step.py [--layers 2 --d-model 768 --heads 12 --vocab 50000
                                          --seq-len 512 --batch 4 --warmup 2 --steps 5
                                          --precisions fp32,bf16 --json out.json]

(1) GalacticaLM (megatron-core TP layers, TP=1), (2) a plain-PyTorch nanoGPT-style model written
below (pre-LN, GeLU, no bias, learned positions, tied embeddings, F.scaled_dot_product_attention,
F.cross_entropy), (3) transformers.OPTForCausalLM (enable_bias=False). Same shapes, dropout off, the
same AdamW for all, the cross-entropy in fp32 for all (GalacticaLM's own rule). Each precision is the
same for every model: fp32, or bf16 weights, activations and gradients (``model.to(torch.bfloat16)``:
what DeepSpeed's bf16 mode runs forward and backward; its fp32 master copy is the engine's, timed by
bench/train_step.py). Prints tokens/s (median over timed steps), ratios at equal precision, and achieved
FLOP/s against this machine's measured GEMM rate in that precision (a 2048^3 matmul).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- (2) plain PyTorch reference
class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.fc_in = nn.Linear(d, 4 * d, bias=False)
        self.fc_out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, d))
        return x + self.fc_out(F.gelu(self.fc_in(self.ln_2(x))))


class RefLM(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, vocab: int, max_positions: int = 2048):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(max_positions, d)
        self.blocks = nn.ModuleList(RefBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, labels):
        x = self.wte(ids) + self.wpe.weight[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


# ---------------------------------------------------------------- models under test
def build(kind: str, args):
    if kind == "galactica":
        from model import GalacticaConfig, GalacticaLM
        config = GalacticaConfig(n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                                 vocab_size=args.vocab, dropout=0.0, attention_dropout=0.0)
        model = GalacticaLM(config)
        return model, lambda ids, labels: model(ids, labels)
    if kind == "plain":
        model = RefLM(args.layers, args.d_model, args.heads, args.vocab)
        return model, lambda ids, labels: model(ids, labels)
    if kind == "hf_opt":
        from transformers import OPTConfig, OPTForCausalLM
        config = OPTConfig(vocab_size=args.vocab, hidden_size=args.d_model, word_embed_proj_dim=args.d_model,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           ffn_dim=4 * args.d_model, max_position_embeddings=2048, enable_bias=False,
                           activation_function="gelu", do_layer_norm_before=True, dropout=0.0,
                           attention_dropout=0.0, activation_dropout=0.0, attn_implementation="sdpa")
        model = OPTForCausalLM(config)

        def step(ids, labels):  # our labels are pre-shifted; HF shifts itself, so compute the CE here
            logits = model(input_ids=ids, use_cache=False).logits
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return model, step
    raise ValueError(kind)


class Runner:
    """One model in one precision, its AdamW and a fixed batch; `step()` times forward + backward + optimizer step."""

    def __init__(self, kind: str, precision: str, args):
        torch.manual_seed(0)
        self.kind, self.precision = kind, precision
        self.model, self.loss_fn = build(kind, args)
        self.model.train()
        if precision == "bf16":
            self.model.to(torch.bfloat16)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                           weight_decay=0.1, fused=args.fused_adamw)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
        self.inputs, self.labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.times: list[float] = []

    def step(self) -> float:
        start = time.perf_counter()
        loss = self.loss_fn(self.inputs, self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)
        return loss.item()


def gemm_flops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--models", default="galactica,plain,hf_opt")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")

    tokens = args.batch * args.seq_len
    # Same formula as GalacticaLM.flops_per_token: 6 * (params without the position table) + 6 L s d.
    matmul_params = (12 * args.layers * args.d_model**2 + args.vocab * args.d_model)
    flops_per_token = 6 * matmul_params + 6 * args.layers * args.seq_len * args.d_model
    peaks = {p: [gemm_flops(DTYPES[p])] for p in precisions}
    print(f"threads {args.threads}; GEMM 2048^3: " + ", ".join(f"{p} {v[0] / 1e9:.1f} GFLOP/s" for p, v in peaks.items())
          + f"; {flops_per_token / 1e6:.0f} MFLOP per token", flush=True)
    # Round-robin: every round runs one step of each model in each precision, so a machine shared with other
    # jobs slows all alike; the order rotates every round (the position in a round measurably mattered on
    # the shared machine); the first `warmup` rounds are not timed.
    runners = [Runner(kind, p, args) for p in precisions for kind in args.models.split(",")]
    for round_ in range(args.warmup + args.steps):
        shift = round_ % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            loss = runner.step()
            print(f"  round {round_} {runner.kind:10s} {runner.precision} {runner.times[-1]:6.2f} s  loss {loss:.4f}",
                  flush=True)
        for p in precisions:
            peaks[p].append(gemm_flops(DTYPES[p], repeats=2))
    results = []
    for runner in runners:
        peak = max(peaks[runner.precision])
        median = statistics.median(runner.times[args.warmup:])
        tps = tokens / median
        results.append({"model": runner.kind, "precision": runner.precision, "params": runner.n_params,
                        "median_step_s": median, "best_step_s": min(runner.times[args.warmup:]),
                        "tokens_per_s": tps, "gflops": tps * flops_per_token / 1e9,
                        "gemm_peak_gflops": peak / 1e9, "fraction_of_gemm_peak": tps * flops_per_token / peak})
    for p in precisions:
        rows = {r["model"]: r for r in results if r["precision"] == p}
        print(f"\n{p}: GEMM peak (best of the rounds) {max(peaks[p]) / 1e9:.1f} GFLOP/s")
        print(f"{'model':10s} {'tokens/s':>9s} {'best s':>7s} {'median s':>9s} {'GFLOP/s':>8s} {'% peak':>7s} "
              f"{'vs plain':>8s} {'vs hf_opt':>9s}")
        for kind, r in rows.items():
            r["vs_plain"] = r["tokens_per_s"] / rows["plain"]["tokens_per_s"] if "plain" in rows else None
            r["vs_hf_opt"] = r["tokens_per_s"] / rows["hf_opt"]["tokens_per_s"] if "hf_opt" in rows else None
            print(f"{kind:10s} {r['tokens_per_s']:9.1f} {r['best_step_s']:7.2f} {r['median_step_s']:9.2f} "
                  f"{r['gflops']:8.1f} {100 * r['fraction_of_gemm_peak']:6.1f}% {_ratio(r['vs_plain']):>8s} "
                  f"{_ratio(r['vs_hf_opt']):>9s}")
    by = {(r["model"], r["precision"]): r for r in results}
    if {"fp32", "bf16"} <= set(precisions):
        print("\nbf16 vs fp32: " + ", ".join(
            f"{k} {by[k, 'bf16']['tokens_per_s'] / by[k, 'fp32']['tokens_per_s']:.2f}x" for k in args.models.split(",")))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "flops_per_token": flops_per_token,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
