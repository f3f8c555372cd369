"""Benchmarks of the frozen-encoder probe path, printed as ratios measured in one run.

    python benchmarks/bench_probe.py [--encoder SPEC] [--tiles 256]

1. extraction throughput / bare encoder forward on the same tiles   (target >= 0.9)
2. head training wall time, attention / linear, same cached tokens  (target <= 2)
3. attention-pooling inference per tile / encoder forward per tile
4. cache bytes per tile, and peak memory of a streaming pass over caches of
   two sizes (the peak must not grow with the cache: ratio ~ 1)
5. a whole `jwth probe` run with a cold cache (extraction, heads with early stopping,
   bootstrap CIs, baselines, report), linear + attention / linear only, same tiles
   (``--whole-tiles-per-patient`` of every patient)                     (target <= 1.2);
   and a reference run without early stopping and with fp32 token products

    python benchmarks/bench_probe.py --only 5    # the whole-run ratio alone
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from jwth.cache import TokenCache
from jwth.cache.extract import extract_tokens
from jwth.data.tiles import load_tile, read_labels
from jwth.device import autocast
from jwth.encoders import DEFAULT_ENCODER, load_encoder
from jwth.eval.probe import load_features
from jwth.eval.train import HeadTrainConfig, fit_head
from jwth.heads import build_head
from jwth.settings import dataset_dir


def _timeit(fn, repeat=1):
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def _stream_pass(folder: str, q) -> None:
    """One inference pass of an attention head over a cache, streamed in batches of 256.

    Reports the peak of memory allocated through Python/numpy (tracemalloc) during the
    pass -- the token arrays read from HDF5 -- and the process's peak RSS.
    """
    import tracemalloc

    head = build_head("attention", 384, 2).eval()
    c = TokenCache.open(folder)
    tracemalloc.start()
    with torch.no_grad():
        for _, cls, patches in c.iter_batches(256):
            head(torch.from_numpy(cls), torch.from_numpy(patches))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    q.put((peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def _synthetic_cache(folder: Path, n: int, N: int = 196, D: int = 384) -> int:
    tiles = pd.DataFrame({"path": [f"t{i}" for i in range(n)], "label": ["a", "b"] * (n // 2),
                          "patient_id": [f"p{i // 4}" for i in range(n)], "site": ["s"] * n})
    ident = {"format": 1, "encoder_spec": "synthetic", "weights_hash": "0", "transform": {}, "dtype": "float16",
             "tiles_hash": str(n), "store_patches": True}
    c = TokenCache.create_or_resume(folder, ident, tiles, D, 0, N, (14, 14))
    rng = np.random.default_rng(0)
    for s in range(0, n, 512):
        idx = np.arange(s, min(n, s + 512))
        c.write(idx, rng.standard_normal((len(idx), D), np.float32), None,
                rng.standard_normal((len(idx), N, D), np.float32))
    c.close()
    return sum(f.stat().st_size for f in folder.iterdir())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default=DEFAULT_ENCODER)
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--whole-tiles-per-patient", type=int, default=5)
    ap.add_argument("--only", type=int, choices=[1, 2, 3, 4, 5], help="run one section (5 needs none of 1-4)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.only == 5:
        whole_run(args.encoder, args.whole_tiles_per_patient)
        return
    table = read_labels(dataset_dir("tcga_crc_msi"))
    step = max(1, len(table) // args.tiles)  # evenly spaced: both classes (the file is sorted by label)
    table = table.subset((np.arange(len(table)) % step == 0) & (np.arange(len(table)) < step * args.tiles))
    enc = load_encoder(args.encoder)
    print(f"encoder {args.encoder}, {args.tiles} real tiles, torch {torch.__version__}, threads {torch.get_num_threads()}")

    # 1. bare forward on pre-decoded tensors vs the full extraction path (decode + forward + fp16 write)
    x = torch.stack([enc.transform(load_tile(table.root / p)[0]) for p in table.df["path"]])

    def bare():
        with torch.inference_mode(), autocast("cpu"):
            for s in range(0, len(x), args.batch_size):
                enc(x[s : s + args.batch_size])

    bare()  # warm-up
    t_bare = _timeit(bare)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        cache = extract_tokens(enc, table, Path(d) / "c", batch_size=args.batch_size, num_workers=1, quiet=True)
        t_ext = time.perf_counter() - t0
        bytes_per_tile = cache.nbytes_per_tile
        feats = load_features(cache, {"raw", "normalized"})
        cache.close()
    n = len(table)
    print(f"[1] bare forward {n / t_bare:.1f} tiles/s; extraction {n / t_ext:.1f} tiles/s; "
          f"ratio extraction/bare = {t_bare / t_ext:.2f} (target >= 0.9)")

    # 2. head training, same tokens, same epochs
    y = table.y
    cfg = HeadTrainConfig(epochs=3)
    idx = np.arange(n)
    D = enc.embed_dim
    t_lin = _timeit(lambda: fit_head(build_head("linear", D, 2), feats, y, idx, cfg, 1e-3, 1e-4, 2))
    t_att = _timeit(lambda: fit_head(build_head("attention", D, 2), feats, y, idx, cfg, 1e-3, 1e-4, 2))
    print(f"[2] head training: linear {t_lin:.2f} s, attention {t_att:.2f} s; ratio attention/linear = "
          f"{t_att / t_lin:.2f} (target <= 2)")

    # 3. attention pooling inference per tile vs encoder forward per tile
    head = build_head("attention", D, 2).eval()
    with torch.no_grad():
        head(feats.cls[:8], feats.patches[:8].float())
        t_pool = _timeit(lambda: head(feats.cls, feats.patches.float()), repeat=3)
    print(f"[3] attention pooling {1e3 * t_pool / n:.3f} ms/tile vs encoder forward {1e3 * t_bare / n:.2f} ms/tile; "
          f"ratio = {t_pool / t_bare:.4f}")

    # 4. cache size and streaming peak memory
    with tempfile.TemporaryDirectory() as d:
        sizes, peaks = [], []
        for n_tiles in (1024, 4096):
            folder = Path(d) / f"c{n_tiles}"
            sizes.append(_synthetic_cache(folder, n_tiles))
            q = mp.get_context("spawn").Queue()
            p = mp.get_context("spawn").Process(target=_stream_pass, args=(str(folder), q))
            p.start()
            peaks.append(q.get())
            p.join()
    print(f"[4] cache {bytes_per_tile} bytes/tile ({bytes_per_tile / 2**20:.3f} MiB). Streaming pass (batches of "
          f"256): peak token memory {peaks[0][0] / 2**20:.0f} MiB (RSS {peaks[0][1] / 2**20:.0f} MiB) over a "
          f"{sizes[0] / 2**20:.0f} MiB cache, {peaks[1][0] / 2**20:.0f} MiB (RSS {peaks[1][1] / 2**20:.0f} MiB) over a "
          f"{sizes[1] / 2**20:.0f} MiB cache; peak ratio large/small = {peaks[1][0] / max(peaks[0][0], 1):.2f} "
          f"for a {sizes[1] / sizes[0]:.1f}x larger cache")
    if args.only is None:
        whole_run(args.encoder, args.whole_tiles_per_patient)


def whole_run(encoder: str, per_patient: int) -> None:
    """[5] Wall time of whole cold `jwth probe` runs (as the CLI runs them), both heads vs linear only."""
    from jwth.eval.benchmark import cap_tiles
    from jwth.eval.probe import ProbeConfig
    from jwth.eval.run import RunConfig, probe_run

    data = dataset_dir("tcga_crc_msi")
    df = pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False)
    df = df[cap_tiles(df, per_patient)].copy()
    df["path"] = [str(data / p) for p in df["path"]]
    for p in df["path"]:  # the same page cache for both runs: read every tile once beforehand
        Path(p).read_bytes()
    wall, res = {}, {}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "data").mkdir()
        df.to_csv(Path(d) / "data" / "labels.csv", index=False)
        runs = {"linear": (["linear"], HeadTrainConfig()),
                "linear+attention": (["linear", "attention"], HeadTrainConfig()),
                # reference: no early stopping, fp32 token products (the protocol before both were added)
                "reference": (["linear", "attention"], HeadTrainConfig(patience=0, token_precision="fp32"))}
        for name, (heads, train) in runs.items():
            t0 = time.perf_counter()
            res[name] = probe_run(RunConfig(data=str(Path(d) / "data"), encoder=encoder, out=str(Path(d) / name),
                                            probe=ProbeConfig(heads=heads, positive_class="MSIMUT", train=train)),
                                  quiet=True)
            wall[name] = time.perf_counter() - t0
    lin, both = wall["linear"], wall["linear+attention"]
    r = res["linear+attention"]
    print(f"[5] whole cold `jwth probe` run, {r['n_tiles']} tiles of {r['n_patients']} patients ({per_patient} per "
          f"patient), 5-fold patient CV, 1,000 bootstraps, head token products in {r.get('head_token_dtype')}: "
          f"linear + attention {both:.1f} s (extraction {r['timing_seconds'].get('extract', float('nan')):.1f} s, "
          f"attention training {r['heads']['attention']['train_seconds']:.1f} s), linear only {lin:.1f} s; "
          f"ratio = {both / lin:.2f} (target <= 1.2). Tile BACC: linear "
          f"{r['heads']['linear']['tile']['bacc']:.3f}, attention {r['heads']['attention']['tile']['bacc']:.3f}")
    ref = res["reference"]
    print(f"    reference without early stopping, fp32 token products: {wall['reference']:.1f} s (attention "
          f"training {ref['heads']['attention']['train_seconds']:.1f} s), ratio to linear only = "
          f"{wall['reference'] / lin:.2f}; tile BACC linear {ref['heads']['linear']['tile']['bacc']:.3f}, attention "
          f"{ref['heads']['attention']['tile']['bacc']:.3f}")


if __name__ == "__main__":
    main()
