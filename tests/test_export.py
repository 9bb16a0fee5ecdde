"""gal-export: a real gal-train checkpoint (ZeRO-3, TP=2) → Hugging Face folder → transformers.

The exported OPTForCausalLM must give the logits of the DeepSpeed engine that loads the same
checkpoint (tests/dist/export_engine_logits.py, TP=2 under torchrun).
"""
from __future__ import annotations

import gzip
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import BIN, REPO, cli_error, events, synthetic_shards, torchrun, train, train_env
from pretrain import export
from pretrain.config import ConfigError
from pretrain.tokenizer import GalacticaTokenizer

# every test needs a 2-rank training run (directly or through the module's zero3_tp2_run)
pytestmark = [pytest.mark.trainer, pytest.mark.multirank, pytest.mark.slow]

SEQ = 32
VOCAB = 512  # the tokenizer's (the manifest's) vocabulary; the model takes it (model.vocab_size=null)
TRAIN = ["trainer.max_tokens=384", "logger.wandb=false", "logger.console=false"]  # 3 steps


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """40 synthetic samples with the real ShardWriter, and a real (tiny) tokenizer where gal-prepare puts it."""
    root = tmp_path_factory.mktemp("shards")
    with gzip.open(REPO / "pretrain" / "data" / "sample" / "docstrings.jsonl.gz", "rt") as f:
        docs = [json.loads(line)["text"] for _, line in zip(range(300), f)]
    tok = GalacticaTokenizer.train(docs, root / "tokenizer", vocab_size=VOCAB, progress=False)
    return synthetic_shards(root, SEQ, 40, samples_per_shard=16, vocab=tok.vocab_size,
                            manifest={"tokenizer": {"model": "tokenizer/tokenizer.model"}})


@pytest.fixture(scope="module")
def zero3_tp2_run(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("zero3_tp2") / "run"
    train(2, run, shards, "deepspeed=zero3", "trainer.tensor_parallel=2", *TRAIN)
    return run


@pytest.mark.multirank
def test_a_bf16_run_exports_its_fp32_master_weights(shards, tmp_path):
    """deepspeed.precision=bf16 (DeepSpeed's bf16 mode on the CPU): the export holds the fp32 master weights,
    and transformers' fp32 logits are the engine's bf16 logits within bf16's rounding."""
    from transformers import OPTForCausalLM

    run = tmp_path / "run"
    train(2, run, shards, "deepspeed=zero2", "deepspeed.precision=bf16", *TRAIN)
    assert events(run, "start")[0]["precision"] == "bf16"
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(input_ids, tmp_path / "inputs.pt")
    torchrun(2, REPO / "tests" / "dist" / "export_engine_logits.py", str(run), str(tmp_path / "inputs.pt"),
             str(tmp_path / "engine_logits.pt"), env={"WANDB_SILENT": "true"})
    engine_logits = torch.load(tmp_path / "engine_logits.pt")
    assert engine_logits.dtype == torch.bfloat16
    proc = gal_export(run, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-4000:]
    full = export.consolidate(run / "checkpoints" / "step00000003")
    assert all(t.dtype == torch.float32 for t in full.values())
    # the master weights are not bf16-representable after 3 AdamW steps: they are fp32, not upcast bf16
    assert any(not torch.equal(t, t.bfloat16().float()) for t in full.values())
    hf = OPTForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(input_ids).logits
    err = (hf_logits - engine_logits.float()).abs().max().item()
    assert err < 0.05 * hf_logits.abs().max().item(), f"bf16 engine logits differ from fp32 HF logits by {err:.3g}"


def gal_export(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The gal-export console script, run from ``cwd`` under the usual umask 022."""
    return subprocess.run([str(BIN / "gal-export"), *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=train_env(), preexec_fn=lambda: os.umask(0o022))


@pytest.mark.multirank
def test_zero3_tp2_export_gives_the_engines_logits_in_transformers(zero3_tp2_run, tmp_path):
    from transformers import AutoTokenizer, OPTForCausalLM

    from model.hf import import_hf

    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.save(input_ids, tmp_path / "inputs.pt")
    torchrun(2, REPO / "tests" / "dist" / "export_engine_logits.py", str(zero3_tp2_run), str(tmp_path / "inputs.pt"),
             str(tmp_path / "engine_logits.pt"), env={"WANDB_SILENT": "true"})
    engine_logits = torch.load(tmp_path / "engine_logits.pt")
    assert engine_logits.shape == (2, 16, VOCAB)

    out = tmp_path / "hf"
    proc = gal_export(zero3_tp2_run, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ZeRO-3, TP 2 × DP 1" in proc.stderr
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "tokenizer.model"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "opt" and config["vocab_size"] == VOCAB and config["num_hidden_layers"] == 2

    hf = OPTForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(input_ids).logits
    err = (hf_logits - engine_logits).abs().max().item()
    assert err < 1e-4, f"HF logits differ from the engine's by {err:.3g}"

    full = export.consolidate(zero3_tp2_run / "checkpoints" / "step00000003")
    imported = import_hf(out).state_dict()
    assert imported.keys() == full.keys()
    assert all(torch.equal(imported[k], full[k]) for k in full)

    tok = AutoTokenizer.from_pretrained(out)
    text = "The Fourier transform of a Gaussian is a Gaussian."
    assert tok(text)["input_ids"] == GalacticaTokenizer.load(out).encode(text)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)


@pytest.mark.multirank
def test_zero2_dp2_consolidation_equals_the_saved_module_weights(shards, tmp_path):
    run = tmp_path / "run"
    train(2, run, shards, "deepspeed=zero2", *TRAIN)
    tag_dir = run / "checkpoints" / "step00000003"
    assert len(list(tag_dir.glob("*_optim_states.pt"))) == 2  # one fp32 partition per DP rank
    full = export.consolidate(tag_dir)
    # fp32 ZeRO-2 keeps the whole updated model (fp32) in the model-states file as well
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    assert full.keys() == module.keys()
    assert all(torch.equal(full[k], module[k]) for k in full)

    # a pickled payload planted in a checkpoint file: refused, never run, by gal-export and by DeepSpeed's
    # ds_to_universal (a resume on another data-parallel size), though both ask torch for weights_only=False
    marker = tmp_path / "payload-ran"
    torch.save({"module": Payload(str(marker))}, tag_dir / "mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError, match=r"step00000003: a checkpoint file holds pickled objects .* refused"):
        export.consolidate(tag_dir)
    proc = subprocess.run([sys.executable, "-m", "pretrain.trainer.to_universal", "--input_folder", str(tag_dir),
                           "--output_folder", str(tmp_path / "universal"), "--num_extract_workers", "1",
                           "--num_merge_workers", "1", "--no_strict"], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=train_env())
    assert proc.returncode != 0 and "Weights only load failed" in proc.stderr
    assert not marker.exists()


class Payload:
    """Unpickling it (torch.load with weights_only=False) would create the marker file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_errors_name_the_path_and_a_missing_tokenizer_is_an_error(zero3_tp2_run, tmp_path, capsys):
    err = cli_error(capsys, export.main, [str(tmp_path / "nope"), str(tmp_path / "out")])
    assert re.search(f"run directory {tmp_path / 'nope'} does not exist", err)
    (tmp_path / "empty").mkdir()
    err = cli_error(capsys, export.main, [str(tmp_path / "empty"), str(tmp_path / "out")])
    assert re.search("no complete checkpoint in .*empty/checkpoints", err)
    err = cli_error(capsys, export.main, [str(zero3_tp2_run), str(tmp_path / "out"), "--tag", "step00000099"])
    assert re.search("step00000099 does not exist; found: step00000003", err)

    out = tmp_path / "model_only"
    err = cli_error(capsys, export.main, [str(zero3_tp2_run), str(out), "--tokenizer", str(tmp_path / "no_tokenizer")])
    assert err.strip().splitlines()[-1] == (f"gal-export: error: no tokenizer at {tmp_path / 'no_tokenizer'}: pass "
                                            "--tokenizer PATH, or --no-tokenizer to export the model alone")
    assert not out.exists()  # checked before anything is written
    export.main([str(zero3_tp2_run), str(out), "--no-tokenizer"])
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()
    assert "tokenizer: none (--no-tokenizer)" in capsys.readouterr().err
    err = cli_error(capsys, export.main, [str(zero3_tp2_run), str(out), "--tag", "step00000003"])
    assert re.search("is not empty", err)


def relative_data_path(run: Path, data_path: str) -> None:
    """Write ``data_path`` into the run's config.yaml, as gal-train recorded it before it made it absolute."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    cfg.data.path = data_path
    OmegaConf.save(cfg, run / "config.yaml")


def test_export_from_another_directory_writes_the_whole_folder_readable_by_others(zero3_tp2_run, shards, tmp_path):
    """A relative data.path (runs before it was recorded absolute) is found from any directory: against the
    directory gal-train ran from (Hydra's record), or above the run directory (runs/NAME in a project).
    The folder is complete and every file is 0644 under umask 022 (safetensors alone writes 0600)."""
    from omegaconf import OmegaConf

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    launched, scratch_run = tmp_path / "launched", tmp_path / "scratch" / "run"  # the run outside the project
    project, project_run = tmp_path / "project", tmp_path / "project" / "runs" / "run"
    for root, run in ((launched, scratch_run), (project, project_run)):
        shutil.copytree(shards, root / "data" / "shards")
        shutil.copytree(zero3_tp2_run, run)
        relative_data_path(run, "data/shards")
    hydra = OmegaConf.load(scratch_run / ".hydra" / "hydra.yaml")
    hydra.hydra.runtime.cwd = str(launched)
    OmegaConf.save(hydra, scratch_run / ".hydra" / "hydra.yaml")
    shutil.rmtree(project_run / ".hydra")  # no record: found above the run directory

    relative_data_path(project_run, "data/elsewhere")
    proc = gal_export(project_run, elsewhere / "lost", cwd=elsewhere)
    assert proc.returncode == 2 and not (elsewhere / "lost").exists()
    assert (f"gal-export: error: data.path=data/elsewhere (from {project_run / 'config.yaml'}): no shards "
            f"(manifest.json) at {elsewhere / 'data/elsewhere'}, ") in proc.stderr and "--no-tokenizer" in proc.stderr
    relative_data_path(project_run, "data/shards")

    for run, root, found in ((scratch_run, launched, "the directory gal-train ran from"),
                             (project_run, project, "an ancestor of the run directory")):
        out = elsewhere / f"hf_{root.name}"
        proc = gal_export(os.path.relpath(run, elsewhere), out.name, cwd=elsewhere)
        assert proc.returncode == 0, proc.stderr[-3000:]
        resolved = f"data.path: {root / 'data' / 'shards'} (relative in config.yaml: resolved against {found}"
        assert resolved in proc.stderr
        names = {p.name for p in out.iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer.model",
                "tokenizer_config.json", "special_tokens_map.json"} <= names
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
        assert set(modes.values()) == {"0o644"}, modes
