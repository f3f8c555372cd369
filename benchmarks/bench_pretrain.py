"""Pretraining cost ratios, measured in one run (CPU or GPU).

1. SSL step vs bare timm step: tiles/s of `jwth.ssl.train.train` (teacher forward,
   student forward on all crops, DINO + iBOT + KoLeo, backward, AdamW, EMA, with the
   data pipeline in the loop) against a bare timm training step of the same backbone on
   the same crops (forward of the global + local crops, mean-of-class-token loss,
   backward, AdamW), both at the same precision (``train.precision``; ``auto`` picks
   bf16 autocast where this CPU runs it faster, so pass ``train.precision=fp32`` for an
   fp32 comparison). Also the data pipeline alone (decode + multi-crop + stain).
2. Stain augmentation per tile vs JPEG decoding of the same tile.
3. With ``--phases``: the SSL step's wall time per phase (data, teacher, student
   backbone, heads, losses, backward, gradient clipping, optimizer, EMA, bookkeeping;
   medians over the timed steps, ``jwth.ssl.profile``), as milliseconds and shares.

Usage:
    python benchmarks/bench_pretrain.py [--data DIR] [--steps 6] [--phases] [--out results.json]
        [key=value ...]   # pretraining config overrides (default: ViT-Ti/16, 96/48 px crops)

DINOv2's configuration in fp32 (issue: SSL / bare <= 1.6 at 65,536 prototypes):
    python benchmarks/bench_pretrain.py --phases train.precision=fp32 model.arch=vit_small_patch16_224 \
        crops.global_crops_size=224 crops.local_crops_size=96 crops.local_crops_number=8 \
        dino.head_n_prototypes=65536 ibot.head_n_prototypes=65536
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

DEFAULT = [
    "model.arch=vit_tiny_patch16_224", "model.drop_path_rate=0.0",
    "crops.global_crops_size=96", "crops.local_crops_size=48", "crops.local_crops_number=4",
    "dino.head_n_prototypes=4096", "ibot.head_n_prototypes=4096",
    "optim.batch_size=16", "train.num_workers=0", "train.progress=false", "train.tensorboard=false",
    "train.checkpoint_every=1000000", "train.device=cpu",
    "optim.freeze_last_layer_epochs=0",  # steady state: the prototype layer trains (it is frozen in epoch 1 only)
]  # fmt: skip


def _data_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from jwth.settings import data_root

    return data_root() / "tcga_crc_msi"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None)
    ap.add_argument("--phases", action="store_true", help="time each phase of the SSL step")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    from jwth.augment import StainAugmentConfig, stain_augment
    from jwth.device import autocast, dtype_name, resolve_precision
    from jwth.ssl.config import load_config
    from jwth.ssl.data import SSLTileDataset, StepBatchSampler, list_images, load_uint8
    from jwth.ssl.model import build_network
    from jwth.ssl.multicrop import MultiCropAugmentation, MultiCropConfig
    from jwth.ssl.train import train

    data = _data_dir(a.data)
    ov = DEFAULT + list(a.overrides) + (["train.profile_phases=true"] if a.phases else [])
    bs = int(load_config(overrides=ov)["optim"]["batch_size"])
    ov += [f"data.max_tiles={bs * (a.steps + 1)}", "optim.epochs=1"]
    cfg = load_config(overrides=ov)
    precision = cfg["train"].get("precision", "auto")
    res: dict = {"config_overrides": ov, "torch_threads": torch.get_num_threads(), "device": "cpu",
                 "precision": dtype_name(resolve_precision(torch.device("cpu"), precision))}

    # 1a. full SSL training steps (first step = warm-up, excluded)
    with tempfile.TemporaryDirectory() as tmp:
        cfg["optim"]["steps_per_epoch"] = a.steps + 1
        r = train(cfg, data, Path(tmp) / "run")
        if a.phases:
            res["phases"] = json.loads((Path(tmp) / "run" / "profile.json").read_text())
    ssl_tps = statistics.median(row["tiles_per_s"] for row in r.losses[1:])
    res["ssl_train_tiles_per_s"] = ssl_tps

    # 1b. data pipeline alone, and the crops for the bare step
    cc = cfg["crops"]
    mc = MultiCropConfig(cc["global_crops_number"], cc["global_crops_size"], tuple(cc["global_crops_scale"]),
                         cc["local_crops_number"], cc["local_crops_size"], tuple(cc["local_crops_scale"]))  # fmt: skip
    aug = MultiCropAugmentation(mc, StainAugmentConfig.from_dict(cfg["stain"]), cfg["data"]["mean"], cfg["data"]["std"])
    ds = SSLTileDataset(list_images(data, bs * 2), aug, 0)
    sampler = StepBatchSampler(len(ds), bs, 0, 2, 0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=0)
    t0 = time.perf_counter()
    batches = list(loader)
    res["data_pipeline_tiles_per_s"] = 2 * bs / (time.perf_counter() - t0)

    # 1c. bare timm training step on the same crops
    torch.manual_seed(0)
    net, _ = build_network(cfg)
    bb = net.backbone.train()
    opt = torch.optim.AdamW(bb.parameters(), lr=1e-4)
    b = batches[0]
    xg = b["global"].transpose(0, 1).reshape(-1, *b["global"].shape[2:])
    xl = b["local"].transpose(0, 1).reshape(-1, *b["local"].shape[2:])
    times = []
    for i in range(a.steps + 1):
        t0 = time.perf_counter()
        with autocast("cpu", precision):  # the SSL step's precision: like for like
            loss = bb.forward_features(xg)[:, 0].mean() + bb.forward_features(xl)[:, 0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    bare_tps = bs / statistics.median(times[1:])
    res["bare_timm_step_tiles_per_s"] = bare_tps
    res["ssl_over_bare_time_ratio"] = bare_tps / ssl_tps

    # 2. stain augmentation vs JPEG decoding, per 224 px tile
    paths = list_images(data, 32)
    t0 = time.perf_counter()
    imgs = [load_uint8(p) for p in paths]
    dec = (time.perf_counter() - t0) / len(paths)
    x = torch.stack(imgs)
    g = torch.Generator().manual_seed(0)
    cfg_all = StainAugmentConfig(p_lab=1.0, p_hsv=1.0, p_hed=1.0)
    stain_augment(x[:2], cfg_all, g)
    t0 = time.perf_counter()
    for i in range(0, len(x), 8):
        stain_augment(x[i : i + 8], cfg_all, g)
    st = (time.perf_counter() - t0) / len(x)
    res["jpeg_decode_ms_per_tile"] = dec * 1e3
    res["stain_augment_ms_per_tile_all_three"] = st * 1e3
    res["stain_over_decode_ratio"] = st / dec
    res["tile_px"] = list(x.shape[-2:])
    print(json.dumps(res, indent=2))
    if a.phases:
        print("\n| phase | ms per step (median) | share |\n| --- | --- | --- |")
        for name, v in res["phases"]["phases"].items():
            print(f"| {name} | {v['median_ms']:.1f} | {100 * v['share']:.1f} % |")
        print(f"| step (sum) | {res['phases']['step_ms']:.1f} | |")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
