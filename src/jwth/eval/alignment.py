"""What the class token reads: alignment of attention over patch tokens with nuclei.

``jwth nuclei-alignment`` (open question 2 of arXiv:2511.05150: do the tokens the
class token attends to correspond to cells?). For a set of held-out tiles:

1. nuclei from scikit-image (:mod:`jwth.eval.nuclei`): per patch token, the fraction
   f_i of its pixels covered by nuclei, and by small-round-dark (lymphocyte-like) nuclei;
2. attention over the N patch tokens from three sources, per attention head k:
   ``jwth-trained`` -- a JWTH attention head (:class:`jwth.heads.JWTHAttentionHead`)
   trained for the tile labels on tiles of *other* patients; ``jwth-untrained`` -- the
   same head at its random initialisation (control: what the tokens alone impose);
   ``encoder`` -- the encoder's last-block class-token attention
   (:mod:`jwth.encoders.attention`); and ``mean`` over each source's heads;
3. per tile and head, the enrichment e = sum_i a_i f_i / mean_i f_i (1 = uniform
   attention) and the Spearman rank correlation between a and f
   (:func:`jwth.eval.nuclei.enrichment`, :func:`jwth.eval.nuclei.rank_correlation`);
4. summaries by source, head and class: geometric-mean enrichment, share of tiles with
   e > 1 and mean Spearman, with 95 % bootstrap CIs over patients.

The analysed tiles are never seen by the trained head (patients disjoint).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from jwth.data.tiles import TileTable, check_tiles, load_tile
from jwth.encoders.attention import tokens_and_cls_attention
from jwth.eval.nuclei import enrichment, rank_correlation, segment_nuclei, token_fractions

FEATURES = ("nuclei", "lymph")


@dataclass
class AlignmentConfig:
    """Settings of ``jwth nuclei-alignment`` (saved in results.json)."""

    n_tiles: int = 150
    max_per_patient: int = 4
    train_tiles: int = 1000
    mpp: float = 0.5
    epochs: int = 10
    seed: int = 0
    n_boot: int = 1000
    n_figure_tiles: int = 8
    batch_size: int = 16


def choose_tiles(table: TileTable, n_tiles: int, max_per_patient: int, train_tiles: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Analysed tiles (balanced over classes, at most ``max_per_patient`` per patient) and
    training tiles (a random ``train_tiles`` of the other patients' tiles; 0 = all of them).

    Returns:
        (analysed indices, training indices) into ``table.df``; no patient is in both.

    Raises:
        ValueError: ``n_tiles`` < number of classes, or a class has no patient left for training.
    """
    C = len(table.classes)
    if n_tiles < C:
        raise ValueError(f"--tiles {n_tiles} is below the number of classes ({C}); analyse at least one tile per class.")
    rng = np.random.default_rng(seed)
    df = table.df
    picked: list[int] = []
    for c in table.classes:
        want = n_tiles // C
        pats = df.loc[df["label"] == c, "patient_id"].unique()
        got: list[int] = []
        for p in rng.permutation(pats):
            if len(got) >= want:
                break
            rows = np.flatnonzero((df["patient_id"] == p).to_numpy())
            got += rng.permutation(rows)[: min(max_per_patient, want - len(got))].tolist()
        picked += got
    analysed = np.sort(np.asarray(picked, dtype=np.int64))
    held = set(df["patient_id"].iloc[analysed])
    rest = np.flatnonzero(~df["patient_id"].isin(held).to_numpy())
    left = {c: df["patient_id"].iloc[rest][df["label"].iloc[rest] == c].nunique() for c in table.classes}
    if min(left.values()) == 0:
        raise ValueError(f"No patients left to train the head on after holding out the analysed tiles' patients "
                         f"(training patients per class: {left}); lower --tiles or --max-per-patient.")
    if train_tiles and train_tiles < len(rest):
        rest = np.sort(rng.choice(rest, train_tiles, replace=False))
    return analysed, rest


def tile_geometry(img, input_size: int) -> np.ndarray:
    """The RGB pixels the encoder sees, (input_size, input_size, 3) uint8 (its resize and centre crop)."""
    from torchvision import transforms as T

    g = T.Compose([T.Resize(input_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(input_size)])
    return np.asarray(g(img), dtype=np.uint8)


def train_head(encoder, table: TileTable, train_idx: np.ndarray, cache_dir: Path, cfg: AlignmentConfig,
               cache=None, quiet: bool = False):
    """Train a JWTH attention head on tiles ``train_idx`` (lr / weight decay chosen on an inner patient split).

    Tokens come from ``cache`` (an open :class:`jwth.cache.TokenCache` of these tiles, e.g. a probe
    run's) or are extracted into ``cache_dir``.

    Returns:
        The head in eval mode.

    Raises:
        ValueError: the cache holds no patch tokens or misses some of the tiles.
    """
    from jwth.cache.extract import extract_tokens
    from jwth.eval.probe import load_features
    from jwth.eval.splits import inner_split
    from jwth.eval.train import HeadTrainConfig, select_and_fit
    from jwth.heads import build_head

    sub = table.subset(np.isin(np.arange(len(table)), train_idx))
    if cache is None:
        cache = extract_tokens(encoder, sub, cache_dir, batch_size=cfg.batch_size, num_workers=0, quiet=quiet)
    if not cache.has_patches:
        raise ValueError(f"Token cache {cache.folder} holds no patch tokens (made with --no-patches); "
                         "re-extract without --no-patches.")
    rows = pd.Series(np.arange(cache.n_tiles), index=cache.tiles["path"])
    missing = sorted(set(sub.df["path"]) - set(rows.index))
    if missing:
        raise ValueError(f"Token cache {cache.folder} lacks {len(missing)} training tiles (e.g. {missing[:2]}); "
                         "it was made from another label file: rerun `jwth probe` or drop --run.")
    feats = load_features(cache, {"normalized"})
    idx = rows.loc[sub.df["path"]].to_numpy()
    y = np.zeros(cache.n_tiles, dtype=np.int64)
    y[idx] = sub.y
    patients = np.full(cache.n_tiles, "", dtype=object)
    patients[idx] = sub.df["patient_id"].to_numpy()
    tcfg = HeadTrainConfig(epochs=cfg.epochs, seed=cfg.seed)
    fit_idx, val_idx = inner_split(y, patients, idx, seed=cfg.seed, class_names=table.classes)

    def make():
        torch.manual_seed(cfg.seed)
        return build_head("attention", cache.embed_dim, len(table.classes), tcfg.num_heads)

    head, _ = select_and_fit(make, feats, y, fit_idx, val_idx, idx, tcfg, len(table.classes))
    return head.eval()


@torch.no_grad()
def measure_tiles(encoder, table: TileTable, idx: np.ndarray, heads: dict, cfg: AlignmentConfig) -> dict:
    """Nuclei, attention and head predictions on tiles ``idx``.

    Args:
        heads: name -> :class:`jwth.heads.JWTHAttentionHead` (eval mode).

    Returns:
        dict with ``rgb`` (T, S, S, 3) uint8, ``labels`` (T, S, S) nucleus labels, ``lymph_masks``,
        ``fractions`` {feature: (T, N)}, ``attention`` {source: (T, K, N)}, ``probs`` (T, C) of
        the first head, ``n_nuclei`` (T,), ``grid``.
    """
    device = next(encoder.parameters()).device
    S = encoder.input_size
    out: dict = {"rgb": [], "labels": [], "lymph_masks": [], "n_nuclei": [], "probs": [],
                 "fractions": {f: [] for f in FEATURES}, "attention": {**{h: [] for h in heads}, "encoder": []}}
    paths = table.df["path"].to_numpy()[idx]
    for s in range(0, len(idx), cfg.batch_size):
        imgs, xs = [], []
        for p in paths[s : s + cfg.batch_size]:
            img, _ = load_tile(table.root / p)
            mpp = cfg.mpp * min(img.size) / S  # the encoder resizes the shorter side to S
            imgs.append((tile_geometry(img, S), mpp))
            xs.append(encoder.transform(img))
        tok, enc_attn = tokens_and_cls_attention(encoder, torch.stack(xs).to(device))
        out["attention"]["encoder"].append(enc_attn.cpu().numpy())
        for i, (name, head) in enumerate(heads.items()):
            logits = head(tok.cls.float(), tok.patches.float())
            out["attention"][name].append(head.last_attention.cpu().numpy())
            if i == 0:
                out["probs"].append(logits.softmax(-1).cpu().numpy())
        for rgb, mpp in imgs:
            nuc = segment_nuclei(rgb, mpp=mpp)
            out["rgb"].append(rgb)
            out["labels"].append(nuc.labels)
            out["lymph_masks"].append(nuc.lymph_mask)
            out["n_nuclei"].append(nuc.count)
            out["fractions"]["nuclei"].append(token_fractions(nuc.mask, tok.grid))
            out["fractions"]["lymph"].append(token_fractions(nuc.lymph_mask, tok.grid))
        out["grid"] = tok.grid
    for k in ("rgb", "labels", "lymph_masks", "n_nuclei"):
        out[k] = np.stack(out[k]) if k != "n_nuclei" else np.asarray(out[k])
    out["probs"] = np.concatenate(out["probs"])
    out["fractions"] = {f: np.stack(v) for f, v in out["fractions"].items()}
    out["attention"] = {k: np.concatenate(v) for k, v in out["attention"].items()}
    return out


def _with_mean(att: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(T, K, N) -> (T, K + 1, N) with the mean over heads appended, and the head names."""
    return np.concatenate([att, att.mean(1, keepdims=True)], 1), [f"h{k}" for k in range(att.shape[1])] + ["mean"]


def per_tile_table(tiles: pd.DataFrame, meas: dict) -> pd.DataFrame:
    """One row per (tile, source, head): enrichment and Spearman for nuclei and lymphocyte-like nuclei."""
    rows = []
    for src, att in meas["attention"].items():
        a, names = _with_mean(att)
        cols = {}
        for f in FEATURES:
            frac = meas["fractions"][f][:, None, :]
            cols[f"enrichment_{f}"] = enrichment(a, frac)
            cols[f"spearman_{f}"] = rank_correlation(a, frac)
        for k, name in enumerate(names):
            d = tiles[["path", "label", "patient_id"]].copy()
            d["source"], d["head"] = src, name
            for c, v in cols.items():
                d[c] = v[:, k]
            rows.append(d)
    out = pd.concat(rows, ignore_index=True)
    for f in FEATURES:
        out[f"fraction_{f}"] = np.tile(meas["fractions"][f].mean(1), len(rows))
    return out


def _cluster_bootstrap(values: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % percentile CI of the mean of ``values``, resampling ``groups`` (patients) with replacement."""
    ok = np.isfinite(values)
    values, groups = values[ok], groups[ok]
    if len(values) < 2:
        return float("nan"), float("nan")
    uniq, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=values, minlength=len(uniq))
    counts = np.bincount(inv, minlength=len(uniq))
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(uniq), size=(n_boot, len(uniq)))
    means = sums[draw].sum(1) / np.maximum(counts[draw].sum(1), 1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def summarise(per_tile: pd.DataFrame, classes: list[str], n_boot: int, seed: int) -> list[dict]:
    """Per (source, head, class incl. ``all``, feature): n tiles, geometric-mean enrichment [CI],
    share of tiles with enrichment > 1, mean Spearman [CI]."""
    out = []
    for (src, head), g in per_tile.groupby(["source", "head"], sort=False):
        for cls in [*classes, "all"]:
            gc = g if cls == "all" else g[g["label"] == cls]
            for f in FEATURES:
                e = gc[f"enrichment_{f}"].to_numpy()
                r = gc[f"spearman_{f}"].to_numpy()
                pats = gc["patient_id"].to_numpy()
                le = np.log2(np.where(e > 0, e, np.nan))
                ok = np.isfinite(le)
                ci = _cluster_bootstrap(le, pats, n_boot, seed)
                out.append({
                    "source": src, "head": head, "class": cls, "feature": f, "n_tiles": int(ok.sum()),
                    "n_patients": int(len(set(pats[ok]))),
                    "enrichment_gmean": float(2 ** np.nanmean(le)) if ok.any() else float("nan"),
                    "enrichment_gmean_ci": [2 ** ci[0], 2 ** ci[1]],
                    "share_enriched": float((e[ok] > 1).mean()) if ok.any() else float("nan"),
                    "spearman_mean": float(np.nanmean(r)) if np.isfinite(r).any() else float("nan"),
                    "spearman_ci": list(_cluster_bootstrap(r, pats, n_boot, seed)),
                })
    return out


def _fmt(v: float, d: int = 2) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{d}f}"


def markdown(res: dict) -> str:
    """The report tables (results.md)."""
    s = res["summary"]
    lines = [f"# Token <-> nucleus alignment: {res['dataset']} ({res['encoder']['spec']})", ""]
    if res["encoder"]["random_init"]:
        lines += ["**Encoder is randomly initialised**: these numbers describe an untrained network.", ""]
    lines += [f"{res['n_tiles']} analysed tiles from {res['n_patients']} held-out patients; head trained on "
              f"{res['n_train_tiles']} tiles of other patients (balanced accuracy on the analysed tiles "
              f"{_fmt(res['head_bacc'], 3)}). Nuclear fraction per tile (mean over tokens): "
              + ", ".join(f"{c} {_fmt(v, 3)}" for c, v in res["nuclear_fraction"].items())
              + "; lymphocyte-like: " + ", ".join(f"{c} {_fmt(v, 3)}" for c, v in res["lymph_fraction"].items())
              + ".", "",
              "Enrichment = attention-weighted nuclear fraction / uniform average (1 = no preference), "
              "geometric mean over tiles; Spearman = rank correlation of attention and nuclear fraction "
              "over the tokens of a tile, mean over tiles; [95 % CI] from a patient bootstrap.", "",
              "| source | class | n | enrichment, nuclei [CI] | share > 1 | Spearman, nuclei [CI] | "
              "enrichment, lymph-like [CI] | Spearman, lymph-like |", "|---|---|---|---|---|---|---|---|"]
    by = {(r["source"], r["head"], r["class"], r["feature"]): r for r in s}
    for src in res["sources"]:
        for cls in [*res["classes"], "all"]:
            n, ly = by[(src, "mean", cls, "nuclei")], by[(src, "mean", cls, "lymph")]
            lines.append(
                f"| {src} (mean of heads) | {cls} | {n['n_tiles']} | {_fmt(n['enrichment_gmean'])} "
                f"[{_fmt(n['enrichment_gmean_ci'][0])}, {_fmt(n['enrichment_gmean_ci'][1])}] | "
                f"{_fmt(n['share_enriched'])} | {_fmt(n['spearman_mean'])} [{_fmt(n['spearman_ci'][0])}, "
                f"{_fmt(n['spearman_ci'][1])}] | {_fmt(ly['enrichment_gmean'])} [{_fmt(ly['enrichment_gmean_ci'][0])}, "
                f"{_fmt(ly['enrichment_gmean_ci'][1])}] ({ly['n_tiles']} tiles) | {_fmt(ly['spearman_mean'])} |")
    lines += ["", "Per attention head, all analysed tiles:", "",
              "| source | head | enrichment, nuclei [CI] | Spearman, nuclei | enrichment, lymph-like |", "|---|---|---|---|---|"]
    for src in res["sources"]:
        for r in [x for x in s if x["source"] == src and x["class"] == "all" and x["feature"] == "nuclei"]:
            ly = by[(src, r["head"], "all", "lymph")]
            lines.append(f"| {src} | {r['head']} | {_fmt(r['enrichment_gmean'])} [{_fmt(r['enrichment_gmean_ci'][0])}, "
                         f"{_fmt(r['enrichment_gmean_ci'][1])}] | {_fmt(r['spearman_mean'])} | {_fmt(ly['enrichment_gmean'])} |")
    return "\n".join(lines) + "\n"


def plot_tiles(path: Path, meas: dict, tiles: pd.DataFrame, pick: np.ndarray, sources: list[str]) -> None:
    """Tiles with nucleus contours (lymphocyte-like in cyan) beside each source's mean attention map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    grid = meas["grid"]
    fig, axes = plt.subplots(len(pick), 1 + len(sources), figsize=(2.2 * (1 + len(sources)), 2.3 * len(pick)),
                             squeeze=False)
    for r, i in enumerate(pick):
        img = meas["rgb"][i].copy()
        edge = find_boundaries(meas["labels"][i], mode="inner")
        img[edge] = (255, 230, 0)
        img[edge & meas["lymph_masks"][i]] = (0, 230, 255)
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(f"{tiles['label'].iloc[i]}  nuclei {meas['n_nuclei'][i]}", fontsize=7)
        for c, src in enumerate(sources, start=1):
            a = meas["attention"][src][i].mean(0).reshape(grid)
            e = enrichment(a.reshape(1, -1), meas["fractions"]["nuclei"][i][None])[0]
            axes[r, c].imshow(meas["rgb"][i])
            axes[r, c].imshow(a, cmap="inferno", alpha=0.6, extent=(0, img.shape[1], img.shape[0], 0),
                              interpolation="nearest")
            axes[r, c].set_title(f"{src}: e={e:.2f}", fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle("Nucleus contours (yellow; lymphocyte-like cyan) and class-token attention (mean of heads); "
                 "e = nuclear enrichment", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_enrichment(path: Path, per_tile: pd.DataFrame, classes: list[str], sources: list[str]) -> None:
    """Box plots of log2 nuclear enrichment per source and head, one box per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sources), figsize=(4.2 * len(sources), 3.2), squeeze=False)
    for ax, src in zip(axes[0], sources):
        g = per_tile[per_tile["source"] == src]
        heads = list(dict.fromkeys(g["head"]))
        for j, cls in enumerate(classes):
            data = [np.log2(g[(g["head"] == h) & (g["label"] == cls)]["enrichment_nuclei"].dropna()) for h in heads]
            pos = np.arange(len(heads)) * (len(classes) + 1) + j
            ax.boxplot(data, positions=pos, widths=0.8, showfliers=False, patch_artist=True,
                       boxprops={"facecolor": f"C{j}", "alpha": 0.6}, medianprops={"color": "k"})
            ax.plot([], [], color=f"C{j}", lw=6, alpha=0.6, label=cls)
        ax.axhline(0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(heads)) * (len(classes) + 1) + (len(classes) - 1) / 2, heads, fontsize=7)
        ax.set_title(src, fontsize=9)
        ax.set_ylabel("log2 nuclear enrichment")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_alignment(encoder, table: TileTable, out: Path, cfg: AlignmentConfig, cache=None, quiet: bool = False) -> dict:
    """``jwth nuclei-alignment`` end to end; writes into ``out``.

    Outputs: ``results.json``, ``results.md``, ``per_tile.csv``, ``tiles.png``,
    ``enrichment.png``, ``attention_head.pt`` (the trained head, usable with
    ``jwth extract-slides --head``) and ``cache/`` (training tokens, when extracted here).

    Args:
        encoder: a timm-ViT :class:`jwth.encoders.Encoder`.
        table: the validated tile table.
        cache: an open token cache holding the training tiles (a probe run's), else extracted.

    Returns:
        The results dict (results.json).

    Raises:
        ValueError: an encoder without a readable last attention block, an impossible tile
            choice, or a cache without patch tokens -- all before anything is computed where possible.
        jwth.data.tiles.TileError: an analysed tile cannot be decoded (names the file).
    """
    from jwth.eval.metrics import metric
    from jwth.eval.report import write_json
    from jwth.heads import build_head
    from jwth.heads.checkpoint import save_attention_head

    t0 = time.time()
    from jwth.encoders.attention import _last_attention

    _last_attention(encoder)  # fail before any work when the encoder's attention cannot be read
    analysed, train_idx = choose_tiles(table, cfg.n_tiles, cfg.max_per_patient, cfg.train_tiles, cfg.seed)
    sub = table.subset(np.isin(np.arange(len(table)), analysed))
    check_tiles(sub, encoder.input_size)  # a bad analysed tile stops the run here, naming the file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    trained = train_head(encoder, table, train_idx, out / "cache", cfg, cache=cache, quiet=quiet)
    save_attention_head(out / "attention_head.pt", trained, table.classes, encoder)
    torch.manual_seed(cfg.seed)
    untrained = build_head("attention", encoder.embed_dim, len(table.classes), trained.pool.num_heads).eval()
    heads = {"jwth-trained": trained, "jwth-untrained": untrained}
    meas = measure_tiles(encoder, sub, np.arange(len(sub)), heads, cfg)
    tiles = sub.df.reset_index(drop=True)
    per_tile = per_tile_table(tiles, meas)
    per_tile.to_csv(out / "per_tile.csv", index=False)
    sources = list(meas["attention"])
    rng = np.random.default_rng(cfg.seed)
    pick = np.concatenate([rng.permutation(np.flatnonzero(tiles["label"] == c))[: cfg.n_figure_tiles // len(table.classes)]
                           for c in table.classes])
    plot_tiles(out / "tiles.png", meas, tiles, pick, ["jwth-trained", "encoder", "jwth-untrained"])
    plot_enrichment(out / "enrichment.png", per_tile, table.classes, sources)
    y = sub.y
    res = {
        "dataset": table.root.name,
        "encoder": encoder.describe(),
        "config": asdict(cfg),
        "classes": table.classes,
        "sources": sources,
        "n_tiles": int(len(sub)),
        "n_patients": int(tiles["patient_id"].nunique()),
        "n_train_tiles": int(len(train_idx)),
        "head_bacc": metric("bacc", y, meas["probs"]),
        "grid": list(meas["grid"]),
        "nuclei_per_tile": float(meas["n_nuclei"].mean()),
        "nuclear_fraction": {c: float(meas["fractions"]["nuclei"][y == i].mean()) for i, c in enumerate(table.classes)},
        "lymph_fraction": {c: float(meas["fractions"]["lymph"][y == i].mean()) for i, c in enumerate(table.classes)},
        "summary": summarise(per_tile, table.classes, cfg.n_boot, cfg.seed),
        "seconds": round(time.time() - t0, 1),
    }
    write_json(out / "results.json", res)
    (out / "results.md").write_text(markdown(res))
    return res


__all__ = ["AlignmentConfig", "choose_tiles", "measure_tiles", "per_tile_table", "run_alignment", "summarise",
           "train_head"]
