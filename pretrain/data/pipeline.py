"""gal-prepare's pipeline on datatrove: JSONL → clean → markup → exact, near and span dedup → split →
tokenizer → packed shards + index → manifest, run by datatrove's local or Slurm executor.

The stages are in pretrain/data/stages.py; this module plans them, runs them and writes the manifest.
The plan (plan.json in the work directory `.<output>.work/` beside the output) fixes the units of work
before any task runs: input chunks of `chunk_mb` and document buckets of about `bucket_mb`, from the
input's size alone, so the output does not depend on `tasks` or on the executor. Every stage is one
datatrove executor whose tasks take units[rank::tasks]; datatrove records finished tasks
(logs/<stage>-<tasks>/completions/), so the same command after a kill or a failed job reruns only what
did not finish. `executor=local` runs the stages one after another on this machine (`workers`
processes); `executor=slurm` submits one job array per stage, each depending on the one before
(afterok), with the slurm.* knobs, and (slurm.wait) waits for the last. The finish stage writes the
manifest and renames the finished shard set onto the output, so no manifest ever claims incomplete
shards.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import PAPER_VOCAB_SIZE, SAMPLE_VOCAB_SIZE, ConfigError, PrepareConf, validate
from .read import BadInput, expand_inputs
from .stages import (SPLITS, Cluster, Cut, Filter, OneTask, Pack, Pairs, Plan, Read, Sort, Spans, Stage, Tokenize,
                     Tokenizer, counter_dict, gather, given_tokenizer, read_jsonl, tokenizer_info, write_atomic)

SAMPLE_DIR = Path(__file__).parent / "sample"
FORMAT_VERSION = "galactica-shards-v2"  # v2: train/<source>/ (v1: one train/ for all sources)
COMPRESSED_RATIO = 4  # a .gz/.zst file's text is about this many times its size (for the bucket count)


def builtin_sample_files() -> list[Path]:
    return sorted(SAMPLE_DIR.glob("*.jsonl.gz"))


# ----------------------------------------------------------------------------- the plan
def make_plan(cfg: PrepareConf, files: list[Path], out: Path, builtin: bool, vocab_size: int) -> Plan:
    chunk = max(1, int(cfg.chunk_mb * 2**20))
    chunks, text_bytes = [], 0
    for i, f in enumerate(files):
        size = f.stat().st_size
        if f.suffix in (".gz", ".zst") or cfg.max_docs_per_file:
            chunks.append((i, 0, None))  # read whole: compressed, or only its first lines
            text_bytes += size * (COMPRESSED_RATIO if f.suffix in (".gz", ".zst") else 1)
        else:
            chunks += [(i, s, min(s + chunk, size)) for s in range(0, max(size, 1), chunk)]
            text_bytes += size
    buckets = cfg.buckets or max(1, math.ceil(text_bytes / (cfg.bucket_mb * 2**20)))
    return Plan(cfg=cfg, work=str(out.parent / f".{out.name}.work"), output=str(out),
                files=[str(f) for f in files], chunks=chunks, buckets=buckets, sources=list(cfg.corpus),
                vocab_size=vocab_size, builtin=builtin,
                extra={"inputs": [{"path": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
                                  for f in files]})


def plan_identity(plan: Plan) -> str:
    """What decides the output: the plan less how it is run (executor, tasks, workers, slurm knobs)."""
    from omegaconf import OmegaConf
    d = asdict(plan)
    d["cfg"] = OmegaConf.to_container(OmegaConf.structured(plan.cfg))
    for key in ("executor", "tasks", "workers", "slurm", "overwrite"):
        d["cfg"].pop(key, None)
    return json.dumps(d, sort_keys=True, default=str)


STAGES: list[type[Stage]] = [Read, Sort, Pairs, Cluster, Filter, Spans, Cut, Tokenizer, Tokenize, Pack]


def stage_name(stage: type[Stage]) -> str:
    return stage.__name__.lower()


# ----------------------------------------------------------------------------- running
def prepare(cfg: PrepareConf, progress: bool = True) -> dict[str, Any]:
    """Run the whole pipeline; returns the manifest (also written to OUTPUT/manifest.json). With
    executor=slurm and slurm.wait=false, returns {"submitted": job ids, "work": work directory}."""
    validate(cfg)
    out = Path(cfg.output).expanduser().resolve()
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"output={out} already exists: pass overwrite=true to replace it")
    if out.exists() and not (out / "manifest.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output={out} is not a gal-prepare shard set (no manifest.json): overwrite=true "
                              "replaces shard sets only; choose another output or remove it yourself")
    _check_writable(out)
    builtin = cfg.input is None
    files = builtin_sample_files() if builtin else expand_inputs(cfg.input)
    if not files:
        raise FileNotFoundError(f"input=null but the built-in sample is missing from {SAMPLE_DIR} "
                                "(run python -m pretrain.data.make_sample)")
    given_tokenizer(cfg)  # a bad tokenizer.path / tokenizer.from_hf fails before any work
    vocab_size = cfg.tokenizer.vocab_size or (SAMPLE_VOCAB_SIZE if builtin else PAPER_VOCAB_SIZE)
    plan = make_plan(cfg, files, out, builtin, vocab_size)
    work = Path(plan.work)
    identity = plan_identity(plan)
    resumable = (work / "plan.json").is_file() and not (work / "done").exists() and \
        (work / "plan.json").read_text() == identity
    if not resumable:
        shutil.rmtree(work, ignore_errors=True)
        write_atomic(work / "plan.json", identity)
    elif progress:
        print(f"gal-prepare: resuming the unfinished run in {work} (finished tasks are skipped)", file=sys.stderr)
    if cfg.executor == "slurm":
        return _run_slurm(plan, cfg, progress)
    try:
        timing = _run_local(plan, cfg, progress)
    except (BadInput, ConfigError):  # the input or the config must change first: nothing to resume
        shutil.rmtree(work, ignore_errors=True)
        raise
    manifest = json.loads((out / "manifest.json").read_text())
    timing["input_mb_per_s"] = round(manifest["input"]["bytes"] / 1e6 / timing["total_s"], 3)
    manifest["timing"] = timing
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))
    shutil.rmtree(work, ignore_errors=True)
    manifest["output"] = str(out)
    return manifest


def _stages(plan: Plan) -> list[Stage]:
    return [s for s in (cls(plan) for cls in STAGES) if s.units()] + [Finish(plan)]


def _tasks(wanted: int, units: int) -> int:
    """A stage's task count: `wanted` (0: one per unit), never more than its units."""
    return max(1, min(wanted or units, units))


def _cache_loguru_lib_dirs() -> None:
    """loguru looks up the interpreter's library directories (sysconfig, ~8 ms) for every handler added, and
    datatrove adds three per task (3 s of a 60 s run on the shared corpus); they do not change while gal-prepare
    runs, so they are looked up once. (A private loguru method: if it goes away, nothing is cached.)"""
    from loguru import _better_exceptions
    formatter = _better_exceptions.ExceptionFormatter
    lookup = getattr(formatter, "_get_lib_dirs", None)
    if lookup is not None and not hasattr(lookup, "cache_info"):
        formatter._get_lib_dirs = staticmethod(functools.cache(lookup))


def _run_local(plan: Plan, cfg: PrepareConf, progress: bool) -> dict[str, float]:
    from datatrove.executor import LocalPipelineExecutor
    from loguru import logger
    _cache_loguru_lib_dirs()
    workers = cfg.workers or os.cpu_count() or 1
    console = Path(plan.work, "logs", "datatrove.log")
    console.parent.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    for stage in _stages(plan):
        name = type(stage).__name__.lower()
        tasks = _tasks(cfg.tasks, len(stage.units()))  # default: a task per unit, `workers` at a time
        t = time.perf_counter()
        for module in stage.imports:  # before the workers fork: one copy for all of them
            importlib.import_module(module)
        if progress:
            print(f"gal-prepare: {stage.name} ({len(stage.units())} units, {tasks} tasks) ...", end="",
                  file=sys.stderr, flush=True)
        # datatrove's console log goes to a file (its loguru handlers: the parent's, and each task's, which
        # datatrove adds on sys.stderr); each task's own log is in logs/<stage>-<tasks>/logs/
        with open(console, "a") as log, contextlib.redirect_stderr(log):
            logger.remove()
            logger.add(log, level="INFO")
            try:
                LocalPipelineExecutor([stage], tasks=tasks, workers=min(workers, tasks), start_method="fork",
                                      logging_dir=str(Path(plan.work, "logs", f"{name}-{tasks}"))).run()
            finally:
                logger.remove()
                logger.add(sys.stderr, level="WARNING")
        timing[f"{name}_s"] = round(time.perf_counter() - t, 3)
        if progress:
            print(f" {timing[f'{name}_s']:.1f} s", file=sys.stderr)
    timing["total_s"] = round(time.perf_counter() - t0, 3)
    return timing


def _slurm_executor_class():
    from datatrove.executor import SlurmPipelineExecutor
    from datatrove.executor.slurm import launch_slurm_job

    class SlurmExecutor(SlurmPipelineExecutor):
        """datatrove's, with its stats-merging job asking for slurm.mem_per_cpu (datatrove asks 1G)."""

        def launch_merge_stats(self):
            launch_slurm_job(self.get_launch_file_contents(
                {**self.get_sbatch_args(), "cpus-per-task": 1, "dependency": f"afterok:{self.job_id}"},
                f"merge_stats {self.logging_dir.resolve_paths('stats')} "
                f"-o {self.logging_dir.resolve_paths('stats.json')}"), self.job_id_retriever)

    return SlurmExecutor


def _run_slurm(plan: Plan, cfg: PrepareConf, progress: bool) -> dict[str, Any]:
    s = cfg.slurm
    record = Path(plan.work, "jobs.json")  # the jobs of the last submission: never submit a stage twice at once
    jobs = json.loads(record.read_text()) if record.exists() else []
    if _queued(jobs):
        if progress:
            print(f"gal-prepare: the jobs submitted before are still queued or running ({', '.join(jobs)}); "
                  "waiting for them, not submitting again", file=sys.stderr)
    else:
        jobs = _submit(plan, cfg)
        write_atomic(record, json.dumps(jobs))
        if progress:
            print(f"gal-prepare: submitted {len(jobs)} Slurm jobs ({', '.join(jobs)}); logs in {plan.work}/logs/",
                  file=sys.stderr)
    if not s.wait:
        return {"submitted": jobs, "work": plan.work}
    _wait_for_slurm(plan, jobs, s.poll_s)
    manifest = json.loads(Path(plan.output, "manifest.json").read_text())
    manifest["output"] = plan.output
    return manifest


def _queued(jobs: list[str]) -> bool:
    """Whether any of these Slurm jobs is still pending or running."""
    if not jobs:
        return False
    return bool(subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(jobs)], capture_output=True,
                               text=True).stdout.strip())


def _submit(plan: Plan, cfg: PrepareConf) -> list[str]:
    """A job array per unfinished stage, each depending on the one before; their job ids."""
    SlurmPipelineExecutor = _slurm_executor_class()
    s = cfg.slurm
    env_command = s.env_command or f"export PATH={Path(sys.executable).parent}:$PATH"
    previous, executors = None, []
    for stage in _stages(plan):
        name = type(stage).__name__.lower()
        tasks = _tasks(cfg.tasks, len(stage.units()))
        sbatch_args = {"mem-per-cpu": s.mem_per_cpu, **({"account": s.account} if s.account else {})}
        previous = SlurmPipelineExecutor(
            [stage], tasks=tasks, time=s.time, partition=s.partition, cpus_per_task=s.cpus_per_task,
            job_name=f"gal-prepare-{name}", qos=s.qos or "", env_command=env_command, sbatch_args=sbatch_args,
            logging_dir=str(Path(plan.work, "logs", f"{name}-{tasks}")), depends=previous, mail_type="NONE")
        executors.append(previous)
    try:
        previous.run()  # submits the whole chain, dependencies first; finished stages are not resubmitted
    except subprocess.CalledProcessError as e:
        raise ConfigError(f"executor=slurm: sbatch refused a job ({e}; its message is above); check slurm.partition, "
                          "slurm.account, slurm.qos, slurm.mem_per_cpu, slurm.cpus_per_task and slurm.time") from None
    return [str(e.job_id) for e in executors if e.job_id not in (None, -1)]


def _wait_for_slurm(plan: Plan, jobs: list[str], poll_s: float) -> None:
    """Until the finish stage has put the output in place; a job that failed (its dependants can then never
    start) cancels the rest and raises, naming the logs."""
    done = Path(plan.work, "done")
    while not done.exists():
        if jobs:
            queue = subprocess.run(["squeue", "-h", "-o", "%i %r", "-j", ",".join(jobs)], capture_output=True,
                                   text=True).stdout
            never = "DependencyNeverSatisfied" in queue
            if never or not queue.strip():
                time.sleep(poll_s)
                if done.exists():
                    return
                if never:
                    subprocess.run(["scancel", *jobs], capture_output=True)
                raise RuntimeError(f"gal-prepare's Slurm jobs ended before the shards were finished (a task failed): "
                                   f"see {plan.work}/logs/*/slurm_logs/ and logs/*/logs/; run the same command again "
                                   "to resume")
        time.sleep(poll_s)


def _check_writable(out: Path) -> None:
    """The output's parent must be a directory this process can write (it is created when missing)."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"output={out}: {parent} is a file, not a directory; choose another output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output={out}: {parent} is not writable by this user; choose another output")


# ----------------------------------------------------------------------------- the manifest
class Finish(OneTask):
    name = "finish: manifest, output in place"

    def do(self, unit) -> None:
        p = self.plan
        g = gather(p)
        splits = {}
        for name in p.pack_units():
            info = json.loads(p.path("stats", "pack", name.replace("/", "__") + ".json").read_text())
            if info is not None:
                splits[name] = info
                split, source = name.split("/")
                g["counts"][source][split]["tokens"] += info["tokens"]
        out, output = p.path("out"), Path(p.output)
        if not out.exists() and (output / "manifest.json").exists():  # killed after the rename
            write_atomic(p.path("done"), "")
            return
        _write_probes(p, out / "probes")
        manifest = _manifest(p, g, splits, tokenizer_info(p))
        write_atomic(out / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))
        if output.exists():  # overwrite=true: swap, then delete the old one
            old = output.parent / f".{output.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(output, old)
            os.rename(out, output)
            shutil.rmtree(old)
        else:
            os.rename(out, output)
        write_atomic(p.path("done"), "")
        for child in Path(p.work).iterdir():  # the logs stay until gal-prepare (local) removes the work directory
            if child.is_dir() and child.name != "logs":
                shutil.rmtree(child)


def _write_probes(plan: Plan, directory: Path) -> None:
    """probes/<source>.jsonl from every bucket's probe records, buckets in order."""
    shutil.rmtree(directory, ignore_errors=True)
    files: dict[str, Any] = {}
    try:
        for b in range(plan.buckets):
            for record in read_jsonl(plan.path("probes", f"{b:05d}.jsonl")):
                source = record.pop("source")
                if source not in files:
                    directory.mkdir(parents=True, exist_ok=True)
                    files[source] = open(directory / f"{source}.jsonl", "w")
                files[source].write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        for f in files.values():
            f.close()


def _manifest(plan: Plan, g: dict[str, Any], splits: dict[str, dict], tok: dict) -> dict[str, Any]:
    from omegaconf import OmegaConf
    cfg = plan.cfg
    given = cfg.tokenizer.from_hf or cfg.tokenizer.path
    sources = {s: {split: dict(c) for split, c in v.items()} for s, v in sorted(g["counts"].items())}
    config = OmegaConf.to_container(OmegaConf.structured(cfg))
    for key in ("executor", "tasks", "workers", "slurm"):  # how it ran, not what it made
        config.pop(key, None)
    return {
        "format": FORMAT_VERSION,
        "seq_len": cfg.shards.seq_len,
        "sample_len": cfg.shards.seq_len + 1,
        "dtype": next(iter(splits.values()))["dtype"],
        "vocab_size": tok["vocab_size"],
        "pad_id": tok["pad_id"],
        "eos_id": tok["eos_id"],
        # the tokenizer: kind "sentencepiece" (ours) or "hf" (tokenizer.from_hf); "model" its file (the bytes
        # sha256 hashes; pretrain.tokenizer.load_tokenizer reads either), "hf" an AutoTokenizer folder
        "tokenizer": {"kind": tok["kind"], "sha256": tok["sha256"], "model": f"tokenizer/{tok['file']}",
                      "hf": "tokenizer/hf" if tok["kind"] == "sentencepiece" else "tokenizer",
                      "vocab_size": tok["vocab_size"], "special_ids": tok["special_ids"],
                      "trained_on_documents": tok["trained_on_documents"], "from": given or "trained"},
        "inputs": [{"path": f["path"], "bytes": f["bytes"]} for f in plan.extra["inputs"]],
        "input": {"lines": g["lines"], "bytes": g["bytes"]},
        "sources": sources,
        "splits": {name: {"dir": name, "samples": s["num_samples"], "pad_tokens": s["pad_tokens"],
                          "tokens": s["num_samples"] * s["sample_len"] - s["pad_tokens"],
                          "shards": s["shards"]} for name, s in splits.items()},
        "totals": {split: {k: sum(v[split][k] for v in g["counts"].values()) for k in ("documents", "tokens", "chars")}
                   for split in SPLITS},
        "errors": dict(sorted(g["errors"].items())),
        "errors_by_file": {f: dict(sorted(c.items())) for f, c in sorted(g["errors_by_file"].items())},
        "bad_lines": g["bad_lines"],
        "drops": dict(sorted(g["drops"].items())),
        "drops_by_source": counter_dict(g["drops_by_source"]),
        "dedup": {r: n for r, n in sorted(g["drops"].items()) if "duplicate" in r},
        # Galactica's span dedup: bytes of repeated paragraphs cut, per source
        "span_dedup": {"min_bytes": cfg.dedup.span_min_bytes, "bytes_removed": dict(sorted(g["span_bytes_removed"].items()))},
        # held-out records of sources with a formula: prompt, SMILES and gold formula (pretrain/evaluation/probes.py)
        "probes": {s: {"path": f"probes/{s}.jsonl", "records": n} for s, n in sorted(g["probes"].items())},
        "units": {"chunks": len(plan.chunks), "buckets": plan.buckets},
        "config": config,
    }


def summary_table(manifest: dict[str, Any]):
    """A rich table: documents and tokens per source and split, drops, samples, speed."""
    from rich.table import Table
    table = Table(title=f"gal-prepare → {manifest.get('output', '')}")
    for col in ("source", "train docs", "valid docs", "train tokens", "valid tokens", "dropped", "span bytes cut"):
        table.add_column(col, justify="left" if col == "source" else "right")
    cut = manifest["span_dedup"]["bytes_removed"]
    for source, c in manifest["sources"].items():
        dropped = sum(manifest["drops_by_source"].get(source, {}).values())
        table.add_row(source, f"{c['train'].get('documents', 0):,}", f"{c['valid'].get('documents', 0):,}",
                      f"{c['train'].get('tokens', 0):,}", f"{c['valid'].get('tokens', 0):,}", f"{dropped:,}",
                      f"{cut.get(source, 0):,}")
    t = manifest["totals"]
    table.add_row("[bold]total", f"{t['train']['documents']:,}", f"{t['valid']['documents']:,}",
                  f"{t['train']['tokens']:,}", f"{t['valid']['tokens']:,}",
                  f"{sum(manifest['drops'].values()):,}", f"{sum(cut.values()):,}", end_section=True)
    splits = ", ".join(f"{name}: {s['samples']:,} samples in {len(s['shards'])} shards"
                       for name, s in manifest["splits"].items())
    drops = ", ".join(f"{k} {v:,}" for k, v in manifest["drops"].items()) or "none"
    errors = ", ".join(f"{k} {v:,}" for k, v in manifest["errors"].items()) or "none"
    speed = ""
    if "timing" in manifest:
        tm = manifest["timing"]
        speed = f", {manifest['input']['bytes'] / 1e6:.1f} MB in {tm['total_s']:.1f} s = {tm['input_mb_per_s']:.2f} MB/s"
    table.caption = (f"{splits}\ndrops: {drops}; skipped bad lines: {errors}\n"
                     f"vocab {manifest['vocab_size']:,} ({manifest['dtype']}), seq_len {manifest['seq_len']}{speed}")
    return table
