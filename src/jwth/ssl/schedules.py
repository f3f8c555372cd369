"""Per-step schedules of self-supervised training: learning rate, weight decay, teacher
momentum and temperature, last-layer freezing (DINO, Caron et al. 2021, sec. 3 and app.;
DINOv2, Oquab et al. 2023, the lr scaling rules). Every schedule is an array with one value
per step of the whole run; warm-ups keep their configured length in steps whatever the run
length (a short run is cut off part-way up a ramp, never compressed)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["cosine_schedule", "teacher_temp_schedule", "phase_steps", "scaled_lr", "build_schedules"]


def cosine_schedule(base: float, final: float, total: int, warmup: int = 0, start_warmup: float = 0.0) -> np.ndarray:
    """Per-step values: linear warm-up start_warmup -> base over ``warmup`` steps, then
    half-cosine base -> final over the remaining steps (DINO, app. "schedules").

    The warm-up keeps its configured length in steps: a run shorter than the warm-up
    ends part-way up the ramp (it is cut off, never compressed into the run).

    Returns:
        float64 array of length ``total``.
    """
    warmup = max(int(warmup), 0)
    w = np.linspace(start_warmup, base, warmup, endpoint=False) if warmup else np.array([])
    n = max(total - warmup, 0)
    it = np.arange(n)
    c = final + 0.5 * (base - final) * (1 + np.cos(np.pi * it / max(n, 1)))
    return np.concatenate([w, c])[:total].astype(np.float64)


def teacher_temp_schedule(warm: float, final: float, warmup: int, total: int) -> np.ndarray:
    """Linear warm-up of tau_t from ``warm`` to ``final`` over ``warmup`` steps, then constant
    (DINO, sec. 3.1). The ramp keeps its slope (final - warm) / warmup whatever the run
    length: a run shorter than the warm-up is cut off part-way up the ramp."""
    warmup = max(int(warmup), 0)
    ramp = np.linspace(warm, final, warmup)
    return np.concatenate([ramp, np.full(max(total - warmup, 0), final)])[:total].astype(np.float64)


def phase_steps(cfg: dict, n_tiles: int, phase: str = "pretrain") -> tuple[int, int]:
    """(steps per epoch, total steps) of a phase."""
    o = cfg["optim"]
    spe = o.get("steps_per_epoch") or max(1, n_tiles // int(o["batch_size"]))
    epochs = cfg["posttrain"]["epochs"] if phase == "posttrain" else o["epochs"]
    return int(spe), int(math.ceil(float(epochs) * spe))


def scaled_lr(cfg: dict) -> float:
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
    lr = cosine_schedule(scaled_lr(cfg), float(o["min_lr"]), total, int(float(o["warmup_epochs"]) * steps_per_epoch))
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
