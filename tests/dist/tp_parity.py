"""Run under torchrun with TP = world size: compare against the TP=1 reference saved by the test.

Reads REF (a torch file with config kwargs, seed, full state dict, inputs, labels, logits, loss and
full gradients made by a TP=1 model) and writes RESULT (rank 0) with the measured differences.
"""
import os
import sys

import torch
import torch.distributed as dist

from model import GalacticaConfig, GalacticaLM, parallel
from model.hf import full_state_dict, gather_tp_tensors, load_full_state_dict


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def main(ref_path: str, result_path: str) -> None:
    parallel.init_distributed(tensor_parallel_size=int(os.environ["WORLD_SIZE"]))
    ref = torch.load(ref_path, weights_only=False)
    config = GalacticaConfig(**ref["config"])
    result = {"tp_size": parallel.tp_size()}

    # 1. Seed-identical CPU init: every rank builds the full weights and keeps its shard.
    torch.manual_seed(ref["seed"])
    model = GalacticaLM(config)
    init_full = full_state_dict(model)
    result["init_equal"] = all(torch.equal(init_full[k], ref["state_dict"][k]) for k in ref["state_dict"])

    # 2. Logits, loss and gradients from the reference's full weights.
    load_full_state_dict(model, ref["state_dict"])
    model.eval()
    with torch.no_grad():
        logits = model(ref["input_ids"])
    result["logits_rel_err"] = rel_err(logits, ref["logits"])
    model.train()
    loss = model(ref["input_ids"], ref["labels"])
    loss.backward()
    result["loss_rel_err"] = rel_err(loss.detach(), ref["loss"])
    grads = gather_tp_tensors({n: p.grad for n, p in model.named_parameters()})
    result["grad_rel_err"] = {n: rel_err(g, ref["grads"][n]) for n, g in grads.items()}

    # 3. Dropout: replicated activations must see equal masks on all TP ranks (LayerNorm grads are
    #    then equal), TP-split activations (attention probabilities) a different stream per rank.
    dropout_model = GalacticaLM(GalacticaConfig(**{**ref["config"], "dropout": 0.1, "attention_dropout": 0.1}))
    load_full_state_dict(dropout_model, ref["state_dict"])
    parallel.manual_seed(1234)
    dropout_model.train()
    dropout_model(ref["input_ids"], ref["labels"]).backward()
    ln_grad = torch.cat([p.grad.flatten() for n, p in dropout_model.named_parameters() if ".ln_" in n])
    ln_grads = [torch.empty_like(ln_grad) for _ in range(parallel.tp_size())]
    dist.all_gather(ln_grads, ln_grad, group=parallel.tp_group())
    result["ln_grads_equal_across_tp"] = all(torch.equal(g, ln_grads[0]) for g in ln_grads)
    with parallel.tp_rng_fork(torch.device("cpu")):
        tp_draw = torch.rand(8)
    default_draw = torch.rand(8)
    tp_draws = [torch.empty(8) for _ in range(parallel.tp_size())]
    default_draws = [torch.empty(8) for _ in range(parallel.tp_size())]
    dist.all_gather(tp_draws, tp_draw, group=parallel.tp_group())
    dist.all_gather(default_draws, default_draw, group=parallel.tp_group())
    result["tp_stream_differs"] = all(not torch.equal(tp_draws[0], d) for d in tp_draws[1:])
    result["default_stream_equal"] = all(torch.equal(default_draws[0], d) for d in default_draws[1:])

    if dist.get_rank() == 0:
        torch.save(result, result_path)
    dist.barrier()
    parallel.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
