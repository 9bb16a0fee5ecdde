"""Shared test helpers: plain functions and constants, no fixtures (those live in tests/conftest.py).

Test modules import from here (``from helpers import ...``; pyproject's ``pythonpath = ["tests"]``), never
from one another or from a conftest. Sections: paths and processes; synthetic shards; the trainer in a
subprocess; gal-prepare; released-checkpoint stand-ins; a synthetic gal-report run; the local Slurm cluster.

Heavy or moving project modules (Hydra, pretrain.prepare, pretrain.trainer) are imported inside the
functions that need them, so that importing this module (every conftest load) stays cheap.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO.parent / "shared" / "corpus"
BIN = Path(sys.executable).parent  # this interpreter's bin/: the console scripts (gal-train, wandb, ...) of its env

# The marks of the test being set up or run (tests/conftest.py sets them; None outside pytest). train() and
# torchrun() check them, so that a test which starts the trainer or several ranks says so and
# `make test-fast` (-m "not slow and not multirank and not slurm and not trainer") stays the unit tier.
current_marks: set[str] | None = None


def require_marks(what: str, *names: str) -> None:
    """Fail the current test unless it carries every mark in ``names`` (pyproject.toml's markers)."""
    missing = [n for n in names if current_marks is not None and n not in current_marks]
    if missing:
        pytest.fail(f"{what}: mark the test (or its module) {', '.join('@pytest.mark.' + n for n in missing)}")


# ----------------------------------------------------------------------------- paths and processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: str | Path, *args: str, timeout: float = 600, env: dict | None = None):
    """Run `script` under torchrun with `nproc` CPU processes (gloo); fail the test with its output."""
    if nproc > 1:
        require_marks(f"torchrun with {nproc} processes", "multirank")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script), *args]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    return proc


# ----------------------------------------------------------------------------- synthetic shards
def synthetic_shards(root: Path, seq_len: int, n_samples: int | dict[str, int], samples_per_shard: int = 16,
                     vocab: int = 256, pad_last: int = 0, manifest: dict | None = None,
                     valid: dict[str, int] | None = None) -> Path:
    """``n_samples`` learnable token ramps (ids 4..253) in real shards (the real ShardWriter) under
    ``root/train/syn/`` (or ``{source: samples}`` under ``root/train/<source>/``), and
    ``root/manifest.json``: enough for the trainer when no tokenizer is needed.

    ``pad_last``: that many pad tokens (id 1) at the tail of each source's last sample, in its metadata.
    ``valid``: ``{source: samples}`` held out under ``root/valid/<source>/`` (the same kind of ramps).
    ``manifest``: more manifest keys (e.g. a tokenizer), over ``{"vocab_size": vocab, "pad_id": 1}``."""
    from pretrain.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    splits = [("train", n_samples if isinstance(n_samples, dict) else {"syn": n_samples}), ("valid", valid or {})]
    for split, source, n in ((split, source, n) for split, sizes in splits for source, n in sizes.items()):
        w = ShardWriter(root / split / source, seq_len + 1, np.uint16, samples_per_shard=samples_per_shard)
        for i in range(n):
            toks = (rng.integers(4, 100) + np.arange(seq_len + 1) * (i % 5 + 1)) % 250 + 4
            pad = pad_last if i == n - 1 else 0
            if pad:
                toks[-pad:] = 1
            w.write(toks.astype(np.uint16), {"doc_ids": [f"{source}{i}"], "sources": [source], "doc_starts": [0],
                                             "pad_tokens": pad})
        w.close()
    (root / "manifest.json").write_text(json.dumps({"vocab_size": vocab, "pad_id": 1, **(manifest or {})}))
    return root


# ----------------------------------------------------------------------------- the trainer in a subprocess
# 4 samples of 32 tokens (128 tokens) a step; the tiny-2l model; dropout on, to test RNG restore.
# fp32: the suite's trainer tests compare losses, logits and gradients with fp32 references (transformers, other
# layouts) at 1e-5; the tests of the bf16 path add deepspeed.precision=bf16 (the later override wins), and
# make train's test runs deepspeed.precision=auto (bf16 on a CPU with native bf16 matmul)
TRAIN_COMMON = ["model=tiny-2l", "trainer.global_batch_tokens=128", "optim.warmup_tokens=256",
                "model.dropout=0.1", "model.attention_dropout=0.1", "logger.console=true", "data.prefetch=2",
                "deepspeed.precision=fp32"]


def train_command(nproc: int, run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    """`python -m pretrain.train` (1 process) or under torchrun, with TRAIN_COMMON and ``overrides``."""
    args = [f"data.path={shards}", f"run_dir={run_dir}", *TRAIN_COMMON, *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "pretrain.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", "-m", "pretrain.train", *args]


def train_env() -> dict:
    """The trainer's environment: one thread per rank, the repo importable, wandb offline and silent (no key,
    and no ``wandb login`` of the person running the tests: an empty NETRC; logger.mode=auto then means offline)."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_SILENT": "true", "NETRC": os.devnull}
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        e.pop(key, None)
    return e


def train(nproc, run_dir, shards, *overrides, expect=0, extra_env=None):
    """Run the trainer to its end; fail the test with its output unless it exits with ``expect``."""
    require_marks("the trainer", "trainer", *(["multirank"] if nproc > 1 else []))
    proc = subprocess.run(train_command(nproc, run_dir, shards, *overrides), capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**train_env(), **(extra_env or {})})
    if proc.returncode != expect:
        pytest.fail(f"exit {proc.returncode}, expected {expect}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def wandb_records(run_file: Path) -> list[dict]:
    """The records of an offline wandb run file, read back with wandb's own reader (`wandb leet inspect`)."""
    out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(run_file)],
                         capture_output=True, text=True, timeout=120, env=train_env())
    assert out.returncode == 0, out.stderr
    assert "WANDB_API_KEY" not in out.stdout and "api_key" not in out.stdout.lower()
    return [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows (one per wandb.log call) of an offline wandb run file."""
    return [r["history"]["item"] for r in wandb_records(run_file) if r["type"] == "history"]


def steps(run_dir: Path) -> list[dict]:
    """The step rows of ``run_dir/metrics.jsonl``."""
    from pretrain.analysis.records import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "event" not in r]


def events(run_dir: Path, name: str) -> list[dict]:
    """The ``name`` event rows of ``run_dir/metrics.jsonl``."""
    from pretrain.analysis.records import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == name]


def cli_error(capsys, main, argv: list[str]) -> str:
    """Run a gal-* ``main(argv)`` that must fail as a usage error (exit 2); returns what it wrote to stderr."""
    import pytest

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def train_cfg(*overrides: str):
    """conf/config.yaml with the tiny-2l model and command-line style overrides, as gal-train sees it
    (a TrainConfig)."""
    from hydra import compose, initialize_config_dir

    from pretrain.config import CONF_DIR, register, typed

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return typed(compose("config", overrides=["model=tiny-2l", "run_dir=unused", *overrides]))


# ----------------------------------------------------------------------------- gal-prepare
def make_cfg(*overrides: str):
    """conf/prepare.yaml with command-line style overrides, as gal-prepare would see it (a PrepareConf)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import pretrain.prepare  # noqa: F401  (registers the config schema)

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("prepare", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """The real gal-prepare (``python -m pretrain.prepare``) in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pretrain.prepare", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"gal-prepare {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def subset(src: Path, dst: Path, lines: int) -> Path:
    """The first `lines` lines of a JSONL file."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        for _, line in zip(range(lines), f):
            out.write(line)
    return dst


def write_jsonl(path: Path, records: list) -> Path:
    """Records (dicts as JSON lines; bytes verbatim) to ``path``."""
    with open(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n")
    return path


# ----------------------------------------------------------------------------- released-checkpoint stand-ins
# The architecture variants of released OPT / Galactica checkpoints (HF OPTConfig fields), as tiny random models.
OPT_VARIANTS = {
    "bias_affine": dict(enable_bias=True, layer_norm_elementwise_affine=True, activation_function="gelu"),  # 125M-6.7B
    "bias_no_affine": dict(enable_bias=True, layer_norm_elementwise_affine=False, activation_function="gelu"),
    "no_bias_affine": dict(enable_bias=False, layer_norm_elementwise_affine=True, activation_function="gelu"),
    "no_bias_no_affine": dict(enable_bias=False, layer_norm_elementwise_affine=False,
                              activation_function="gelu"),  # Galactica 30B: no biases, no LayerNorm parameters
    "opt_relu": dict(enable_bias=True, layer_norm_elementwise_affine=True, activation_function="relu"),  # OPT
}


def galai_escape(text: str) -> str:
    """galai's escaping, transcribed from paperswithcode/galai galai/utils.py (`escape_custom_split_sequence`):
    the split marker before every character of a SMILES / amino / DNA span and before its end marker. The
    reference for pretrain.tokenizer.escape_spans (the code under test)."""
    from pretrain.tokenizer import SPLIT_MARKER

    def insert(m: re.Match) -> str:
        start, _, sequence, end = m.groups()
        return start + re.sub(r"(.)", rf"{SPLIT_MARKER}\1", sequence, flags=re.DOTALL) + SPLIT_MARKER + end
    return re.sub(r"(\[START_(DNA|SMILES|I_SMILES|AMINO)])(.*?)(\[END_\2])", insert, text)


def tiny_opt(path: Path, variant: str, vocab_size: int = 96, max_positions: int = 64, seed: int = 0):
    """A tiny ``OPTForCausalLM`` of ``variant`` saved with transformers at ``path``; every parameter drawn at
    random (LayerNorm weights around 1), so that a lost or misplaced bias or scale shows in the logits.
    Returns the model (eval mode, dropout 0)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                       max_position_embeddings=max_positions, word_embed_proj_dim=32, do_layer_norm_before=True,
                       dropout=0.0, attention_dropout=0.0, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                       **OPT_VARIANTS[variant])
    model = OPTForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "layer_norm.weight" in name else 0.0))
        model.model.decoder.embed_positions.weight[:2] = 0  # OPT's offset rows: no real token reads them
    model.save_pretrained(path)
    return model.eval()


# ----------------------------------------------------------------------------- a synthetic gal-report run
REPORT_EPOCH = 4096 * 250  # training tokens per epoch (unique tokens) of write_run's run
REPORT_SEQ = 4096  # tokens per step


def held_out(epoch: float) -> float:
    """write_run's held-out curve: falls in epoch 1; in epochs 2 and 3 a bump of 0.15 peaking at half the
    epoch, then a fall."""
    base = 3.0 - 0.4 * min(epoch, 1.0) - 0.1 * max(epoch - 1, 0)
    u = epoch % 1
    return base + (0.15 * math.exp(-((u - 0.5) / 0.1) ** 2) if epoch > 1 and 0 < u < 1 else 0.0)


def write_run(run_dir, epochs: int = 3, rounds_per_epoch: int = 30) -> list[dict]:
    """A synthetic ``epochs``-epoch metrics.jsonl in the training loop's row format; its rows."""
    rng = np.random.default_rng(0)
    rows = [{"event": "start", "step": 0, "tokens_seen": 0, "params": 1000}]
    steps_per_epoch = REPORT_EPOCH // REPORT_SEQ
    round_every = steps_per_epoch // rounds_per_epoch
    for step in range(1, epochs * steps_per_epoch + 1):
        tokens = step * REPORT_SEQ
        epoch = tokens / REPORT_EPOCH
        rows.append({"step": step, "tokens_seen": tokens, "epoch": epoch,
                     "unique_tokens_seen": min(tokens, REPORT_EPOCH), "repeat": float(math.floor(epoch - 1e-9)),
                     "loss": 3.2 - 0.5 * min(epoch, 1) - 0.3 * max(epoch - 1, 0) + rng.normal(0, 0.05),
                     "lr": 1e-3})
        boundary = tokens % REPORT_EPOCH == 0
        if boundary:
            rows.append({"event": "epoch_end", "step": step, "tokens_seen": tokens, "epoch": round(epoch),
                         "loss": rows[-1]["loss"]})
        if boundary or step % round_every == 0:
            agg = held_out(epoch) + rng.normal(0, 0.005)
            seen = 2.9 - 0.45 * epoch + rng.normal(0, 0.005)
            losses = {"arxiv": agg + 0.1, "pubchem": agg - 0.2, "aggregate": agg, "seen": seen}
            rows.append({"event": "validation", "step": step, "tokens_seen": tokens, "epoch": epoch,
                         "repeat": math.floor(epoch), "reason": "epoch_boundary" if boundary else "interval",
                         "losses": losses, "tokens": {"arxiv": 6000, "pubchem": 2000, "aggregate": 8000,
                                                      "seen": 4000}})
    rows.append({"event": "done", "step": epochs * steps_per_epoch, "tokens_seen": epochs * REPORT_EPOCH,
                 "epoch": float(epochs)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


# ----------------------------------------------------------------------------- the local Slurm cluster
# A real Slurm cluster for the tests: a controller and two emulated nodes (node1, node2) on 127.0.0.1.
# The session fixture ``slurm_cluster`` (tests/conftest.py) reuses a cluster that already answers at
# ``$SLURM_CI_DIR`` (default /tmp/slurm-ci) and leaves it running; otherwise it starts one with
# tests/slurm/start-slurm.sh (root and Debian's slurmctld/slurmd/slurm-client/munge packages; skipped with
# the reason when they cannot be had) and stops exactly that one at the end with tests/slurm/stop-slurm.sh.
#
#     @pytest.mark.slurm
#     def test_x(slurm_cluster):
#         job = slurm_cluster.sbatch_wait("--nodes=2", "--wrap=srun hostname")
#         assert job.state == "COMPLETED" and job.exit_code == 0
#
# Jobs inherit ``slurm_cluster.env`` (sbatch's default --export=ALL): SLURM_CONF, and a PATH with the
# cluster's ``bin/`` (the ``sacct`` stand-in) and this interpreter's bin directory (BIN) first.
SLURM_SCRIPTS = REPO / "tests" / "slurm"  # start-slurm.sh, stop-slurm.sh, sbatch_wait.sh
SLURM_NODES = ("node1", "node2")
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# sbatch_wait.sh's "not finished yet" states; REQUEUED/PENDING after a requeue are waited through
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
          "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", ""}


@dataclass
class Job:
    id: str
    state: str  # JobState: COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    exit_code: int  # the batch script's exit status
    signal: int  # the signal that ended it, 0 if none
    fields: dict = field(repr=False)  # everything `scontrol show job -o` said, last poll


@dataclass
class SlurmCluster:
    dir: Path
    env: dict  # for clients and jobs: SLURM_CONF, PATH (cluster bin/, then BIN, first)
    nodes: tuple[str, ...] = SLURM_NODES
    started_here: bool = False

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, env: dict | None = None):
        """Run a Slurm client (sbatch, scontrol, ...) with the cluster's environment."""
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**self.env, **(env or {})},
                              cwd=REPO)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        """Submit; the job id. Runs in the repo root (the job's working directory)."""
        out = self.run("sbatch", "--parsable", *args, env=env).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job -o ID` as a dict ({} once the controller forgot it)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "")

    def wait(self, job_id: str, timeout: float = 300, poll_s: float = 0.2) -> Job:
        """Poll every 0.2 s until the job ended (through requeues); as sbatch_wait.sh, but returns a Job.

        A requeued job waits out its BeginTime (``cred_expire``: 10 s in start-slurm.sh). Forcing
        ``StartTime=now`` races the credential's revocation: slurmctld then kills the job ("Job
        credential revoked", exit 1, seen here), so the tests never skip the wait."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            st = fields.get("JobState", "")
            if st not in ACTIVE:
                code, sig = (fields.get("ExitCode", "0:0").split(":") + ["0"])[:2]
                return Job(job_id, st, int(code), int(sig), fields)
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(f"Slurm job {job_id} still {st} after {timeout:.0f} s: {fields}")
            time.sleep(poll_s)

    def sbatch_wait(self, *args: str, timeout: float = 300, env: dict | None = None) -> Job:
        return self.wait(self.sbatch(*args, env=env), timeout=timeout)


def slurm_cluster_env(d: Path) -> dict:
    """The environment of a cluster's clients and jobs: SLURM_CONF, PATH with its bin/ and BIN first."""
    env = dict(os.environ)
    env["SLURM_CONF"] = str(d / "etc" / "slurm.conf")
    env["PATH"] = os.pathsep.join([str(d / "bin"), str(BIN), env.get("PATH", "")])
    # pytest itself might run inside a Slurm job or torchrun: don't leak their variables into the jobs
    for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"] + list(TORCHRUN_VARS):
        env.pop(key, None)
    return env


def slurm_cluster_answers(env: dict) -> bool:
    """Whether a cluster with both nodes answers `sinfo` in this environment."""
    if not Path(env["SLURM_CONF"]).exists() or not shutil.which("sinfo", path=env["PATH"]):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=15,
                             env=env).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return False
    return all(n in out for n in SLURM_NODES)


# ----------------------------------------------------------------------------- gal-prepare at scale
def scale_inputs(root: Path, shared_corpus: Path) -> list[str]:
    """Inputs that make every stage of gal-prepare cut its work into several units: a plain JSONL of 900
    real arXiv abstracts (read in 4 chunks of 0.25 MB, with a few repeats: exact and near copies and a
    paragraph shared by several), the shared molecules (formula probes) and the built-in sample's gzipped
    docstrings (a whole-file chunk)."""
    from pretrain.data.pipeline import builtin_sample_files

    with open(shared_corpus / "arxiv.jsonl") as f:
        papers = [json.loads(line) for _, line in zip(range(900), f)]
    shared = " ".join(papers[0]["text"].split()[:60])
    for k in range(10):
        papers.append(dict(papers[k], id=f"{papers[k]['id']}-copy"))
        papers[100 + k] = dict(papers[100 + k], text=papers[100 + k]["text"] + "\n\n" + shared)
    write_jsonl(root / "papers.jsonl", papers)
    subset(shared_corpus / "molecules.jsonl", root / "molecules.jsonl", 400)
    docstrings = [f for f in builtin_sample_files() if f.name.startswith("docstrings")][0]
    return [str(root / "papers.jsonl"), str(root / "molecules.jsonl"), str(docstrings)]


SCALE_ARGS = ["chunk_mb=0.25", "buckets=5", "shards.seq_len=255", "shards.samples_per_shard=64",
              "tokenizer.vocab_size=1000", "tokenizer.min_sample_docs=300"]


def shard_set_digest(out: Path) -> tuple[dict, dict]:
    """A shard set as (its manifest less timing and output path, {file: sha256} of every other file)."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("timing", None)
    manifest["config"].pop("output", None)
    files = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(out.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    return manifest, files
