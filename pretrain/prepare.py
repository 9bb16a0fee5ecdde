"""`gal-prepare`: a science corpus (JSONL) → Galactica tokenizer → packed webdataset shards.

    gal-prepare                                  # the built-in sample → data/sample_shards
    gal-prepare input='corpus/*.jsonl' output=/data/shards tokenizer.vocab_size=50000 overwrite=true
    gal-prepare input='/shared/corpus/*.jsonl' output=/shared/shards executor=slurm slurm.partition=cpu

Keys: conf/prepare.yaml and pretrain/data/config.py. The pipeline: pretrain/data/pipeline.py.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from pretrain.cli import hydra_app
from pretrain.data.config import register

register()


def _task(cfg: DictConfig) -> None:
    from rich.console import Console

    from pretrain.data.pipeline import prepare, summary_table
    manifest = prepare(OmegaConf.to_object(cfg), progress=True)
    if "submitted" in manifest:  # executor=slurm slurm.wait=false: the jobs run on; the same command resumes
        print(f"submitted Slurm jobs {' '.join(manifest['submitted'])}; logs in {manifest['work']}/logs/")
        return
    Console(stderr=True).print(summary_table(manifest))
    print(manifest["output"])


def main() -> None:
    hydra_app("gal-prepare", "prepare", _task)


if __name__ == "__main__":
    main()
