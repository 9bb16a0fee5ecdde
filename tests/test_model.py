"""GalacticaLM in one process (TP=1): sizes, causality, loss, checkpointing, config errors."""
import pytest
import torch
import torch.nn.functional as F

from model import GalacticaConfig, GalacticaLM, parallel
from pretrain.config import ConfigError, model_preset

# The paper's Table 5 (arXiv 2211.09085): layers, d_model, heads; conf/model/<size>.yaml must carry them.
PAPER_SIZES = {"125m": (12, 768, 12), "1.3b": (24, 2048, 32), "6.7b": (32, 4096, 32), "30b": (48, 7168, 56),
               "120b": (96, 10240, 80)}

SMALL = dict(n_layers=2, d_model=64, n_heads=4, vocab_size=500, max_positions=64)


def small_model(seed: int = 0, **overrides) -> GalacticaLM:
    torch.manual_seed(seed)
    return GalacticaLM(GalacticaConfig(**{**SMALL, **overrides}))


@pytest.mark.parametrize("name, expected", [("125m", 125e6), ("1.3b", 1.3e9), ("6.7b", 6.7e9),
                                            ("30b", 30e9), ("120b", 120e9)])
def test_paper_sizes_on_meta_device(name, expected):
    config = model_preset(name)
    assert (config.n_layers, config.d_model, config.n_heads) == PAPER_SIZES[name]
    assert (config.dropout, config.attention_dropout, config.max_positions) == (0.1, 0.1, 2048)
    assert config.d_ffn == 4 * config.d_model and config.vocab_size == 50000
    with torch.device("meta"):
        model = GalacticaLM(config)
    assert all(p.is_meta for p in model.parameters())
    assert abs(model.num_parameters() / expected - 1) < 0.05
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "bias" in n]
    assert model.wpe.weight.shape == (2048, config.d_model)
    # 6N + 6 * L * s * d, N without the position table
    n = model.num_parameters() - 2048 * config.d_model
    assert model.flops_per_token(2048) == 6 * n + 6 * config.n_layers * 2048 * config.d_model


def test_no_bias_and_tied_embedding():
    model = small_model()
    assert not [n for n, _ in model.named_parameters() if "bias" in n]
    assert all(not m.bias for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    # tied: the head is the token embedding, so logits of a zero hidden state are zero and the
    # embedding receives the head's gradient even for tokens that never appear in the input
    ids = torch.zeros(1, 8, dtype=torch.long)
    model(ids, torch.full_like(ids, 7)).backward()
    assert model.wte.weight.grad[7].abs().sum() > 0


def test_causality():
    model = small_model().eval()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 32))
    with torch.no_grad():
        base = model(ids)
        for t in (0, 13, 31):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1) % SMALL["vocab_size"]
            out = model(changed)
            assert torch.equal(out[:, :t], base[:, :t]), f"logits before {t} changed"
            assert not torch.allclose(out[:, t:], base[:, t:])


def test_loss_is_mean_over_labels_not_ignored():
    model = small_model().eval()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 16))
    labels = torch.randint(0, SMALL["vocab_size"], (2, 16))
    labels[0, :6] = -100
    labels[1, -3:] = -100
    with torch.no_grad():
        logits = model(ids)
        loss = model(ids, labels)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert model(ids, torch.full_like(labels, -100)).item() == 0.0


def test_activation_checkpointing_gives_identical_loss_and_grads_with_dropout():
    results = []
    for checkpointing in (False, True):
        model = small_model(dropout=0.2, attention_dropout=0.2, activation_checkpointing=checkpointing).train()
        parallel.manual_seed(123)
        ids = torch.randint(0, SMALL["vocab_size"], (2, 16))
        loss = model(ids, ids)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_dropout_is_active_in_training_only():
    model = small_model(dropout=0.1, attention_dropout=0.1)
    ids = torch.randint(0, SMALL["vocab_size"], (1, 16))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_sequence_longer_than_positions_is_refused():
    with pytest.raises(ValueError, match="max_positions"):
        small_model()(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("overrides, field", [
    (dict(d_model=100, n_heads=3), "n_heads"),
    (dict(n_layers=0), "n_layers"),
    (dict(dropout=1.5), "dropout"),
    (dict(attention_dropout=-0.1), "attention_dropout"),
    (dict(init_std=0.0), "init_std"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"GalacticaConfig\.{field}"):
        GalacticaConfig(**{**SMALL, **overrides})


def test_model_preset_errors():
    with pytest.raises(ConfigError, match="unknown; choose one of .*125m"):
        model_preset("7b")
    with pytest.raises(TypeError, match="n_layer"):
        model_preset("tiny", n_layer=3)
    assert model_preset("tiny", vocab_size=1000).vocab_size == 1000
    with pytest.raises(ValueError, match="vocab_size=50001 is not divisible"):
        model_preset("tiny", vocab_size=50001).validate_tensor_parallel(2)


def test_output_init_is_scaled():
    config = model_preset("tiny", init_std=0.02)
    assert config.output_init_std == pytest.approx(0.02 / (2 * config.n_layers) ** 0.5)
    model = small_model(init_std=0.02, n_layers=8, d_model=256, n_heads=4)
    proj_std = model.blocks[0].attn.proj.weight.std().item()
    qkv_std = model.blocks[0].attn.qkv.weight.std().item()
    assert proj_std == pytest.approx(0.02 / 4, rel=0.05)
    assert qkv_std == pytest.approx(0.02, rel=0.05)


def test_deepspeed_mpu_adapter_single_process():
    parallel.ensure_initialized()
    mpu = parallel.DeepSpeedMPU()
    assert (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()) == (0, 1)
    assert (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()) == (0, 1)
    assert mpu.get_model_parallel_group() is parallel.tp_group()
    assert mpu.get_data_parallel_group() is parallel.dp_group()
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        parallel.init_distributed(tensor_parallel_size=2)
