"""Self-supervised training losses, one per file, named after their papers.

- :class:`DINOLoss` (Caron et al. 2021; Oquab et al. 2023): class-token prototype
  self-distillation with centering or Sinkhorn-Knopp.
- :class:`IBOTPatchLoss` (Zhou et al. 2022): masked patch-token self-distillation.
- :class:`KoLeoLoss` (Sablayrolles et al. 2019): spread of class-token embeddings.
- :class:`GramLoss` (Siméoni et al. 2025, DINOv3): Gram anchoring of patch tokens.
"""

from jwth.loss.dino import DINOLoss, sinkhorn_knopp
from jwth.loss.gram import GramLoss
from jwth.loss.ibot import IBOTPatchLoss
from jwth.loss.koleo import KoLeoLoss

__all__ = ["DINOLoss", "IBOTPatchLoss", "KoLeoLoss", "GramLoss", "sinkhorn_knopp"]
