"""`gal-prepare`: a science corpus (JSONL) → Galactica tokenizer → packed webdataset shards.

    gal-prepare                                  # the built-in sample → data/sample_shards
    gal-prepare input='corpus/*.jsonl' output=/data/shards tokenizer.vocab_size=50000 overwrite=true

Keys: conf/prepare.yaml and pretrain/data/config.py. The pipeline: pretrain/data/pipeline.py.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from pretrain.config import CONF_DIR, ConfigError
from pretrain.data.config import register
from pretrain.data.read import BadInput

register()


@hydra.main(config_path=str(CONF_DIR), config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rich.console import Console

    from pretrain.data.pipeline import prepare, summary_table
    try:
        manifest = prepare(OmegaConf.to_object(cfg), progress=True)
    except (ConfigError, BadInput, ValueError, FileExistsError, FileNotFoundError) as e:  # clear, named causes
        print(f"gal-prepare: error: {e}", file=sys.stderr)
        sys.exit(2)
    Console(stderr=True).print(summary_table(manifest))
    print(manifest["output"])


if __name__ == "__main__":
    main()
