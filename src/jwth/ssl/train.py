"""The self-supervised pretraining loop (DINOv2 recipe: DINO + iBOT + KoLeo).

Oquab et al. 2023 (DINOv2), Caron et al. 2021 (DINO), Zhou et al. 2022 (iBOT),
Sablayrolles et al. 2019 (KoLeo). Per step:

1. the EMA teacher encodes the global crops -> class-token and masked patch-token
   prototype distributions (centered or Sinkhorn-Knopp, temperature tau_t(step));
2. the student encodes masked global crops and unmasked local crops;
3. L = w_dino L_DINO + w_ibot L_iBOT + w_koleo sum_global-views L_KoLeo (+ w_gram L_Gram
   in post-training);
4. gradients are averaged over processes, clipped per module, the prototype layer is
   frozen during the first ``freeze_last_layer_epochs``; AdamW with cosine lr / wd;
5. teacher <- EMA(student) with cosine momentum.

Multi-process: run under ``torchrun --nproc_per_node W`` (gloo on CPU, NCCL on GPU).
``optim.batch_size`` is the global batch; each process takes 1/W of it, and every
statistic that mixes samples (centre, Sinkhorn-Knopp sums, KoLeo neighbours, masks) is
taken over the global batch, so W processes follow the same trajectory as one.

Outputs in the run folder: ``config.yaml`` (resolved), ``losses.csv`` (one row per
step), ``checkpoint.safetensors`` (student, teacher, centres, optimizer state, step;
resumed automatically), ``encoder/`` (teacher backbone, loadable by
``jwth.encoders.load_encoder``), ``tb/`` (TensorBoard, when installed).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from jwth.augment import StainAugmentConfig
from jwth.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
from jwth.ssl.config import save_config
from jwth.ssl.data import SSLTileDataset, StepBatchSampler, list_images, sample_seed
from jwth.ssl.masking import sample_masks
from jwth.ssl.model import SSLNetwork, backbone_forward, build_network, ema_update
from jwth.ssl.multicrop import MultiCropAugmentation, MultiCropConfig

log = logging.getLogger("jwth.ssl")

CHECKPOINT_NAME = "checkpoint.safetensors"
LOSS_COLUMNS = [
    "step", "epoch", "lr", "wd", "momentum", "teacher_temp", "loss", "dino", "ibot", "koleo", "gram",
    "teacher_entropy", "embedding_spread", "tiles_per_s", "wall_s",
]  # fmt: skip


class CollapseWarning(RuntimeWarning):
    """The teacher looks collapsed (uniform or constant outputs)."""


# --------------------------------------------------------------------------- schedules


def cosine_schedule(base: float, final: float, total: int, warmup: int = 0, start_warmup: float = 0.0) -> np.ndarray:
    """Per-step values: linear warm-up start_warmup -> base over ``warmup`` steps, then
    half-cosine base -> final over the remaining steps (DINO, app. "schedules").

    Returns:
        float64 array of length ``total``.
    """
    warmup = min(max(int(warmup), 0), total)
    w = np.linspace(start_warmup, base, warmup, endpoint=False) if warmup else np.array([])
    n = total - warmup
    it = np.arange(n)
    c = final + 0.5 * (base - final) * (1 + np.cos(np.pi * it / max(n, 1)))
    return np.concatenate([w, c]).astype(np.float64)


def teacher_temp_schedule(warm: float, final: float, warmup: int, total: int) -> np.ndarray:
    """Linear warm-up of tau_t from ``warm`` to ``final`` over ``warmup`` steps, then constant."""
    warmup = min(max(int(warmup), 0), total)
    return np.concatenate([np.linspace(warm, final, warmup), np.full(total - warmup, final)])


# --------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1).

    Backend: NCCL when the device is CUDA, gloo otherwise. The device of process r is
    ``cuda:LOCAL_RANK`` on GPU. Single process: no process group.
    """
    from jwth.device import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device_name)
    if dev.type == "cuda" and world > 1:
        dev = torch.device(f"cuda:{local}")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        if dev.type == "cpu":
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistInfo(rank, world, local, dev)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradients of all processes
    and returns this process's slice (every process computes the same loss on the
    gathered tensor, so the summed gradient is W x the per-process gradient, which
    the gradient averaging divides back)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        w = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(w)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B_local, D) -> (B_global, D), differentiable; identity on one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _GatherWithGrad.apply(x)
    return x


def _all_reduce_grads(params: list[nn.Parameter], world: int) -> None:
    if world <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off : off + n].view_as(p).clone()
        off += n


def _mean_over_ranks(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    if world <= 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= world
    return {k: float(v) for k, v in zip(keys, t.tolist())}


# --------------------------------------------------------------------------- optimizer


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


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically write tensors + JSON metadata to a safetensors file."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(clean, str(tmp), metadata={"jwth": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`save_checkpoint`."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("jwth", "{}"))
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def _prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v for k, v in sd.items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "/"
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"optim/{idx}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if not k.startswith("optim/"):
            continue
        _, idx, name = k.split("/", 2)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------- collapse


@torch.no_grad()
def collapse_stats(teacher_probs: torch.Tensor, teacher_cls: torch.Tensor) -> dict[str, float]:
    """Collapse indicators from one step.

    Args:
        teacher_probs: teacher class-token distributions P_t, (B, K).
        teacher_cls: teacher class tokens (backbone output), (B, D).

    Returns:
        ``teacher_entropy``: mean per-sample entropy of P_t divided by log K (1 =
        uniform: the DINO loss sits at log K); ``embedding_spread``: 1 - ||mean_b
        x_b / ||x_b|| ||^2 (0 = all embeddings identical, ~1 = spread);
        ``unique_prototypes``: fraction of samples with distinct argmax prototype.
    """
    p = teacher_probs.float()
    k = p.shape[-1]
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean() / math.log(k)
    x = F.normalize(teacher_cls.float(), dim=-1)
    spread = 1.0 - (x.mean(0) ** 2).sum()
    uniq = torch.unique(p.argmax(-1)).numel() / max(p.shape[0], 1)
    return {"teacher_entropy": float(ent), "embedding_spread": float(spread), "unique_prototypes": float(uniq)}


def collapse_reason(stats: dict[str, float], batch: int) -> str | None:
    """A human-readable reason when ``stats`` (from :func:`collapse_stats`) look collapsed."""
    if stats["teacher_entropy"] > 0.98:
        return (
            f"teacher outputs are near-uniform (entropy {stats['teacher_entropy']:.3f} x log K): the DINO loss "
            "sits at log(prototypes); check centering / teacher temperature / data diversity"
        )
    if stats["embedding_spread"] < 1e-3:
        return (
            f"all teacher class tokens are the same (spread {stats['embedding_spread']:.2e}): "
            "representation collapse; check the data (near-uniform tiles?) and centering"
        )
    if batch >= 32 and stats["unique_prototypes"] * batch <= 1.0 + 1e-9:
        return "every sample is assigned to the same prototype: collapse to one mode"
    return None


# --------------------------------------------------------------------------- trainer


class ExtraLoss(Protocol):
    """Hook for post-training losses (see :mod:`jwth.ssl.posttrain`)."""

    def __call__(self, step: int, batch: dict[str, torch.Tensor], student_global_patches: torch.Tensor,
                 teacher: SSLNetwork) -> torch.Tensor: ...  # fmt: skip

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def meta(self) -> dict: ...

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tps]:.1f} tiles/s"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _steps(cfg: dict, n_tiles: int, phase: str = "pretrain") -> tuple[int, int]:
    """(steps per epoch, total steps) of a phase."""
    o = cfg["optim"]
    spe = o.get("steps_per_epoch") or max(1, n_tiles // int(o["batch_size"]))
    epochs = cfg["posttrain"]["epochs"] if phase == "posttrain" else o["epochs"]
    return int(spe), int(math.ceil(float(epochs) * spe))


def _scaled_lr(cfg: dict) -> float:
    o = cfg["optim"]
    b = int(o["batch_size"])
    rule = o.get("lr_scaling", "sqrt_wrt_1024")
    if rule == "sqrt_wrt_1024":
        return float(o["base_lr"]) * math.sqrt(b / 1024.0)
    if rule == "linear_wrt_256":
        return float(o["base_lr"]) * b / 256.0
    if rule in ("none", None):
        return float(o["base_lr"])
    raise ValueError(f"optim.lr_scaling must be sqrt_wrt_1024|linear_wrt_256|none, got {rule!r}")


def build_schedules(cfg: dict, steps_per_epoch: int, total: int, phase: str) -> dict[str, np.ndarray]:
    """Per-step lr, wd, momentum, teacher temperature and last-layer lr factor."""
    o, t = cfg["optim"], cfg["teacher"]
    if phase == "posttrain":
        pt = cfg["posttrain"]
        return {
            "lr": np.full(total, float(pt["lr"])),
            "wd": np.full(total, float(pt["weight_decay"])),
            "momentum": np.full(total, float(pt["momentum_teacher"])),
            "teacher_temp": np.full(total, float(pt["teacher_temp"])),
            "last_layer": np.ones(total),
        }
    lr = cosine_schedule(_scaled_lr(cfg), float(o["min_lr"]), total, int(float(o["warmup_epochs"]) * steps_per_epoch))
    last = np.ones(total)
    last[: min(total, int(float(o["freeze_last_layer_epochs"]) * steps_per_epoch))] = 0.0
    return {
        "lr": lr,
        "wd": cosine_schedule(float(o["weight_decay"]), float(o["weight_decay_end"]), total),
        "momentum": cosine_schedule(float(t["momentum_teacher"]), float(t["final_momentum_teacher"]), total),
        "teacher_temp": teacher_temp_schedule(
            float(t["warmup_teacher_temp"]), float(t["teacher_temp"]),
            int(float(t["warmup_teacher_temp_epochs"]) * steps_per_epoch), total,
        ),  # fmt: skip
        "last_layer": last,
    }


@dataclass
class RunResult:
    """What a run produced."""

    out_dir: Path
    steps_done: int
    total_steps: int
    final_loss: float | None
    encoder_dir: Path | None
    losses: list[dict] = field(default_factory=list)
    collapse: list[str] = field(default_factory=list)


def train(
    cfg: dict,
    data_dir: str | Path,
    out_dir: str | Path,
    phase: str = "pretrain",
    init_from: Path | None = None,
    extra_loss: ExtraLoss | None = None,
    gram_scale: float = 1.0,
) -> RunResult:
    """Run (or resume) self-supervised training.

    Args:
        cfg: resolved config (see :mod:`jwth.ssl.config`).
        data_dir: folder of tiles (``labels.csv`` with a ``path`` column, or images).
        out_dir: run folder; an existing ``checkpoint.safetensors`` there is resumed.
        phase: ``"pretrain"`` (schedules) or ``"posttrain"`` (constant lr / wd /
            momentum from ``cfg['posttrain']``).
        init_from: checkpoint file whose student / teacher / centres start a fresh run
            (post-training starts from the pretraining run this way).
        extra_loss: additional loss hook (Gram anchoring).
        gram_scale: resolution factor of the extra high-resolution global crops.

    Returns:
        :class:`RunResult`.

    Raises:
        FileNotFoundError: no images in ``data_dir``.
        ValueError: bad config values (batch not divisible by the process count, ...).
    """
    from jwth.device import autocast

    di = init_distributed(cfg["train"]["device"])
    out = Path(out_dir)
    if di.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if di.world_size > 1:
        dist.barrier()
    tc, cc = cfg["train"], cfg["crops"]
    seed = int(tc["seed"])
    paths = list_images(data_dir, cfg["data"].get("max_tiles"))
    gb = int(cfg["optim"]["batch_size"])
    spe, total = _steps(cfg, len(paths), phase)
    sched = build_schedules(cfg, spe, total, phase)

    torch.manual_seed(seed)
    student, model_args = build_network(cfg)
    student.to(di.device)
    arch = model_args.pop("_arch")
    if init_from is not None:
        init_t, _ = load_checkpoint(init_from)
        student.load_state_dict(_unprefixed("student", init_t))
    teacher = student.make_teacher()
    if init_from is not None:
        teacher.load_state_dict(_unprefixed("teacher", init_t))
    if di.world_size > 1:
        for p in list(student.parameters()) + list(teacher.parameters()):
            dist.broadcast(p.data, 0)
    k_dino = cfg["dino"]["head_n_prototypes"]
    n_teacher = int(cc["global_crops_number"]) * gb
    if cfg["dino"]["centering"] == "sinkhorn_knopp" and k_dino > n_teacher and di.is_main:
        warnings.warn(
            f"Sinkhorn-Knopp with {k_dino} prototypes but only {n_teacher} teacher outputs per step: "
            "equipartition then forces near-uniform targets and the DINO loss sits at log K. "
            "Use dino.centering=centering or fewer prototypes (<= global crops x batch).",
            CollapseWarning,
            stacklevel=2,
        )
    dino_loss = DINOLoss(k_dino, cfg["dino"]["student_temp"], cfg["dino"]["center_momentum"], cfg["dino"]["centering"]).to(di.device)
    k_ibot = cfg["ibot"]["head_n_prototypes"] if cfg["ibot"]["separate_head"] else k_dino
    ibot_loss = IBOTPatchLoss(k_ibot, cfg["dino"]["student_temp"], cfg["dino"]["center_momentum"], cfg["ibot"]["centering"]).to(di.device)
    if init_from is not None:
        if "dino_loss/center" in init_t:
            dino_loss.center.copy_(init_t["dino_loss/center"])
        if "ibot_loss/center" in init_t and init_t["ibot_loss/center"].shape == ibot_loss.center.shape:
            ibot_loss.center.copy_(init_t["ibot_loss/center"])
    koleo = KoLeoLoss()
    groups = param_groups(student, float(cfg["optim"]["layerwise_decay"]), float(cfg["optim"]["patch_embed_lr_mult"]))
    for g in groups:
        g.pop("names")
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(cfg["optim"]["adamw_beta1"], cfg["optim"]["adamw_beta2"]))
    t_params, s_params = student.ema_pairs(teacher)
    train_params = [p for p in student.parameters() if p.requires_grad]

    start = 0
    ckpt = out / CHECKPOINT_NAME
    if ckpt.is_file():
        tens, meta = load_checkpoint(ckpt)
        if meta.get("phase", "pretrain") != phase:
            raise ValueError(f"{ckpt} belongs to a {meta.get('phase')} run, not {phase}; use another --out.")
        student.load_state_dict(_unprefixed("student", tens))
        teacher.load_state_dict(_unprefixed("teacher", tens))
        dino_loss.center.copy_(tens["dino_loss/center"])
        ibot_loss.center.copy_(tens["ibot_loss/center"])
        load_optimizer(opt, {k: v for k, v in tens.items() if k.startswith("optim/")}, meta["param_groups"])
        if extra_loss is not None:
            extra_loss.load(tens, meta.get("extra", {}))
        start = int(meta["step"])
        if di.is_main:
            log.info("resuming %s at step %d/%d", out, start, total)
    if di.is_main:
        save_config(cfg, out / "config.yaml")

    # data
    mc = MultiCropConfig(
        cc["global_crops_number"], cc["global_crops_size"], tuple(cc["global_crops_scale"]),
        cc["local_crops_number"], cc["local_crops_size"], tuple(cc["local_crops_scale"]), cc["flips"], cc["rotations"],
    )  # fmt: skip
    aug = MultiCropAugmentation(
        mc, StainAugmentConfig.from_dict(cfg["stain"]), tuple(cfg["data"]["mean"]), tuple(cfg["data"]["std"]), gram_scale
    )
    ds = SSLTileDataset(paths, aug, seed)
    max_steps = tc.get("max_steps")
    stop = min(total, int(max_steps)) if max_steps else total
    sampler = StepBatchSampler(len(paths), gb, start, stop, seed, di.rank, di.world_size)
    nw = int(tc.get("num_workers", 0))
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, num_workers=nw, persistent_workers=False, pin_memory=di.device.type == "cuda",
    )  # fmt: skip
    patch = student.backbone.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    grid = (cc["global_crops_size"] // patch, cc["global_crops_size"] // patch)
    n_g, bl = int(cc["global_crops_number"]), gb // di.world_size

    # logging
    loss_file = out / "losses.csv"
    rows: list[dict] = []
    if di.is_main:
        old = []
        if loss_file.is_file() and start > 0:
            with open(loss_file) as f:
                old = [r for r in csv.DictReader(f) if int(r["step"]) < start]
        with open(loss_file, "w", newline="") as f:
            w = csv.DictWriter(f, LOSS_COLUMNS)
            w.writeheader()
            w.writerows(old)
    tb = None
    if di.is_main and tc.get("tensorboard", True):
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "tb"))
        except Exception:  # tensorboard not installed
            tb = None
    check_after = tc.get("collapse_check_after_steps")
    if check_after is None:
        check_after = int(float(cfg["optim"]["warmup_epochs"]) * spe) if phase == "pretrain" else 0
    collapse_msgs: list[str] = []
    warned: set[str] = set()

    def checkpoint(next_step: int) -> None:
        if not di.is_main:
            return
        tens = {
            **_prefixed("student", student.state_dict()),
            **_prefixed("teacher", teacher.state_dict()),
            "dino_loss/center": dino_loss.center,
            "ibot_loss/center": ibot_loss.center,
        }
        ot, og = optimizer_tensors(opt)
        tens.update(ot)
        meta = {"step": next_step, "total_steps": total, "phase": phase, "param_groups": og, "world_size": di.world_size}
        if extra_loss is not None:
            tens.update(extra_loss.state_tensors())
            meta["extra"] = extra_loss.meta()
        save_checkpoint(ckpt, tens, meta)

    student.train()
    t0 = time.perf_counter()
    t_last = t0
    final_loss = None
    step = start
    prog = _progress(bool(tc.get("progress", True)) and di.is_main)
    with prog:
        task = prog.add_task(phase, total=stop, completed=start, tps=0.0, loss=float("nan"))
        for step, batch in zip(range(start, stop), loader):
            for g in opt.param_groups:
                g["lr"] = float(sched["lr"][step]) * g["lr_mult"] * (float(sched["last_layer"][step]) if g["is_last_layer"] else 1.0)
                g["weight_decay"] = float(sched["wd"][step]) * g["wd_mult"]
            tau_t = float(sched["teacher_temp"][step])
            torch.manual_seed(sample_seed(seed, step * di.world_size + di.rank, salt=2))  # drop path
            gmask = torch.Generator().manual_seed(sample_seed(seed, step, salt=3))
            masks = sample_masks(
                n_g * gb, grid, tuple(cfg["ibot"]["mask_ratio_min_max"]), float(cfg["ibot"]["mask_sample_probability"]), gmask
            ).view(n_g, gb, -1)[:, di.rank * bl : (di.rank + 1) * bl].reshape(n_g * bl, -1).to(di.device)
            xg = batch["global"].to(di.device, non_blocking=True).transpose(0, 1).reshape(n_g * bl, *batch["global"].shape[2:])
            xl = batch["local"].to(di.device, non_blocking=True)
            n_l = xl.shape[1]
            xl = xl.transpose(0, 1).reshape(n_l * bl, *xl.shape[2:])
            with autocast(di.device, tc.get("precision", "auto")):
                with torch.no_grad():
                    t_out = backbone_forward(teacher.backbone, xg)
                    t_cls_scores = teacher.dino_head(t_out.cls)
                    t_patch_scores = teacher.patch_head(t_out.patches[masks])
                    p_dino = dino_loss.teacher_probs(t_cls_scores, tau_t)
                    p_ibot = ibot_loss.teacher_probs(t_patch_scores, tau_t)
                    dino_loss.update_center(t_cls_scores)
                    if t_patch_scores.shape[0] or di.world_size > 1:
                        ibot_loss.update_center(t_patch_scores)
                s_g = backbone_forward(student.backbone, xg, masks, student.mask_token)
                cls_all = s_g.cls if n_l == 0 else torch.cat([s_g.cls, backbone_forward(student.backbone, xl).cls])
                s_masked = s_g.patches[masks]
                if student.ibot_head is None:
                    sc = student.dino_head(torch.cat([cls_all, s_masked]))
                    s_cls_scores, s_patch_scores = sc[: cls_all.shape[0]], sc[cls_all.shape[0] :]
                else:
                    s_cls_scores, s_patch_scores = student.dino_head(cls_all), student.ibot_head(s_masked)
                l_dino = dino_loss(list(s_cls_scores.chunk(n_g + n_l)), list(p_dino.chunk(n_g)), n_global=n_g)
                l_ibot = ibot_loss(s_patch_scores, p_ibot, masks)
                l_koleo = sum(koleo(gather_with_grad(c)) for c in s_g.cls.chunk(n_g))
                loss = (
                    cfg["dino"]["loss_weight"] * l_dino
                    + cfg["ibot"]["loss_weight"] * l_ibot
                    + cfg["dino"]["koleo_loss_weight"] * l_koleo
                )
                l_extra = None
                if extra_loss is not None:
                    l_extra = extra_loss(step, {k: v.to(di.device) for k, v in batch.items()}, s_g.patches, teacher)
                    loss = loss + l_extra
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}: dino {l_dino}, ibot {l_ibot}, koleo {l_koleo}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _all_reduce_grads(train_params, di.world_size)
            if sched["last_layer"][step] == 0:
                for n, p in student.named_parameters():
                    if ".last_layer." in f".{n}":
                        p.grad = None
            clip = cfg["optim"].get("clip_grad")
            if clip:
                for mod in (student.backbone, student.dino_head, student.ibot_head):
                    if mod is not None:
                        ps = [p for p in mod.parameters() if p.grad is not None]
                        if ps:
                            torch.nn.utils.clip_grad_norm_(ps, float(clip))
            opt.step()
            ema_update(t_params, s_params, float(sched["momentum"][step]))

            # logging
            now = time.perf_counter()
            stats = collapse_stats(p_dino, t_out.cls)
            vals = {
                "loss": float(loss.detach()), "dino": float(l_dino.detach()), "ibot": float(l_ibot.detach()),
                "koleo": float(torch.as_tensor(l_koleo).detach()),
                "gram": float(l_extra.detach()) if l_extra is not None else 0.0,
                "teacher_entropy": stats["teacher_entropy"], "embedding_spread": stats["embedding_spread"],
                "unique_prototypes": stats["unique_prototypes"],
            }  # fmt: skip
            vals = _mean_over_ranks(vals, di.world_size, di.device)
            tps = gb / max(now - t_last, 1e-9)
            t_last = now
            row = {
                "step": step, "epoch": f"{step / spe:.4f}", "lr": float(sched["lr"][step]), "wd": float(sched["wd"][step]),
                "momentum": float(sched["momentum"][step]), "teacher_temp": tau_t,
                **{k: vals[k] for k in ("loss", "dino", "ibot", "koleo", "gram", "teacher_entropy", "embedding_spread")},
                "tiles_per_s": round(tps, 3), "wall_s": round(now - t0, 3),
            }  # fmt: skip
            rows.append(row)
            final_loss = vals["loss"]
            if di.is_main:
                with open(loss_file, "a", newline="") as f:
                    csv.DictWriter(f, LOSS_COLUMNS).writerow(row)
                if tb is not None:
                    for k in ("loss", "dino", "ibot", "koleo", "gram", "teacher_entropy", "embedding_spread"):
                        tb.add_scalar(f"{phase}/{k}", vals[k], step)
                prog.update(task, completed=step + 1, tps=tps, loss=vals["loss"])
                if tc.get("log_every") and (step + 1) % int(tc["log_every"]) == 0 and not tc.get("progress", True):
                    log.info("step %d/%d loss %.4f (%.1f tiles/s)", step + 1, stop, vals["loss"], tps)
            if tc.get("collapse_check", True) and step >= check_after:
                reason = collapse_reason(vals, gb)
                if reason:
                    collapse_msgs.append(f"step {step}: {reason}")
                    if reason not in warned and di.is_main:
                        warned.add(reason)
                        warnings.warn(f"Possible collapse at step {step}: {reason}", CollapseWarning, stacklevel=2)
                    if tc.get("collapse_abort"):
                        checkpoint(step + 1)
                        raise RuntimeError(f"Training stopped (train.collapse_abort): {reason}")
            if (step + 1) % int(tc["checkpoint_every"]) == 0 or step + 1 == stop:
                checkpoint(step + 1)
    done = step + 1 if stop > start else start
    enc_dir = None
    if di.is_main:
        enc_dir = export_encoder(teacher, cfg, arch, model_args, out / "encoder", steps=done, phase=phase)
        _write_loss_plot(out)
    if tb is not None:
        tb.close()
    if di.world_size > 1:
        dist.barrier()
    return RunResult(out, done, total, final_loss, enc_dir, rows, collapse_msgs)


def _write_loss_plot(out: Path) -> None:
    """``losses.png`` beside ``losses.csv``; a plotting failure never fails a finished run."""
    from jwth.ssl.curves import plot_losses

    try:
        plot_losses([out], out / "losses.png")
    except Exception as e:  # noqa: BLE001 - matplotlib/back-end problems are not training errors
        log.warning("Could not draw %s/losses.png (%s); `jwth plot-losses %s` retries.", out, e, out)


def export_encoder(
    net: SSLNetwork, cfg: dict, arch: str, model_args: dict, out_dir: Path, steps: int, dtype: torch.dtype = torch.float16,
    phase: str = "pretrain",
) -> Path:
    """Write the teacher backbone as a checkpoint folder for ``load_encoder(out_dir)``."""
    from jwth.encoders import save_encoder_checkpoint

    return save_encoder_checkpoint(
        net.backbone,
        out_dir,
        architecture=arch,
        model_args=model_args,
        mean=tuple(cfg["data"]["mean"]),
        std=tuple(cfg["data"]["std"]),
        input_size=int(cfg["crops"]["global_crops_size"]),
        mpp=cfg["model"].get("mpp"),
        dtype=dtype,
        extra={"trained_steps": steps, "source": f"jwth {phase} (EMA teacher backbone)"},
    )
