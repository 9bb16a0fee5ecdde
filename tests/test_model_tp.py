"""Tensor parallelism under torchrun (gloo, CPU): TP=2 and TP=4 reproduce TP=1 exactly."""
import pytest
import torch

from model import GalacticaConfig, GalacticaLM
from model.hf import full_state_dict
from helpers import REPO, torchrun

CONFIG = dict(n_layers=2, d_model=64, n_heads=4, vocab_size=1000, max_positions=64,
              dropout=0.0, attention_dropout=0.0)
SEED = 7


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A TP=1 model's full weights, inputs, logits, loss and gradients."""
    torch.manual_seed(SEED)
    model = GalacticaLM(GalacticaConfig(**CONFIG))
    state = full_state_dict(model)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 24), generator=gen)
    labels = torch.randint(0, CONFIG["vocab_size"], (2, 24), generator=gen)
    labels[0, :5] = -100
    model.eval()
    with torch.no_grad():
        logits = model(input_ids)
    model.train()
    loss = model(input_ids, labels)
    loss.backward()
    path = tmp_path_factory.mktemp("tp") / "ref.pt"
    torch.save({"config": CONFIG, "seed": SEED, "state_dict": state, "input_ids": input_ids,
                "labels": labels, "logits": logits, "loss": loss.detach(),
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}, path)
    return path


@pytest.mark.multirank
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_single_rank(reference, tmp_path, tp):
    result_path = tmp_path / "result.pt"
    torchrun(tp, REPO / "tests/dist/tp_parity.py", str(reference), str(result_path), timeout=300)
    result = torch.load(result_path, weights_only=False)
    assert result["tp_size"] == tp
    assert result["init_equal"], "same seed must give the same full weights at any TP size"
    assert result["logits_rel_err"] < 1e-5
    assert result["loss_rel_err"] < 1e-5
    assert len(result["grad_rel_err"]) == 2 + 6 * CONFIG["n_layers"] + 1  # every parameter compared
    bad = {n: e for n, e in result["grad_rel_err"].items() if not e < 1e-5}
    assert not bad, f"gradients differ from TP=1: {bad}"
    assert result["ln_grads_equal_across_tp"], "residual dropout must be identical on all TP ranks"
    assert result["tp_stream_differs"], "attention dropout must use a different stream per TP rank"
    assert result["default_stream_equal"]
