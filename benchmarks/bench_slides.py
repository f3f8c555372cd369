"""Whole-slide cost ratios, measured in one run (CPU or GPU).

1. Reading vs encoding: tiles/s of the slide data path (read at the chosen pyramid
   level + resize + the encoder's transform, what ``jwth extract-slides`` does per
   tile) against tiles/s of the encoder forward pass on a batch. Ratio > 1 means
   reading is not the bottleneck (with ``--workers`` reader processes: ratio x workers
   is the upper bound of the parallel data path).
2. Peak memory against slide size: synthetic JPEG pyramids of growing size are tiled
   and every tile is read, each in a fresh process; its peak RSS is recorded. Flat
   peak memory over a 16x growth of the slide area means tiles are streamed.

Usage:
    python benchmarks/bench_slides.py [--encoder timm:vit_small_patch16_224] [--device auto]
        [--sizes 2048 4096 8192] [--batch 32] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_big_pyramid(path: Path, size: int, tile: int = 256, seed: int = 0) -> None:
    """A size x size JPEG pyramid (downsample 4) of tissue-like noise, written tile by tile."""
    import tifffile

    rng = np.random.default_rng(seed)
    base = np.array([170, 80, 150], np.int16)

    def tiles(n: int):
        for _ in range((n // tile) ** 2):
            t = base + rng.integers(-30, 30, size=(tile, tile, 1), dtype=np.int16)
            yield np.clip(t, 0, 255).astype(np.uint8)

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, n in enumerate((size, size // 4)):
            ds = size / n
            tw.write(tiles(n), shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                     photometric="rgb", resolution=(1e4 / (0.25 * ds),) * 2, resolutionunit="CENTIMETER",
                     subfiletype=1 if k else 0, metadata=None)


PEAK_SCRIPT = r"""
import json, sys, time
from jwth.wsi import open_slide, plan_tiles, iter_tiles

def status(key):  # VmRSS / VmHWM of this process in MB (VmHWM restarts at exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

path, tile = sys.argv[1], int(sys.argv[2])
with open_slide(path) as r:
    base = status("VmRSS")
    t0 = time.perf_counter()
    plan = plan_tiles(r, target_mpp=0.5, tile_size=tile, tissue="none")
    n = sum(1 for _ in iter_tiles(r, plan))
    dt = time.perf_counter() - t0
print(json.dumps({"tiles": n, "seconds": dt, "rss_before_mb": base, "peak_rss_mb": status("VmHWM")}))
"""


def reading_throughput(slide: Path, mpp: float | None, transform, tile_size: int, limit: int) -> dict:
    """Tiles/s of read + resize + transform over the first ``limit`` tissue tiles."""
    from PIL import Image

    from jwth.wsi import open_slide, plan_tiles, read_tile

    with open_slide(slide, mpp=mpp) as r:
        plan = plan_tiles(r, target_mpp=0.5, tile_size=tile_size)
        coords = plan.coords[:limit]
        t0 = time.perf_counter()
        tiles = [read_tile(r, plan, c) for c in coords]
        t1 = time.perf_counter()
        for t in tiles:
            transform(Image.fromarray(t))
        t2 = time.perf_counter()
    return {"slide": slide.name, "level": plan.level, "read_size": plan.read_size, "tiles": int(len(coords)),
            "read_tiles_per_s": len(coords) / (t1 - t0), "tiles_per_s": len(coords) / (t2 - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="timm:vit_small_patch16_224")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--limit", type=int, default=120, help="tiles read per real slide")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch

    from jwth.device import autocast, resolve_device
    from jwth.encoders import load_encoder
    from jwth.settings import data_root

    dev = resolve_device(a.device)
    enc = load_encoder(a.encoder, device=dev)
    res: dict = {"encoder": a.encoder, "device": str(dev), "torch_threads": torch.get_num_threads()}

    # 1. reading vs encoder forward
    wsi = data_root() / "wsi"
    reads = [reading_throughput(wsi / "CMU-1-Small-Region.svs", None, enc.transform, enc.input_size, a.limit),
             # no mpp in the file; 0.25 um/px makes 0.5 um/px tiles come from level 1 (the 40x -> 20x case)
             reading_throughput(wsi / "TCGA-CR-7395-01A-01-TS1.svs", 0.25, enc.transform, enc.input_size, a.limit)]
    x = torch.randn(a.batch, 3, enc.input_size, enc.input_size, device=dev)
    with torch.inference_mode(), autocast(dev):
        enc(x)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 5 or n < 2:
            enc(x)
            n += 1
        if dev.type == "cuda":
            torch.cuda.synchronize()
        fwd = n * a.batch / (time.perf_counter() - t0)
    res["read"] = reads
    res["encoder_tiles_per_s"] = fwd
    res["read_over_encode"] = {r["slide"]: r["tiles_per_s"] / fwd for r in reads}

    # 2. peak memory vs slide size (fresh process per slide)
    peaks = []
    with tempfile.TemporaryDirectory() as d:
        for s in a.sizes:
            p = Path(d) / f"synthetic_{s}.tif"
            write_big_pyramid(p, s)
            out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(p), str(enc.input_size)],
                                 capture_output=True, text=True, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            peaks.append({"size_px": s, "megapixels": s * s / 1e6, "file_mb": p.stat().st_size / 1e6, **rec})
    res["peak_memory"] = peaks
    res["peak_ratio_largest_over_smallest"] = peaks[-1]["peak_rss_mb"] / peaks[0]["peak_rss_mb"]
    res["area_ratio_largest_over_smallest"] = peaks[-1]["megapixels"] / peaks[0]["megapixels"]

    print(f"encoder {a.encoder} on {dev}: {fwd:.1f} tiles/s (batch {a.batch}, {enc.input_size} px)")
    for r in reads:
        print(f"{r['slide']} (level {r['level']}, read {r['read_size']} px): read {r['read_tiles_per_s']:.0f} tiles/s, "
              f"read + transform {r['tiles_per_s']:.1f} tiles/s -> read/encode ratio {r['tiles_per_s'] / fwd:.2f}")
    for p in peaks:
        print(f"slide {p['size_px']}x{p['size_px']} ({p['megapixels']:.0f} Mpx, {p['file_mb']:.1f} MB): "
              f"{p['tiles']} tiles, {p['tiles'] / p['seconds']:.0f} tiles/s, RSS {p['rss_before_mb']:.0f} MB "
              f"before tiling, peak {p['peak_rss_mb']:.0f} MB")
    print(f"peak memory ratio {res['peak_ratio_largest_over_smallest']:.2f} for a "
          f"{res['area_ratio_largest_over_smallest']:.0f}x larger slide")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
