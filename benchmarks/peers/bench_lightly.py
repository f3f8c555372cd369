"""jwth's DINOv2 pretraining step against lightly's DINOv2 building blocks, timed in one run.

    pip install lightly          # optional: without it the script says so and exits 2
    python benchmarks/peers/bench_lightly.py [--steps 6] [--prototypes 65536,4096] [--jwth-precision fp32] [--data DIR]

Same model, crops and batch on both sides: timm ViT-S/16 (random init, no stochastic
depth), 2 x 224 px global + 8 x 96 px local crops, batch 16, one projection head of K
prototypes shared by DINO and iBOT, KoLeo on the class tokens, the prototype layer trained
from the first step on both sides. Precision: fp32 on both sides by default;
``--jwth-precision auto`` times jwth at its default (bf16 autocast where this CPU runs it
faster) against lightly's example as written (fp32).

1. jwth: ``jwth.ssl.train.train`` (the command ``jwth pretrain`` runs), its data
   pipeline (decode, multi-crop, stain augmentation) in the loop with 0 workers.
2. lightly: the training step of lightly's DINOv2 example (``examples/pytorch/dinov2.py``
   in the lightly repository): ``MaskedVisionTransformerTIMM`` teacher and student,
   ``DINOv2ProjectionHead``, ``DINOLoss``, ``IBOTPatchLoss``, ``KoLeoLoss``,
   ``random_block_mask``, AdamW with the cosine weight-decay schedule, and
   ``update_momentum`` -- fed by the same jwth data pipeline (same crops, same cost).

Each side's tiles/s is the median over ``--steps`` steps after one warm-up step.
Prints jwth / lightly tiles/s per prototype count (issue target: >= 1.1 at 65,536).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

DINOV2 = [
    "model.arch=vit_small_patch16_224", "model.drop_path_rate=0.0",
    "crops.global_crops_size=224", "crops.local_crops_size=96", "crops.local_crops_number=8",
    "optim.batch_size=16", "train.num_workers=0", "train.progress=false", "train.tensorboard=false",
    "train.checkpoint_every=1000000", "train.device=cpu",
    "optim.freeze_last_layer_epochs=0",  # as lightly's example: the prototype layer trains from step 1
]  # fmt: skip


def _jwth_tiles_per_s(data: Path, k: int, steps: int, precision: str) -> tuple[float, dict]:
    from jwth.ssl.config import load_config
    from jwth.ssl.train import train

    ov = DINOV2 + [f"train.precision={precision}", f"dino.head_n_prototypes={k}", f"ibot.head_n_prototypes={k}",
                   f"data.max_tiles={16 * (steps + 1)}", "optim.epochs=1"]
    cfg = load_config(overrides=ov)
    cfg["optim"]["steps_per_epoch"] = steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        r = train(cfg, data, Path(tmp) / "run")
    return statistics.median(row["tiles_per_s"] for row in r.losses[1:]), cfg


def _loader(cfg: dict, data: Path, steps: int):
    """jwth's multi-crop data pipeline over the same tiles, as (global (2B, ...), local (8B, ...)) batches."""
    from jwth.augment import StainAugmentConfig
    from jwth.ssl.data import SSLTileDataset, StepBatchSampler, list_images
    from jwth.ssl.multicrop import MultiCropAugmentation, MultiCropConfig

    cc, bs = cfg["crops"], int(cfg["optim"]["batch_size"])
    mc = MultiCropConfig(cc["global_crops_number"], cc["global_crops_size"], tuple(cc["global_crops_scale"]),
                         cc["local_crops_number"], cc["local_crops_size"], tuple(cc["local_crops_scale"]))  # fmt: skip
    aug = MultiCropAugmentation(mc, StainAugmentConfig.from_dict(cfg["stain"]), cfg["data"]["mean"], cfg["data"]["std"])
    ds = SSLTileDataset(list_images(data, bs * (steps + 1)), aug, 0)
    sampler = StepBatchSampler(len(ds), bs, 0, steps + 1, 0)
    for b in torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=0):
        g, loc = b["global"], b["local"]  # (B, V, 3, H, W)
        yield g.transpose(0, 1).reshape(-1, *g.shape[2:]), loc.transpose(0, 1).reshape(-1, *loc.shape[2:])


def _lightly_tiles_per_s(cfg: dict, data: Path, k: int, steps: int) -> float:
    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
    from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
    from lightly.models.utils import random_block_mask, update_momentum
    from lightly.utils.scheduler import cosine_schedule
    from timm.models.vision_transformer import vit_small_patch16_224

    torch.manual_seed(0)
    teacher = MaskedVisionTransformerTIMM(vit=vit_small_patch16_224(dynamic_img_size=True, drop_path_rate=0.0),
                                          antialias=False, pos_embed_initialization="skip")
    student = copy.deepcopy(teacher)
    head_s = DINOv2ProjectionHead(input_dim=384, output_dim=k)  # shared by DINO and iBOT, as in jwth
    head_t = DINOv2ProjectionHead(input_dim=384, output_dim=k)  # weight-normed: no deepcopy
    head_t.load_state_dict(head_s.state_dict())
    for m in (teacher, head_t):
        m.eval()
        for p in m.parameters():
            p.requires_grad = False
    dino, ibot, koleo = DINOLoss(output_dim=k), IBOTPatchLoss(output_dim=k), KoLeoLoss()
    opt = torch.optim.AdamW(list(student.parameters()) + list(head_s.parameters()), lr=1e-3)
    bs = int(cfg["optim"]["batch_size"])
    H, W = teacher.vit.patch_embed.grid_size
    times = []
    it = _loader(cfg, data, steps)
    for step in range(steps + 1):
        t0 = time.perf_counter()
        xg, xl = next(it)
        B = len(xg)
        block = random_block_mask(size=(B, H, W))
        mask = xg.new_zeros((B, teacher.sequence_length), dtype=torch.bool)
        mask[:, 1:] = block.flatten(start_dim=1)
        with torch.no_grad():
            tf = teacher.encode(xg)
            t_cls, t_masked = head_t(tf[:, 0]), head_t(tf[mask])
        sf = student.encode(xg, mask=mask)
        s_cls_g, s_masked = head_s(sf[:, 0]), head_s(sf[mask])
        s_cls_l = head_s(student.encode(xl)[:, 0])
        s_cls = torch.cat([s_cls_g, s_cls_l])
        loss = (dino(teacher_out=list(t_cls.chunk(2)), student_out=list(s_cls.chunk(2 + len(xl) // bs)),
                     teacher_temp=0.04)
                + ibot(teacher_out=t_masked, student_out=s_masked, mask=block, teacher_temp=0.04)
                + 0.1 * sum(koleo(t) for t in sf[:, 0].chunk(2)))
        loss.backward()
        wd = cosine_schedule(step=step, max_steps=steps + 1, start_value=0.04, end_value=0.4)
        for group in opt.param_groups:
            group["weight_decay"] = wd
        opt.step()
        opt.zero_grad()
        mom = cosine_schedule(step=step, max_steps=steps + 1, start_value=0.992, end_value=1.0)
        update_momentum(student, teacher, m=mom)
        update_momentum(head_s, head_t, m=mom)
        times.append(time.perf_counter() - t0)
    return bs / statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="tile folder (default: tcga_crc_msi under the data root)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prototypes", default="65536,4096")
    ap.add_argument("--jwth-precision", default="fp32", choices=["fp32", "auto", "bf16"],
                    help="jwth's precision (fp32: like for like; auto: jwth's default, bf16 autocast where "
                         "this CPU runs it faster); lightly's example always runs fp32")
    a = ap.parse_args()
    try:
        import lightly
    except ImportError:
        print("lightly is not installed: `pip install lightly` to time it against jwth.", file=sys.stderr)
        raise SystemExit(2) from None
    if a.data:
        data = Path(a.data)
    else:
        from jwth.settings import data_root

        data = data_root() / "tcga_crc_msi"
    from jwth.device import dtype_name, resolve_precision

    jp = dtype_name(resolve_precision(torch.device("cpu"), a.jwth_precision))
    print(f"lightly {lightly.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"jwth {jp} (train.precision={a.jwth_precision}), lightly float32; "
          f"ViT-S/16, 2 x 224 + 8 x 96 px crops, batch 16, {a.steps} timed steps each")
    print("| prototypes (shared DINO / iBOT head) | jwth tiles/s | lightly tiles/s | jwth / lightly | target |")
    print("| --- | --- | --- | --- | --- |")
    for k in (int(x) for x in a.prototypes.split(",")):
        j, cfg = _jwth_tiles_per_s(data, k, a.steps, a.jwth_precision)
        lt = _lightly_tiles_per_s(cfg, data, k, a.steps)
        print(f"| {k:,} | {j:.2f} | {lt:.2f} | {j / lt:.2f} | {'>= 1.1' if k == 65536 else '—'} |", flush=True)


if __name__ == "__main__":
    main()
