"""DeepSpeed's ``ds_to_universal`` (same arguments) with every checkpoint file read weights-only.

DeepSpeed's converter loads with ``torch.load(weights_only=False)``, which would run a pickled payload
planted in a checkpoint file; here it runs under :func:`pretrain.trainer.checkpoint.weights_only_loading`
(its worker processes are forked, so they inherit it). Called by ``checkpoint.to_universal``.
"""
from deepspeed.checkpoint import ds_to_universal

from pretrain.trainer.checkpoint import weights_only_loading

if __name__ == "__main__":
    with weights_only_loading():
        ds_to_universal.main(ds_to_universal.parse_arguments())
