"""Registry of public pathology foundation models.

Each entry records what a user must get right to use the model as a frozen
encoder: the Hugging Face hub id, the timm kwargs that rebuild the architecture,
the input size (px), the normalisation, the tile resolution the model was trained
at (mpp, µm/px), the number of register tokens and the embedding dimension. The
weights are gated on the hub and cannot be downloaded here; the entries are used
offline from a populated Hugging Face cache (``HF_HUB_OFFLINE=1``).

Sources: the model cards of each repository and the papers -- UNI (Chen et al.,
Nat. Med. 2024), Virchow2 (Zimmermann et al., arXiv:2408.00738), H-optimus-0
(Bioptimus, 2024), Phikon-v2 (Filiot et al., arXiv:2409.09173).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RegistryEntry:
    """A public pathology encoder.

    Attributes:
        name: registry name used as an encoder spec (e.g. ``uni``).
        hub_id: Hugging Face repository id.
        loader: ``timm`` (timm ``hf-hub:`` loader) or ``transformers`` (AutoModel).
        arch: architecture in words (e.g. ``ViT-L/16``).
        embed_dim: token dimension D.
        num_registers: register tokens R (excluded from pooling).
        patch_size: ViT patch size in px.
        input_size: tile side in px fed to the model.
        mpp: tile resolution the model was trained at, µm/px.
        mean, std: per-channel normalisation of RGB in [0, 1].
        timm_kwargs: extra kwargs for ``timm.create_model``.
        embedding: the model's documented tile embedding (``cls`` or ``cls+mean``).
    """

    name: str
    hub_id: str
    loader: str
    arch: str
    embed_dim: int
    num_registers: int
    patch_size: int
    input_size: int
    mpp: float
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    embedding: str = "cls"


def _swiglu_kwargs() -> dict[str, Any]:
    # Resolved lazily so that importing the registry does not import timm.layers.
    import torch
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        RegistryEntry(
            name="uni",
            hub_id="MahmoodLab/UNI",
            loader="timm",
            arch="ViT-L/16",
            embed_dim=1024,
            num_registers=0,
            patch_size=16,
            input_size=224,
            mpp=0.5,
            timm_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
        ),
        RegistryEntry(
            name="uni2-h",
            hub_id="MahmoodLab/UNI2-h",
            loader="timm",
            arch="ViT-H/14",
            embed_dim=1536,
            num_registers=8,
            patch_size=14,
            input_size=224,
            mpp=0.5,
            timm_kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "no_embed_class": True,
                "reg_tokens": 8,
                "dynamic_img_size": True,
                "_swiglu": True,
            },
        ),
        RegistryEntry(
            name="virchow2",
            hub_id="paige-ai/Virchow2",
            loader="timm",
            arch="ViT-H/14",
            embed_dim=1280,
            num_registers=4,
            patch_size=14,
            input_size=224,
            mpp=0.5,
            timm_kwargs={"_swiglu": True},
            embedding="cls+mean",
        ),
        RegistryEntry(
            name="h-optimus-0",
            hub_id="bioptimus/H-optimus-0",
            loader="timm",
            arch="ViT-g/14",
            embed_dim=1536,
            num_registers=4,
            patch_size=14,
            input_size=224,
            mpp=0.5,
            mean=(0.707223, 0.578729, 0.703617),
            std=(0.211883, 0.230117, 0.177517),
            timm_kwargs={"init_values": 1e-5, "dynamic_img_size": False},
        ),
        RegistryEntry(
            name="phikon-v2",
            hub_id="owkin/phikon-v2",
            loader="transformers",
            arch="ViT-L/16",
            embed_dim=1024,
            num_registers=0,
            patch_size=16,
            input_size=224,
            mpp=0.5,
        ),
    ]
}


def timm_kwargs(entry: RegistryEntry) -> dict[str, Any]:
    """The kwargs passed to ``timm.create_model`` for ``entry`` (SwiGLU resolved)."""
    kw = {k: v for k, v in entry.timm_kwargs.items() if k != "_swiglu"}
    if entry.timm_kwargs.get("_swiglu"):
        kw.update(_swiglu_kwargs())
    return kw
