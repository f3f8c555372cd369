"""AdamW parameter groups of self-supervised training (DINOv2 defaults): no weight decay on
biases, norms, tokens and position embeddings, layer-wise lr decay, a slower patch
embedding, and the prototype layer flagged for freezing during the first epochs."""

from __future__ import annotations

from jwth.ssl.model import SSLNetwork

__all__ = ["param_groups"]


def param_groups(net: SSLNetwork, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    """AdamW groups with per-group ``lr_mult``, ``wd_mult`` and ``is_last_layer``.

    No weight decay on biases, norms, tokens and position embeddings; layer-wise lr
    decay decay^(L + 1 - layer) over the L transformer blocks (embeddings = layer 0,
    heads = L + 1); patch embedding lr x ``patch_embed_lr_mult`` (DINOv2 defaults).
    """
    depth = len(net.backbone.blocks)
    groups: dict[tuple, dict] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim == 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
        if name.startswith("backbone."):
            sub = name[len("backbone.") :]
            if sub.startswith("blocks."):
                layer = int(sub.split(".")[1]) + 1
            elif sub.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed")):
                layer = 0
            else:
                layer = depth + 1
        elif name == "mask_token":
            layer = 0
        else:
            layer = depth + 1
        lr_mult = layerwise_decay ** (depth + 1 - layer)
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        last = ".last_layer." in f".{name}"
        key = (0.0 if no_wd else 1.0, round(lr_mult, 12), last)
        if key not in groups:
            groups[key] = {"params": [], "wd_mult": key[0], "lr_mult": lr_mult, "is_last_layer": last, "names": []}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())
