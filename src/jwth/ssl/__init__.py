"""Self-supervised pretraining (DINOv2 recipe) and Gram-anchored post-training.

- :mod:`jwth.ssl.multicrop`: global/local crops with flips and 90-degree rotations.
- :mod:`jwth.ssl.masking`: iBOT block masks.
- :mod:`jwth.ssl.heads`: DINO projection head.
- :mod:`jwth.ssl.model`: timm ViT forward with mask tokens; student/teacher modules.
- :mod:`jwth.ssl.train`: the training loop (EMA teacher, schedules, DDP, checkpoints).
- :mod:`jwth.ssl.posttrain`: Gram anchoring phase (DINOv3).
- :mod:`jwth.ssl.config`: default YAML + ``key=value`` overrides.
"""
