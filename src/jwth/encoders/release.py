"""Releasing an encoder with the package as ``jwth:<name>``: fp16 weights, config, model card.

A release is a folder under the package's ``checkpoints/`` (``jwth.encoders.CHECKPOINT_DIR``)
holding ``model.safetensors`` (float16), ``config.json`` (timm's layout, as written by
:func:`jwth.encoders.save_encoder_checkpoint`), ``MODEL_CARD.md`` and the training curves.
:func:`release_encoder` writes it from an exported encoder folder and the evidence of how it
was made (pretraining run, progress per session, diagnostics, probe and compare runs), and
checks that the released weights load and give the same tokens as the source.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: largest released weights file (bytes): the package must stay small enough to install anywhere
MAX_RELEASE_BYTES = 25_000_000


@dataclass
class ReleaseEvidence:
    """What the model card reports, each item optional except the pretraining run.

    Attributes:
        run: pretraining run folder (``config.yaml``, ``losses.csv``, ``monitor.csv``).
        commands: the exact commands that made the encoder, in order.
        progress: ``PROGRESS.json`` (steps and wall time per process, i.e. per session).
        curves: PNG of losses and monitor (``jwth plot-losses``), copied beside the card.
        diagnose: ``{label: folder}`` of ``jwth diagnose`` outputs (``metrics.json``).
        probes: ``{label: folder}`` of probe runs (``results.json``).
        compares: ``{label: folder}`` of ``jwth compare --out`` folders (``compare.md``).
        hardware: one line on the machines used.
        data: one paragraph on the training data.
        notes: free text appended (limits, what is not known).
    """

    run: Path
    commands: list[str] = field(default_factory=list)
    progress: Path | None = None
    curves: Path | None = None
    diagnose: dict[str, Path] = field(default_factory=dict)
    probes: dict[str, Path] = field(default_factory=dict)
    compares: dict[str, Path] = field(default_factory=dict)
    hardware: str = ""
    data: str = ""
    notes: str = ""


def _fp16_copy(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(src))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(dst))


def _progress_lines(progress: Path) -> list[str]:
    p = json.loads(Path(progress).read_text())
    lines = ["| process | steps | wall time (min) |", "| --- | --- | --- |"]
    total = 0.0
    for i, s in enumerate(p.get("segments", []), 1):
        lines.append(f"| {i} | {s['from_step']:,}-{s['to_step']:,} | {s['wall_min']:.1f} |")
        total += float(s["wall_min"])
    lines.append(f"| all | {p.get('steps_done', 0):,} steps | {total:.1f} ({total / 60:.1f} h) |")
    return lines


def _diagnose_lines(metrics_file: Path) -> list[str]:
    """A table of ``jwth diagnose``'s metrics per encoder (the Gram spectrum stays in metrics.json)."""
    enc = json.loads(Path(metrics_file).read_text()).get("encoders", {})

    def num(m: dict, *keys) -> str:
        v = m
        for k in keys:
            v = v.get(k, {}) if isinstance(v, dict) else {}
        return f"{v:.3f}" if isinstance(v, (int, float)) else "—"

    head = ("| encoder | effective rank per tile | pooled effective rank | patch cosine | class-token displacement "
            "under stain shift 1 / 2 |")
    lines = [head, "| --- | --- | --- | --- | --- |"]
    for label, m in enc.items():
        lines.append(f"| {label} | {num(m, 'effective_rank_per_tile')} | {num(m, 'effective_rank_pooled')} | "
                     f"{num(m, 'mean_pairwise_cosine')} | {num(m, 'class_token_stain_displacement', '1', 'relative')} / "
                     f"{num(m, 'class_token_stain_displacement', '2', 'relative')} |")
    return lines + ["", f"Full metrics (and the Gram spectrum): `{Path(metrics_file).name}` of `jwth diagnose`."]


def _probe_lines(label: str, folder: Path) -> list[str]:
    from jwth.eval.report import results_table

    res = json.loads((Path(folder) / "results.json").read_text())
    sp = res["split"]
    split = (f"site split, test sites {', '.join(sp.get('test_sites') or [])}" if sp["kind"] == "site"
             else f"patient split ({sp['folds']} folds)")
    return [f"### {label}", "", f"{res.get('n_tiles')} tiles, {res.get('n_patients')} patients, {split}.", "",
            results_table(res), ""]


def model_card(name: str, config: dict, ev: ReleaseEvidence) -> str:
    """The Markdown model card of a release (see :class:`ReleaseEvidence` for the inputs)."""
    import yaml

    jw = config.get("jwth", {})
    arch = config.get("architecture", "?")
    size = config.get("pretrained_cfg", {}).get("input_size", [3, "?", "?"])[-1]
    made = jw.get("source", "jwth pretrain")
    steps = f", {jw['trained_steps']:,} steps" if isinstance(jw.get("trained_steps"), int) else ""
    out = [f"# jwth:{name}", "",
           f"A `{arch}` ({config.get('model_args', {})}) trained by {made}{steps} with jwth's self-supervised "
           f"recipe (DINO + iBOT + KoLeo, EMA teacher, stain augmentation"
           + ("; then Gram anchoring" if "posttrain" in made else "") + f"). Input {size} px"
           + (f" at {jw['mpp']} µm/px" if jw.get("mpp") else "") + "; float16 weights; load with "
           f"`jwth.encoders.load_encoder('jwth:{name}')` or `--encoder jwth:{name}`.", ""]
    if ev.data:
        out += ["## Data", "", ev.data, ""]
    if ev.commands:
        out += ["## How it was made", "", "```bash", *ev.commands, "```", ""]
    if ev.hardware:
        out += ["## Hardware", "", ev.hardware, ""]
    if ev.progress and Path(ev.progress).is_file():
        out += ["## Wall time per session", "", *_progress_lines(ev.progress), ""]
    if ev.curves and Path(ev.curves).is_file():
        out += ["## Loss and monitor curves", "", "![curves](curves.png)", ""]
    for label, folder in ev.diagnose.items():
        out += [f"## Diagnostics: {label}", "", *_diagnose_lines(Path(folder) / "metrics.json"), ""]
    if ev.probes:
        out += ["## Probe results", ""]
        for label, folder in ev.probes.items():
            out += _probe_lines(label, folder)
    for label, folder in ev.compares.items():
        out += [f"## {label}", "", (Path(folder) / "compare.md").read_text().strip(), ""]
    cfg_file = Path(ev.run) / "config.yaml"
    if cfg_file.is_file():
        cfg = yaml.safe_load(cfg_file.read_text())
        out += ["## Pretraining configuration", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    if ev.notes:
        out += ["## Notes", "", ev.notes, ""]
    return "\n".join(out)


def release_encoder(encoder_dir: str | Path, name: str, evidence: ReleaseEvidence, dest_root: str | Path | None = None,
                    overwrite: bool = False) -> Path:
    """Write ``<dest_root>/<name>/`` (default: the package's checkpoints/) from an encoder folder.

    Args:
        encoder_dir: a checkpoint folder (``config.json`` + ``model.safetensors``), e.g. a
            pretraining run's ``encoder/`` or ``jwth posttrain``'s output.
        name: release name, used as ``jwth:<name>`` (letters, digits, ``-``, ``_``, ``.``).
        evidence: what the model card reports.
        overwrite: replace an existing release of that name.

    Returns:
        The release folder.

    Raises:
        ValueError: a bad name, weights over :data:`MAX_RELEASE_BYTES` as float16, or
            released tokens that differ from the source's by more than float16 rounding.
        FileExistsError: the release exists and ``overwrite`` is false.
        FileNotFoundError: ``encoder_dir`` is not a checkpoint folder.
    """
    import re

    from jwth.encoders import CHECKPOINT_DIR, load_encoder

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"Release name {name!r}: use letters, digits, '-', '_' and '.' (it becomes jwth:{name}).")
    src = Path(encoder_dir)
    if not (src / "config.json").is_file() or not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"{src} is not a checkpoint folder (config.json + model.safetensors).")
    dest = Path(dest_root or CHECKPOINT_DIR) / name
    if dest.exists() and not overwrite:
        raise FileExistsError(f"Release {dest} exists; pass overwrite=True (--overwrite) to replace it.")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _fp16_copy(src / "model.safetensors", tmp / "model.safetensors")
        size = (tmp / "model.safetensors").stat().st_size
        if size > MAX_RELEASE_BYTES:
            raise ValueError(f"{src}: float16 weights are {size / 1e6:.1f} MB, over the {MAX_RELEASE_BYTES / 1e6:.0f} MB "
                             "a packaged release may take; release a smaller model or host the weights elsewhere.")
        config = json.loads((src / "config.json").read_text())
        config.setdefault("jwth", {})["dtype"] = "float16"  # what the released file holds
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        _check_same_tokens(load_encoder(str(src)), load_encoder(str(tmp)), src)
        if evidence.curves and Path(evidence.curves).is_file():
            shutil.copy(evidence.curves, tmp / "curves.png")
        (tmp / "MODEL_CARD.md").write_text(model_card(name, config, evidence))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@torch.no_grad()
def _check_same_tokens(a, b, src: Path, tol: float = 2e-2) -> None:
    """Class and patch tokens of the source and the release agree to float16 rounding."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, a.input_size, a.input_size, generator=g)
    ta, tb = a(x), b(x)
    for part in ("cls", "patches"):
        u, v = getattr(ta, part).float(), getattr(tb, part).float()
        err = float((u - v).abs().max() / u.abs().max().clamp_min(1e-6))
        if not math.isfinite(err) or err > tol:  # NaN / inf: float16 overflowed
            raise ValueError(f"Released weights of {src} give other {part} tokens (max relative error {err:.3g}).")


__all__ = ["MAX_RELEASE_BYTES", "ReleaseEvidence", "model_card", "release_encoder"]
