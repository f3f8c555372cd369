"""Encoders named by a spec string, all returning class, register and patch tokens.

Spec forms (see :func:`load_encoder`):

- ``timm:<model>[?key=value&...]`` -- a timm ViT with a fixed-seed random init;
- ``hf-hub:<org>/<repo>`` -- timm's Hugging Face hub loader (offline: the weights
  must already be in the local Hugging Face cache);
- a registry name of a public pathology model: ``uni``, ``uni2-h``, ``virchow2``,
  ``h-optimus-0``, ``phikon-v2`` (see :mod:`jwth.encoders.registry`);
- a local checkpoint: a folder with ``config.json`` + ``model.safetensors`` in
  timm's Hugging Face layout (what :func:`save_encoder_checkpoint` writes);
- ``jwth:<name>`` -- a checkpoint released with this package;
- ``baseline:colour`` -- colour statistics, no learned weights
  (:mod:`jwth.encoders.baselines`), the floor every encoder is read against.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from jwth.device import dtype_name
from jwth.encoders.base import Encoder, Tokens
from jwth.encoders.registry import REGISTRY, RegistryEntry, timm_kwargs

__all__ = [
    "Encoder",
    "Tokens",
    "load_encoder",
    "save_encoder_checkpoint",
    "released_checkpoints",
    "REGISTRY",
    "DEFAULT_ENCODER",
]

#: The encoder used by ``jwth demo`` until a released checkpoint exists.
DEFAULT_ENCODER = "timm:vit_small_patch16_224"

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
RANDOM_INIT_SEED = 0


def released_checkpoints() -> list[str]:
    """Names usable as ``jwth:<name>`` (folders under the package's checkpoints/)."""
    if not CHECKPOINT_DIR.is_dir():
        return []
    return sorted(p.name for p in CHECKPOINT_DIR.iterdir() if (p / "config.json").is_file())


def _parse_kwargs(query: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        if "=" not in part:
            raise ValueError(f"Bad encoder option {part!r}: expected key=value (e.g. img_size=112).")
        k, v = part.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _data_cfg(model: torch.nn.Module) -> tuple[tuple, tuple, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    size = cfg.get("input_size", (3, 224, 224))[-1]
    # the model's own img_size wins over the pretrained config (img_size= overrides)
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        size = pe.img_size[-1]
    return mean, std, int(size)


def _load_timm(name: str, kwargs: dict[str, Any], spec: str) -> Encoder:
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
        hint = f" Similar: {close}." if close else " List them with timm.list_models('vit_*')."
        raise ValueError(f"Unknown timm model {name!r} in encoder spec {spec!r}.{hint}")
    mean = kwargs.pop("mean", None)
    std = kwargs.pop("std", None)
    mpp = kwargs.pop("mpp", None)
    seed = kwargs.pop("seed", RANDOM_INIT_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            raise ValueError(
                f"Encoder spec {spec!r}: timm could not build {name!r} with options {kwargs} ({type(e).__name__}: "
                f"{e}). Check the key=value options after '?' (e.g. img_size=112, reg_tokens=4)."
            ) from e
    m, s, size = _data_cfg(model)
    return Encoder(
        model,
        spec=spec,
        mean=tuple(mean) if mean else m,
        std=tuple(std) if std else s,
        input_size=size,
        mpp=mpp,
        random_init=True,
    )


@contextlib.contextmanager
def hub_offline():
    """Hugging Face Hub offline mode for the duration (``HF_HUB_OFFLINE=1``): weights come
    from the local cache or not at all -- no request, no retries, whatever the environment."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        hub_constants = None
    old_const = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _load_hub(hub_id: str, kwargs: dict[str, Any], spec: str, entry: RegistryEntry | None) -> Encoder:
    import timm

    try:
        with hub_offline():
            model = timm.create_model(f"hf-hub:{hub_id}", pretrained=True, num_classes=0, **kwargs)
    except Exception as e:  # offline, gated, or missing from the cache
        raise RuntimeError(
            f"Could not load {spec!r} (Hugging Face repo {hub_id}) from the local cache: {e}. "
            "Weights are never downloaded at run time here: put the model in the Hugging Face "
            "cache (set HF_HUB_CACHE or HF_HOME to a cache that holds it) and set "
            "HF_HUB_OFFLINE=1, or pass a local checkpoint folder as the encoder spec."
        ) from e
    m, s, size = _data_cfg(model)
    if entry is not None:
        m, s, size = entry.mean, entry.std, entry.input_size
    return Encoder(
        model,
        spec=spec,
        mean=m,
        std=s,
        input_size=size,
        mpp=entry.mpp if entry else None,
    )


def _load_transformers(entry: RegistryEntry, spec: str) -> Encoder:
    try:
        from transformers import AutoModel
    except ImportError as e:
        raise RuntimeError(
            f"{spec!r} is a Hugging Face transformers model; `pip install transformers` first."
        ) from e
    try:
        with hub_offline():
            hf = AutoModel.from_pretrained(entry.hub_id, local_files_only=True)
    except Exception as e:
        raise RuntimeError(
            f"Could not load {entry.hub_id} from the local Hugging Face cache: {e}. "
            "Set HF_HUB_CACHE to a cache holding it and HF_HUB_OFFLINE=1."
        ) from e
    hf.cls_token = True  # marker: the sequence starts with the class token

    def fwd(x: torch.Tensor) -> torch.Tensor:
        return hf(pixel_values=x).last_hidden_state

    return Encoder(
        hf,
        spec=spec,
        mean=entry.mean,
        std=entry.std,
        input_size=entry.input_size,
        mpp=entry.mpp,
        num_registers=entry.num_registers,
        patch_size=entry.patch_size,
        embed_dim=entry.embed_dim,
        forward_fn=fwd,
    )


def _resample_pos_embed(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Bicubically resample a checkpoint's absolute position embedding to the model's grid.

    A checkpoint trained at 112 px (7x7 patches) loaded with ``img_size: 224`` in its
    config (14x14) gets its position embedding interpolated, as timm does for pretrained
    weights (``timm.layers.resample_abs_pos_embed``); class and register positions are kept.
    """
    pe = state.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pe is None or target is None or pe.shape == target.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    new_grid = list(model.patch_embed.grid_size)
    old_n = pe.shape[1] - prefix
    old_side = int(round(old_n**0.5))
    if old_side * old_side != old_n:
        return state  # not a square grid: let load_state_dict report the mismatch
    out = dict(state)
    out["pos_embed"] = resample_abs_pos_embed(pe.float(), new_grid, [old_side, old_side], num_prefix_tokens=prefix).to(pe.dtype)
    return out


def _load_local(path: Path, spec: str) -> Encoder:
    import timm
    from safetensors.torch import load_file

    folder = path if path.is_dir() else path.parent
    cfg_file = folder / "config.json"
    weights = path if path.is_file() else folder / "model.safetensors"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"Checkpoint {folder} has no config.json. A local checkpoint is a folder with "
            "config.json (timm's Hugging Face layout: architecture, model_args, "
            "pretrained_cfg) and model.safetensors; jwth.encoders.save_encoder_checkpoint writes one."
        )
    if not weights.is_file():
        raise FileNotFoundError(f"Checkpoint {folder} has no weights file {weights.name}.")
    cfg = json.loads(cfg_file.read_text())
    arch = cfg.get("architecture")
    if not arch:
        raise ValueError(f"{cfg_file} has no 'architecture' key naming the timm model.")
    model_args = dict(cfg.get("model_args", {}))
    model_args.pop("num_classes", None)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **model_args)
    state = load_file(str(weights))
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    state = _resample_pos_embed(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {weights} does not match architecture {arch!r} with {model_args}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    pcfg = cfg.get("pretrained_cfg", {})
    extra = cfg.get("jwth", {})
    return Encoder(
        model.float(),
        spec=spec,
        mean=tuple(pcfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(pcfg.get("std", (0.229, 0.224, 0.225))),
        input_size=int(pcfg.get("input_size", [3, 224, 224])[-1]),
        mpp=extra.get("mpp"),
        weights_hash=_file_hash(weights),
    )


def load_encoder(spec: str, device: str | torch.device = "cpu") -> Encoder:
    """Build a frozen :class:`Encoder` from a spec string (see module docstring).

    Args:
        spec: encoder spec.
        device: where to put the model.

    Returns:
        An :class:`Encoder` in eval mode with gradients off.

    Raises:
        ValueError: unknown timm model, malformed options, or a checkpoint that does not
            match its architecture.
        FileNotFoundError: a local checkpoint path or ``jwth:<name>`` that does not exist.
        RuntimeError: hub weights not available offline.
    """
    spec = spec.strip()
    if spec.startswith("timm:"):
        body = spec[len("timm:") :]
        name, _, query = body.partition("?")
        enc = _load_timm(name, _parse_kwargs(query), spec)
    elif spec.startswith("hf-hub:"):
        enc = _load_hub(spec[len("hf-hub:") :], {}, spec, None)
    elif spec.startswith("jwth:"):
        name = spec[len("jwth:") :]
        folder = CHECKPOINT_DIR / name
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"No released checkpoint {spec!r}; available: {released_checkpoints() or 'none yet'}."
            )
        enc = _load_local(folder, spec)
    elif spec.startswith("baseline:"):
        from jwth.encoders.baselines import load_baseline

        name, _, query = spec[len("baseline:") :].partition("?")
        enc = load_baseline(name, _parse_kwargs(query))
    elif spec.lower() in REGISTRY:
        entry = REGISTRY[spec.lower()]
        if entry.loader == "transformers":
            enc = _load_transformers(entry, spec)
        else:
            enc = _load_hub(entry.hub_id, timm_kwargs(entry), spec, entry)
    elif Path(spec).expanduser().exists():
        enc = _load_local(Path(spec).expanduser().resolve(), spec)
    else:
        raise ValueError(
            f"Unknown encoder spec {spec!r}. Use timm:<model>, hf-hub:<org>/<repo>, "
            f"jwth:<name> ({released_checkpoints() or 'none released yet'}), baseline:colour, "
            f"a checkpoint folder, or one of {sorted(REGISTRY)}."
        )
    return enc.to(device)


def save_encoder_checkpoint(
    model: torch.nn.Module,
    out_dir: str | Path,
    architecture: str,
    model_args: dict[str, Any] | None = None,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
    input_size: int = 224,
    mpp: float | None = None,
    dtype: torch.dtype = torch.float16,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder loadable by :func:`load_encoder` (and timm ``local-dir:``).

    Writes ``model.safetensors`` (state dict cast to ``dtype``, head removed) and
    ``config.json`` (timm's Hugging Face layout plus a ``jwth`` block with mpp).

    Returns:
        The folder path.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("head.")
    }
    save_file(state, str(out / "model.safetensors"))
    cfg = {
        "architecture": architecture,
        "num_classes": 0,
        "num_features": int(getattr(model, "num_features", 0)),
        "model_args": dict(model_args or {}),
        "pretrained_cfg": {
            "input_size": [3, int(input_size), int(input_size)],
            "mean": list(mean),
            "std": list(std),
            "interpolation": "bicubic",
            "crop_pct": 1.0,
        },
        "jwth": {"mpp": mpp, "dtype": dtype_name(dtype), **(extra or {})},
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
