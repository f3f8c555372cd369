"""Cost of the JWTH attention head against the linear probe at slide scale, measured in one run.

    python benchmarks/bench_slide_scale.py [--tiles 1,10,100,1000,10000,100000] [--out bench.json]

For each number of tiles per slide and each head (linear probe on the class token;
JWTH attention head on class + patch tokens, ViT-S/16 shapes: D = 384, N = 196 patch
tokens, H = 8 heads), one fresh subprocess streams the slide's tokens through the
head in chunks of ``--chunk`` tiles, as ``jwth extract-slides --head`` does, and reports:

- inference time of the head alone: CPU time of the thread (robust to other jobs on a
  shared machine) and wall time;
- peak memory of the streaming pass: the process's peak RSS (``resource.ru_maxrss``)
  minus its RSS before the pass.

Tokens are simulated: one chunk of random tokens is drawn once and fed again for every
chunk (a head's cost does not depend on the values). Also measured in the same run:
the encoder forward per tile (real ViT-S/16, random weights) for the ratio head /
encoder, and bytes per tile on disk of (a) the token cache of a slide (fp16 class +
patch tokens, HDF5, as ``--save-patch-tokens``) and (b) the fused mode's file
(``--head``: [class token, pooled] fp32 + attention (H, N) fp16 + probabilities),
both written for ``--disk-tiles`` tiles and divided by the tile count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

D, N, H, C = 384, 196, 8, 2


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def worker(head_name: str, n_tiles: int, chunk: int) -> dict:
    """Stream ``n_tiles`` tiles of simulated tokens through one head; time and peak memory."""
    import torch

    from jwth.heads import build_head
    from jwth.heads.checkpoint import pool_with_head

    torch.manual_seed(0)
    head = build_head(head_name, D, C, num_heads=H).eval()
    b = min(chunk, n_tiles)
    cls = torch.randn(b, D)
    patches = torch.randn(b, N, D) if head_name == "attention" else None
    base = _rss_kb()
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    with torch.inference_mode():
        done = 0
        while done < n_tiles:
            k = min(b, n_tiles - done)
            if head_name == "attention":
                pool_with_head(head, cls[:k], patches[:k])
            else:
                head(cls[:k]).softmax(-1)
            done += k
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"head": head_name, "n_tiles": n_tiles, "cpu_s": cpu, "wall_s": wall,
            "peak_extra_mib": max(peak - base, 0) / 1024, "input_mib": (cls.nbytes + (patches.nbytes if patches is not None else 0)) / 2**20}


def encoder_per_tile(n: int = 8) -> float:
    """CPU seconds per tile of a ViT-S/16 forward at 224 px (batch ``n``, after one warm-up)."""
    import torch

    from jwth.encoders import load_encoder

    enc = load_encoder("timm:vit_small_patch16_224")
    x = torch.randn(n, 3, 224, 224)
    enc(x[:1])
    t = time.thread_time()
    enc(x)
    return (time.thread_time() - t) / n


def disk_bytes_per_tile(n: int) -> dict:
    """Bytes per tile of the two slide files, written for ``n`` tiles with the layouts of jwth.wsi.extract."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        tok = Path(d) / "tokens.h5"
        with h5py.File(tok, "w") as f:  # what --save-patch-tokens adds to a cls file
            f.create_dataset("features", data=rng.standard_normal((n, D), dtype=np.float32))
            p = f.create_dataset("patch_tokens", shape=(n, N, D), dtype="float16", chunks=(1, N, D))
            block = rng.standard_normal((min(n, 256), N, D)).astype(np.float16)
            for s in range(0, n, len(block)):
                p[s : s + len(block)] = block[: n - s]
            f.create_dataset("coords", data=np.zeros((n, 2), np.int64))
        fused = Path(d) / "fused.h5"
        with h5py.File(fused, "w") as f:  # what --head writes
            f.create_dataset("features", data=rng.standard_normal((n, 2 * D), dtype=np.float32))
            f.create_dataset("attention", data=rng.random((n, H, N)).astype(np.float16), chunks=(max(1, 4096 // N), H, N))
            f.create_dataset("probs", data=rng.random((n, C), dtype=np.float32))
            f.create_dataset("coords", data=np.zeros((n, 2), np.int64))
        out["token_cache"] = tok.stat().st_size / n
        out["fused_head"] = fused.stat().st_size / n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", default="1,10,100,1000,10000,100000")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--disk-tiles", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None, help="Also write the measurements as JSON.")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], int(a.worker[1]), int(a.worker[2]))))
        return
    import torch

    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rows = []
    for n in [int(x) for x in a.tiles.split(",")]:
        for h in ("linear", "attention"):
            r = subprocess.run([sys.executable, __file__, "--worker", h, str(n), str(a.chunk)], env=env,
                               capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    enc_s = encoder_per_tile()
    disk = disk_bytes_per_tile(a.disk_tiles)
    res = {"rows": rows, "encoder_cpu_s_per_tile": enc_s, "disk_bytes_per_tile": disk, "chunk": a.chunk,
           "shapes": {"D": D, "N": N, "H": H, "C": C}, "torch_threads": 1}
    print("\n| tiles / slide | linear: CPU s | attention: CPU s | ratio | attention: wall s | peak extra MiB "
          "(linear / attention) | token cache (fp16) | fused --head file |")
    print("|---|---|---|---|---|---|---|---|")
    by = {(r["head"], r["n_tiles"]): r for r in rows}
    for n in sorted({r["n_tiles"] for r in rows}):
        li, at = by[("linear", n)], by[("attention", n)]
        print(f"| {n:,} | {li['cpu_s']:.4f} | {at['cpu_s']:.3f} | {at['cpu_s'] / max(li['cpu_s'], 1e-9):.0f} | "
              f"{at['wall_s']:.2f} | {li['peak_extra_mib']:.0f} / {at['peak_extra_mib']:.0f} | "
              f"{n * disk['token_cache'] / 2**20:,.1f} MiB | {n * disk['fused_head'] / 2**20:,.2f} MiB |")
    big = max(r["n_tiles"] for r in rows)
    at = by[("attention", big)]
    print(f"\nencoder forward: {enc_s:.3f} CPU s/tile; attention head: {at['cpu_s'] / big * 1e3:.3f} CPU ms/tile "
          f"= {at['cpu_s'] / big / enc_s:.4f} of the encoder")
    print(f"disk bytes/tile: token cache {disk['token_cache']:,.0f}, fused head {disk['fused_head']:,.0f} "
          f"(ratio {disk['token_cache'] / disk['fused_head']:.1f})")
    if a.out:
        a.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
