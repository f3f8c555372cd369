"""Fine-tuning the encoder with a head (``jwth finetune``): full, LoRA, or the last k blocks.

The counterpart of the frozen-encoder probe (:mod:`jwth.eval.probe`) on the same
splits, metrics and run-folder layout, so that the two are compared with
``jwth compare`` on the same tiles.
"""

from jwth.finetune.model import METHODS, FinetuneModel, configure_trainable, count_params
from jwth.finetune.run import FinetuneRunConfig, finetune_run
from jwth.finetune.train import EarlyStopping, FinetuneConfig, fit

__all__ = [
    "METHODS",
    "EarlyStopping",
    "FinetuneConfig",
    "FinetuneModel",
    "FinetuneRunConfig",
    "configure_trainable",
    "count_params",
    "finetune_run",
    "fit",
]
