"""Run under torchrun with TP = world size: import each Hugging Face folder (model.hf.import_hf, each rank
keeping its TP shard) and save (rank 0) the eval-mode logits on INPUTS, per folder, to RESULT.

    hf_import_logits.py INPUTS RESULT FOLDER [FOLDER ...]
"""
import os
import sys

import torch
import torch.distributed as dist

from model import parallel
from model.hf import import_hf


def main(inputs_path: str, result_path: str, *folders: str) -> None:
    parallel.init_distributed(tensor_parallel_size=int(os.environ["WORLD_SIZE"]))
    ids = torch.load(inputs_path)
    logits = {}
    for folder in folders:
        model = import_hf(folder, dropout=0.0, attention_dropout=0.0).eval()
        with torch.no_grad():
            logits[folder] = model(ids)  # gathered over the TP ranks
    if dist.get_rank() == 0:
        torch.save({"tp_size": parallel.tp_size(), "logits": logits}, result_path)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
