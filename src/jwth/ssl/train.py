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
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from jwth.augment import StainAugmentConfig
from jwth.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
from jwth.ssl.checkpoint import (  # noqa: F401 - re-exported for callers of jwth.ssl.train
    CHECKPOINT_NAME, load_checkpoint, load_optimizer, optimizer_tensors, save_checkpoint,
)
from jwth.ssl.checkpoint import prefixed as _prefixed
from jwth.ssl.checkpoint import unprefixed as _unprefixed
from jwth.ssl.collapse import CollapseWarning, collapse_reason, collapse_stats  # noqa: F401
from jwth.ssl.config import save_config
from jwth.ssl.distributed import DistInfo, all_reduce_grads, gather_with_grad, init_distributed, mean_over_ranks  # noqa: F401
from jwth.ssl.data import SSLTileDataset, StepBatchSampler, list_images, sample_seed
from jwth.ssl.masking import sample_masks
from jwth.ssl.model import SSLNetwork, backbone_forward, build_network, ema_update
from jwth.ssl.profile import PhaseTimer
from jwth.ssl.multicrop import MultiCropAugmentation, MultiCropConfig
from jwth.ssl.optim import param_groups
from jwth.ssl.schedules import build_schedules, cosine_schedule, phase_steps, teacher_temp_schedule  # noqa: F401
from jwth.ssl.signals import GracefulStop, ignore_stop_signals

log = logging.getLogger("jwth.ssl")

LOSS_COLUMNS = [
    "step", "epoch", "lr", "wd", "momentum", "teacher_temp", "loss", "dino", "ibot", "koleo", "gram",
    "teacher_entropy", "embedding_spread", "tiles_per_s", "wall_s",
]  # fmt: skip


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
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" / "max_minutes" when stopped before the end
    monitor: list[dict] = field(default_factory=list)


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

    A run stops cleanly — finishing its step, writing the checkpoint and exporting the
    encoder — on SIGTERM / SIGINT or after ``train.max_minutes``; it also checkpoints every
    ``train.checkpoint_every`` steps and every ``train.checkpoint_every_minutes``. With
    ``monitor.every_steps`` > 0 the EMA teacher is evaluated on a fixed labelled subset
    (:mod:`jwth.ssl.monitor`) at the start, every that many steps and at the end, into
    ``monitor.csv``.

    Returns:
        :class:`RunResult`.

    Raises:
        FileNotFoundError: no images in ``data_dir``.
        ValueError: bad config values (batch not divisible by the process count, ...).
    """
    from jwth.device import adamw, autocast

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
    spe, total = phase_steps(cfg, len(paths), phase)
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
    opt = adamw(groups, lr=0.0, betas=(cfg["optim"]["adamw_beta1"], cfg["optim"]["adamw_beta2"]))
    t_params, s_params = student.ema_pairs(teacher)
    train_params = [p for p in student.parameters() if p.requires_grad]
    # the prototype layers: while frozen (first freeze_last_layer_epochs) they are left out
    # of the graph, so backward skips their (K x bottleneck) weight gradient
    last_params = [p for n, p in student.named_parameters() if p.requires_grad and ".last_layer." in f".{n}"]

    start = 0
    ckpt = out / CHECKPOINT_NAME
    if ckpt.is_file():
        _check_resume_config(out, cfg, bool(tc.get("resume_with_changes")), di.is_main)
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
        from jwth.device import dtype_name, resolve_precision

        log.info("device %s, autocast %s (train.precision=%s)", di.device,
                 dtype_name(resolve_precision(di.device, tc.get("precision", "auto"))),
                 tc.get("precision", "auto"))  # fmt: skip

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
        worker_init_fn=ignore_stop_signals if nw > 0 else None,
    )  # fmt: skip
    patch = student.backbone.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    grid = (cc["global_crops_size"] // patch, cc["global_crops_size"] // patch)
    n_g, bl = int(cc["global_crops_number"]), gb // di.world_size

    # online monitor (main process only; labels used only here)
    mon_cfg = cfg.get("monitor") or {}
    mon_every = int(mon_cfg.get("every_steps") or 0)
    mon_set = None
    mon_rows: list[dict] = []
    if mon_every > 0 and di.is_main:
        from jwth.ssl.monitor import build_monitor_set

        mon_set = build_monitor_set(
            mon_cfg.get("data") or data_dir, int(cc["global_crops_size"]), tuple(cfg["data"]["mean"]),
            tuple(cfg["data"]["std"]), int(mon_cfg.get("n_tiles", 512)), int(mon_cfg.get("n_folds", 5)), seed,
            mon_cfg.get("label_col", "label"), mon_cfg.get("patient_col", "patient_id"),
        )  # fmt: skip
        log.info("monitor: %d tiles of %d patients from %s, every %d steps", len(mon_set.y),
                 len(set(mon_set.patients)), mon_set.source, mon_every)  # fmt: skip

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

    def monitor(at_step: int, entropy: float | None) -> None:
        if mon_set is None:
            return
        from jwth.ssl.monitor import append_rows, monitor_row

        row = {"step": at_step, **monitor_row(teacher.backbone, mon_set, di.device, int(mon_cfg.get("knn_k", 20)))}
        row["wall_s"] = round(time.perf_counter() - t0, 3)
        row["teacher_entropy"] = entropy if entropy is not None else float("nan")
        append_rows(out / "monitor.csv", [row], keep_below_step=at_step - 1 if not mon_rows else None)
        mon_rows.append(row)
        log.info("monitor step %d: k-NN / logreg balanced accuracy class token %.3f / %.3f, mean patch token "
                 "%.3f / %.3f; effective rank class %.1f, patch %.1f (%.1f s)", at_step, row["knn_bacc_cls"],
                 row["logreg_bacc_cls"], row["knn_bacc_patch"], row["logreg_bacc_patch"], row["erank_cls"],
                 row["erank_patch_per_tile"], row["eval_s"])  # fmt: skip

    student.train()
    t0 = time.perf_counter()
    final_loss = None
    step = start
    stopped_by: str | None = None
    max_min = tc.get("max_minutes")
    ckpt_min = tc.get("checkpoint_every_minutes")
    last_entropy: float | None = None
    monitor(start, None)
    t_last = t_ckpt = time.perf_counter()
    prog = _progress(bool(tc.get("progress", True)) and di.is_main)
    timer = PhaseTimer(bool(tc.get("profile_phases", False)), di.device)
    with prog, GracefulStop() as stopper:
        task = prog.add_task(phase, total=stop, completed=start, tps=0.0, loss=float("nan"))
        completed = start  # steps whose updates are fully applied
        touched = False  # True between the optimizer step and the EMA update
        try:
            t_wait = time.perf_counter()
            for step, batch in zip(range(start, stop), loader):
                timer.add("data", time.perf_counter() - t_wait)
                for g in opt.param_groups:
                    g["lr"] = float(sched["lr"][step]) * g["lr_mult"] * (float(sched["last_layer"][step]) if g["is_last_layer"] else 1.0)
                    g["weight_decay"] = float(sched["wd"][step]) * g["wd_mult"]
                tau_t = float(sched["teacher_temp"][step])
                for p in last_params:
                    p.requires_grad_(bool(sched["last_layer"][step]))
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
                    with torch.no_grad(), timer.phase("teacher"):
                        t_out = backbone_forward(teacher.backbone, xg)
                        t_cls_scores, t_patch_scores = teacher.head_scores(t_out.cls, t_out.patches[masks])
                        p_dino = dino_loss.teacher_probs(t_cls_scores, tau_t)
                        p_ibot = ibot_loss.teacher_probs(t_patch_scores, tau_t)
                        dino_loss.update_center(t_cls_scores)
                        if t_patch_scores.shape[0] or di.world_size > 1:
                            ibot_loss.update_center(t_patch_scores)
                    with timer.phase("student_backbone"):
                        s_g = backbone_forward(student.backbone, xg, masks, student.mask_token)
                        cls_all = s_g.cls if n_l == 0 else torch.cat([s_g.cls, backbone_forward(student.backbone, xl).cls])
                        s_masked = s_g.patches[masks]
                    with timer.phase("heads"):
                        s_cls_scores, s_patch_scores = student.head_scores(cls_all, s_masked)
                    with timer.phase("losses"):
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
                with timer.phase("backward"):
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    all_reduce_grads(train_params, di.world_size)
                if sched["last_layer"][step] == 0:  # all_reduce_grads zero-fills missing gradients
                    for p in last_params:
                        p.grad = None
                clip = cfg["optim"].get("clip_grad")
                with timer.phase("grad_clip"):
                    if clip:
                        for mod in (student.backbone, student.dino_head, student.ibot_head):
                            if mod is not None:
                                ps = [p for p in mod.parameters() if p.grad is not None]
                                if ps:
                                    torch.nn.utils.clip_grad_norm_(ps, float(clip), foreach=True)
                touched = True
                with timer.phase("optimizer"):
                    opt.step()
                with timer.phase("ema"):
                    ema_update(t_params, s_params, float(sched["momentum"][step]))
                touched = False
                t_book = time.perf_counter()
                completed = step + 1

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
                vals = mean_over_ranks(vals, di.world_size, di.device)
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
                last_entropy = vals["teacher_entropy"]
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
                if mon_every and (step + 1) % mon_every == 0 and step + 1 != stop:
                    monitor(step + 1, last_entropy)
                    t_last = time.perf_counter()  # the evaluation is not training time
                elapsed_min = (time.perf_counter() - t0) / 60.0
                if di.world_size > 1:  # every process must take the same decision
                    flags = torch.tensor([float(stopper.requested is not None), elapsed_min], device=di.device)
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                    stop_now, elapsed_min = bool(flags[0] > 0), float(flags[1])
                else:
                    stop_now = stopper.requested is not None
                if stop_now:
                    stopped_by = stopper.requested or "signal (another process)"
                elif max_min and elapsed_min >= float(max_min) and step + 1 < stop:
                    stopped_by = "max_minutes"
                due = (step + 1) % int(tc["checkpoint_every"]) == 0 or step + 1 == stop or stopped_by is not None
                if ckpt_min and time.perf_counter() - t_ckpt >= 60.0 * float(ckpt_min):
                    due = True
                if due:
                    checkpoint(step + 1)
                    t_ckpt = time.perf_counter()
                timer.add("bookkeeping", time.perf_counter() - t_book)
                t_wait = time.perf_counter()
                if stopped_by is not None:
                    if di.is_main:
                        log.warning("stopped at step %d/%d (%s); checkpoint written, run the same command to resume",
                                    step + 1, total, stopped_by)  # fmt: skip
                    break
        except Exception:
            # a stop signal can also take the data-loader workers down, which surfaces here as
            # an error mid-step; the weights are then those after `completed` steps
            if stopper.requested is None or touched or di.world_size > 1:
                raise
            stopped_by = stopper.requested
            checkpoint(completed)
            if di.is_main:
                log.warning("stopped during step %d/%d (%s); checkpoint of step %d written, run the same "
                            "command to resume", completed + 1, total, stopped_by, completed)  # fmt: skip

    for p in last_params:  # the returned network as built: every trainable parameter trainable
        p.requires_grad_(True)
    done = completed
    if timer.enabled and di.is_main:
        (out / "profile.json").write_text(json.dumps(timer.summary(), indent=2))
    if mon_set is not None and (not mon_rows or mon_rows[-1]["step"] != done):
        monitor(done, last_entropy)
    enc_dir = None
    if di.is_main:
        enc_dir = export_encoder(teacher, cfg, arch, model_args, out / "encoder", steps=done, phase=phase)
        _write_loss_plot(out)
    if tb is not None:
        tb.close()
    if di.world_size > 1:
        dist.barrier()
    return RunResult(out, done, total, final_loss, enc_dir, rows, collapse_msgs, stopped_by, mon_rows)


def _check_resume_config(out: Path, cfg: dict, allow: bool, is_main: bool) -> None:
    """Refuse to resume ``out`` with settings other than those it was started with (outside
    ``train`` / ``monitor``), unless ``allow``: then warn and append the changes to
    ``config_changes.jsonl`` in the run folder.

    Raises:
        ValueError: settings differ and ``allow`` is false (the message lists them).
    """
    import yaml

    from jwth.ssl.config import config_changes

    old_file = out / "config.yaml"
    if not old_file.is_file():
        return
    changes = config_changes(yaml.safe_load(old_file.read_text()) or {}, cfg)
    if not changes:
        return
    if not allow:
        raise ValueError(
            f"{out} holds a run started with other settings ({'; '.join(changes)}). Resume with the "
            f"run's own settings (its config.yaml), choose another --out, or add "
            f"train.resume_with_changes=true to continue with the new ones (recorded in config_changes.jsonl).")
    if is_main:
        log.warning("resuming %s with changed settings: %s", out, "; ".join(changes))
        with open(out / "config_changes.jsonl", "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changes}) + "\n")


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
