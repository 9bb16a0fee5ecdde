"""Continue pretraining a released checkpoint: ``model.init_from=<Hugging Face folder>``.

The folders are tiny random OPTForCausalLM made with transformers in each released architecture variant
(helpers.OPT_VARIANTS). The first step's loss must be transformers' loss on that step's batch; a resume of
such a run is bit-identical; gal-export gives back the same variant with the engine's logits.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO, events, steps, synthetic_shards, tiny_opt, torchrun, train
from pretrain import export
from pretrain.data.shards import TrainSplit

pytestmark = pytest.mark.trainer

SEQ, VOCAB = 32, 256
# 4 samples a step (helpers.TRAIN_COMMON); no dropout, so that the step's loss is transformers' loss
ARGS = ["model.dropout=0", "model.attention_dropout=0", "data.record_sample_ids=true", "logger.wandb=false",
        "checkpoint.interval_tokens=256"]


def write_tokenizer(path: Path, swap: bool = False) -> Path:
    """A tokenizer.json of VOCAB tokens t0..t255 (``swap``: t4 and t5 trade ids)."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(VOCAB)}
    if swap:
        vocab["t4"], vocab["t5"] = 5, 4
    path.parent.mkdir(parents=True, exist_ok=True)
    Tokenizer(models.WordLevel(vocab, unk_token="t3")).save(str(path))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Synthetic shards whose tokenizer (manifest["tokenizer"]["hf"]) is write_tokenizer's."""
    root = synthetic_shards(tmp_path_factory.mktemp("shards"), SEQ, 40, samples_per_shard=16, vocab=VOCAB,
                            manifest={"tokenizer": {"hf": "tokenizer/hf"}})
    write_tokenizer(root / "tokenizer/hf/tokenizer.json")
    return root


@pytest.fixture(scope="module")
def galactica_30b_like(tmp_path_factory) -> tuple[Path, object]:
    """No biases and no LayerNorm parameters, as the released Galactica 30B; the shards' tokenizer."""
    folder = tmp_path_factory.mktemp("hf") / "no_bias_no_affine"
    model = tiny_opt(folder, "no_bias_no_affine", vocab_size=VOCAB)
    write_tokenizer(folder / "tokenizer.json")
    return folder, model


def hf_loss(model, shards: Path, run_dir: Path, step: int) -> float:
    """transformers' mean next-token loss on the samples the run trained on at ``step``."""
    ids = next(r["ids"] for r in map(json.loads, (run_dir / "sample_ids.jsonl").read_text().splitlines())
               if r["step"] == step)
    split = TrainSplit(shards)
    tokens = torch.tensor([split[i].astype("int64") for i in ids])
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).item()


def test_continue_from_a_galactica_30b_like_checkpoint_resume_and_export(galactica_30b_like, shards, tmp_path):
    folder, hf = galactica_30b_like
    straight = tmp_path / "straight"
    train(1, straight, shards, f"model.init_from={folder}", "trainer.max_tokens=512", *ARGS)
    rows = steps(straight)
    assert rows[0]["loss"] == pytest.approx(hf_loss(hf, shards, straight, 1), abs=1e-5)
    assert events(straight, "start")[0]["init_from"] == str(folder)
    saved = (straight / "config.yaml").read_text()
    for line in ("bias: false", "layer_norm_affine: false", "activation: gelu", "d_model: 32", "size: hf:no_bias_no_affine"):
        assert line in saved, line

    # a resume loads the run's checkpoint, not the folder (gone from scratch space by then): the same losses
    resumed, downloaded = tmp_path / "resumed", tmp_path / "downloaded"
    shutil.copytree(folder, downloaded)
    train(1, resumed, shards, f"model.init_from={downloaded}", "trainer.max_tokens=256", *ARGS)
    shutil.rmtree(downloaded)
    train(1, resumed, shards, f"model.init_from={downloaded}", "trainer.max_tokens=512", *ARGS)
    assert [r["loss"] for r in steps(resumed)] == [r["loss"] for r in rows]
    assert events(resumed, "start")[-1]["init_from"] is None and events(resumed, "start")[-1]["resumed"] is True

    # gal-export: the variant comes back, with the engine's logits
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    torchrun(1, REPO / "tests/dist/export_engine_logits.py", str(straight), str(tmp_path / "ids.pt"),
             str(tmp_path / "engine.pt"), env={"WANDB_SILENT": "true"})
    out = export.export(straight, tmp_path / "hf_out", no_tokenizer=True)  # synthetic shards: no tokenizer.model
    config = json.loads((out / "config.json").read_text())
    assert (config["enable_bias"], config["layer_norm_elementwise_affine"]) == (False, False)
    from transformers import OPTForCausalLM

    again = OPTForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (again(ids).logits - torch.load(tmp_path / "engine.pt")).abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["bias_affine", "bias_no_affine", "no_bias_affine"])
def test_the_first_step_of_every_other_variant_is_transformers_loss(variant, shards, tmp_path):
    folder = tmp_path / variant  # (no_bias_no_affine and opt_relu: the tests around this one)
    hf = tiny_opt(folder, variant, vocab_size=VOCAB)
    run = tmp_path / "run"
    train(1, run, shards, f"model.init_from={folder}", "trainer.max_tokens=128", *ARGS)
    assert steps(run)[0]["loss"] == pytest.approx(hf_loss(hf, shards, run, 1), abs=1e-5)


LAYOUTS = {"zero3_dp2": ["deepspeed=zero3"], "tp2_zero1": ["deepspeed=zero1", "trainer.tensor_parallel=2"]}


@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_opt_with_biases_and_relu_loads_under_zero3_and_tp2(layout, shards, tmp_path):
    folder = tmp_path / "opt_relu"
    hf = tiny_opt(folder, "opt_relu", vocab_size=VOCAB)
    run = tmp_path / "run"
    train(2, run, shards, f"model.init_from={folder}", "trainer.max_tokens=256", *ARGS, *LAYOUTS[layout])
    assert steps(run)[0]["loss"] == pytest.approx(hf_loss(hf, shards, run, 1), abs=1e-5)


def test_a_checkpoint_the_model_cannot_represent_is_refused_by_its_field(galactica_30b_like, shards, tmp_path):
    folder, _ = galactica_30b_like
    post_ln = tmp_path / "post_ln"
    post_ln.mkdir()
    config = json.loads((folder / "config.json").read_text())
    (post_ln / "config.json").write_text(json.dumps({**config, "do_layer_norm_before": False}))
    other_tokenizer = tmp_path / "other_tokenizer"
    shutil.copytree(folder, other_tokenizer)
    write_tokenizer(other_tokenizer / "tokenizer.json", swap=True)
    small = tmp_path / "small_vocab"
    tiny_opt(small, "no_bias_no_affine", vocab_size=128)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    cases = {  # overrides → what the one error line says
        f"model.init_from={llama}": f"model.init_from={llama}: {llama / 'config.json'}: model_type='llama': only OPT",
        f"model.init_from={tmp_path / 'nowhere'}": f"model.init_from={tmp_path / 'nowhere'}: ",
        f"model.init_from={post_ln}": f"model.init_from={post_ln}: {post_ln / 'config.json'}: do_layer_norm_before="
                                      "False is not supported",
        "model.vocab_size=512": f"model.vocab_size=512, but model.init_from={folder} has a vocabulary of {VOCAB}",
        f"model.init_from={other_tokenizer}": f"data.path={shards} was tokenized with another vocabulary than "
                                              f"model.init_from={other_tokenizer} (2 of the shards' {VOCAB} tokens",
        f"model.init_from={small}": f"model.init_from={small} has a vocabulary of 128, below the shards' {VOCAB}",
    }
    for override, says in cases.items():
        proc = train(1, tmp_path / "run", shards, f"model.init_from={folder}", "logger.wandb=false", override, expect=2)
        assert proc.stderr.strip().splitlines()[-1].startswith(f"gal-train: error: {says}"), proc.stderr[-2000:]
