"""Self-supervised pretraining (DINOv2 recipe) and Gram-anchored post-training.

- :mod:`jwth.ssl.multicrop`: global/local crops with flips and 90-degree rotations.
- :mod:`jwth.ssl.masking`: iBOT block masks.
- :mod:`jwth.ssl.heads`: DINO projection head.
- :mod:`jwth.ssl.model`: timm ViT forward with mask tokens; student/teacher modules.
- :mod:`jwth.ssl.train`: the training loop (EMA teacher, multi-process, stop / resume).
- :mod:`jwth.ssl.schedules`: lr, weight decay, teacher momentum / temperature per step.
- :mod:`jwth.ssl.optim`: AdamW parameter groups (layer-wise lr decay, no wd on norms).
- :mod:`jwth.ssl.distributed`: torchrun set-up, all-gather with gradient, gradient averaging.
- :mod:`jwth.ssl.checkpoint`: atomic safetensors checkpoints.
- :mod:`jwth.ssl.collapse`: collapse indicators and warnings.
- :mod:`jwth.ssl.monitor`: online k-NN / logistic-regression evaluation every N steps.
- :mod:`jwth.ssl.signals`: graceful stop on SIGTERM / SIGINT.
- :mod:`jwth.ssl.posttrain`: Gram anchoring phase (DINOv3).
- :mod:`jwth.ssl.config`: default YAML + ``key=value`` overrides.
"""
