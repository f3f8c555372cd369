"""Patient-level cross-validation of MIL aggregators, with a bag-size baseline.

Protocol (REFERENCE sec. 7, the same as the tile probe):

- outer folds: :func:`jwth.eval.splits.patient_folds` (stratified by label, patients
  as groups; no patient in two partitions); each training part is split again by
  patient (:func:`jwth.eval.splits.inner_split`) for early stopping on validation loss;
- **training sees a fixed number of instances per bag** (``n_instances``, sampled
  with replacement when a bag is smaller), so bag size cannot be learned; evaluation
  uses **all** instances (chunked online softmax for huge bags);
- class-balanced cross-entropy (weights ``n / (C n_c)`` from the fit set);
- out-of-fold probabilities pooled over folds give balanced accuracy, macro-F1 and
  AUROC with 95 % patient-bootstrap CIs (:mod:`jwth.eval.metrics`); embeddings are
  compared with a paired bootstrap on the same patients;
- the **bag-size baseline**: logistic regression on ``log(bag size)`` alone, same
  folds. If it is close to the real model, the real model may be reading bag size.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from jwth.eval.metrics import bootstrap_ci, classification_metrics, paired_bootstrap
from jwth.eval.splits import inner_split, patient_folds
from jwth.mil.abmil import MILModel, build_mil_model
from jwth.mil.bags import Bags


@dataclass
class MILConfig:
    """Training settings (saved with every run).

    Attributes:
        aggregator: ``abmil`` (gated attention) or ``mean``.
        n_instances: instances sampled per bag per training step.
        epochs: maximum epochs; the epoch with the lowest validation loss is kept.
        batch_size: bags per step.
        lr, weight_decay: AdamW settings.
        hidden, attn_dim, dropout: model sizes (see :class:`jwth.mil.abmil.ABMIL`).
        n_splits, val_fraction, seed: outer folds, inner validation share, seed.
        n_boot: bootstrap resamples for CIs.
        chunk_size: instances per chunk when scoring a bag in evaluation.
        device: ``cpu`` / ``cuda``.
    """

    aggregator: str = "abmil"
    n_instances: int = 16
    epochs: int = 40
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 1e-4
    hidden: int = 256
    attn_dim: int = 128
    dropout: float = 0.25
    n_splits: int = 5
    val_fraction: float = 0.2
    seed: int = 0
    n_boot: int = 1000
    chunk_size: int = 16384
    device: str = "cpu"


def sample_instances(feats: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` instances of a bag ``(n, E)`` -> ``(k, E)``; with replacement only if ``n < k``."""
    n = len(feats)
    idx = rng.choice(n, size=k, replace=n < k)
    return feats[idx]


def _model_for(bags: Bags, cfg: MILConfig, fit_idx: np.ndarray) -> MILModel:
    model = build_mil_model(cfg.aggregator, bags.dim, len(bags.class_names), hidden=cfg.hidden,
                            attn_dim=cfg.attn_dim, dropout=cfg.dropout)
    X = np.concatenate([bags.features[i] for i in fit_idx])
    model.set_standardisation(X.mean(0), X.std(0))
    return model


def _class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = len(y) / (n_classes * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


@torch.no_grad()
def predict(model: MILModel, bags: Bags, idx: np.ndarray, chunk_size: int = 16384) -> np.ndarray:
    """Class probabilities ``(len(idx), C)`` of bags ``idx`` using all their instances."""
    model.eval()
    out = [torch.softmax(model.forward_chunked(bags.features[i], chunk_size).logits, -1)[0].cpu().numpy()
           for i in idx]
    return np.stack(out) if out else np.zeros((0, len(bags.class_names)))


def train_model(bags: Bags, fit_idx: np.ndarray, val_idx: np.ndarray | None, cfg: MILConfig,
                seed: int = 0) -> tuple[MILModel, dict]:
    """Train one MIL model on bags ``fit_idx``; keep the epoch with the lowest
    class-balanced validation loss on ``val_idx`` (all instances).

    Returns:
        ``(model in eval mode, {"best_epoch", "best_val_loss"})``.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(cfg.device)
    model = _model_for(bags, cfg, fit_idx).to(device)
    cw = _class_weights(bags.labels[fit_idx], len(bags.class_names)).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=cw)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = (float("inf"), -1, None)
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(fit_idx)
        for s in range(0, len(order), cfg.batch_size):
            b = order[s:s + cfg.batch_size]
            x = torch.as_tensor(np.stack([sample_instances(bags.features[i], cfg.n_instances, rng) for i in b]),
                                device=device)
            y = torch.as_tensor(bags.labels[b], device=device)
            loss = loss_fn(model(x).logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if val_idx is not None and len(val_idx):
            p = predict(model, bags, val_idx, cfg.chunk_size)
            vl = float(nn.functional.nll_loss(torch.log(torch.as_tensor(p).clamp_min(1e-8)),
                                              torch.as_tensor(bags.labels[val_idx]), weight=cw.cpu()))
            if vl < best[0]:
                best = (vl, epoch, {k: v.detach().clone() for k, v in model.state_dict().items()})
    if best[2] is not None:
        model.load_state_dict(best[2])
    model.eval()
    return model, {"best_epoch": int(best[1]) if best[2] is not None else cfg.epochs - 1,
                   "best_val_loss": best[0] if best[2] is not None else None}


def bag_size_baseline(bags: Bags, folds: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Out-of-fold probabilities ``(B, C)`` of a logistic regression on ``log(bag size)``
    alone (class-balanced), on the same folds."""
    from sklearn.linear_model import LogisticRegression

    X = np.log(bags.sizes.astype(np.float64))[:, None]
    prob = np.zeros((bags.n_bags, len(bags.class_names)))
    for tr, te in folds:
        clf = LogisticRegression(class_weight="balanced").fit(X[tr], bags.labels[tr])
        prob[te] = clf.predict_proba(X[te])
    return prob


def _summary(y, prob, groups, n_boot, seed) -> dict:
    m = classification_metrics(y, prob)
    out = {k: float(v) for k, v in m.items()}
    for k in ("bacc", "auroc"):
        out[f"{k}_ci"] = list(bootstrap_ci(y, prob, groups, metric_name=k, n_boot=n_boot, seed=seed))
    return out


def cross_validate(bags: Bags, cfg: MILConfig, folds=None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Outer patient-level CV of one aggregator on one set of bags.

    Returns:
        ``{"oof_prob" (B, C), "folds": [per-fold metrics + best_epoch], "metrics": pooled
        out-of-fold metrics with CIs}``.
    """
    folds = folds or patient_folds(bags.labels, bags.patients, cfg.n_splits, cfg.seed)
    oof = np.full((bags.n_bags, len(bags.class_names)), np.nan)
    per_fold = []
    for k, (tr, te) in enumerate(folds):
        fit, val = inner_split(bags.labels, bags.patients, tr, cfg.val_fraction, cfg.seed + k)
        model, info = train_model(bags, fit, val, cfg, seed=cfg.seed * 1000 + k)
        oof[te] = predict(model, bags, te, cfg.chunk_size)
        fm = classification_metrics(bags.labels[te], oof[te])
        per_fold.append({"fold": k, "n_test": int(len(te)), **{m: float(v) for m, v in fm.items()}, **info})
        if progress:
            progress(f"{cfg.aggregator}/{bags.embedding} fold {k + 1}/{len(folds)}: bacc {fm['bacc']:.3f}")
    if np.isnan(oof).any():
        raise RuntimeError("some bags were in no test fold")
    return {"oof_prob": oof, "folds": per_fold,
            "metrics": _summary(bags.labels, oof, bags.patients, cfg.n_boot, cfg.seed)}


def _check_same_bags(bags_by_embedding: dict[str, Bags]) -> Bags:
    ref = next(iter(bags_by_embedding.values()))
    for name, b in bags_by_embedding.items():
        if b.bag_ids != ref.bag_ids or not np.array_equal(b.labels, ref.labels) or \
                not np.array_equal(b.sizes, ref.sizes):
            raise ValueError(f"bags of embedding {name!r} differ from {ref.embedding!r}: they must hold the "
                             "same bags, labels and instances to be compared on the same splits")
    return ref


def run_mil(
    bags_by_embedding: dict[str, Bags],
    cfg: MILConfig,
    aggregators: list[str] | None = None,
    out_dir: str | Path | None = None,
    save_models: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Compare instance embeddings (and aggregators) on the same patient folds.

    Args:
        bags_by_embedding: ``{embedding: Bags}``, the same bags in each.
        cfg: settings (``cfg.aggregator`` is used when ``aggregators`` is None).
        aggregators: e.g. ``["abmil", "mean"]``.
        out_dir: writes ``results.json``, ``results.md``, ``oof_predictions.csv`` and,
            with ``save_models``, ``model_<aggregator>_<embedding>.pt`` trained on all bags
            (for heatmaps).

    Returns:
        The results dict (also in ``results.json``).

    Raises:
        ValueError: bags differ between embeddings.
    """
    t0 = time.time()
    ref = _check_same_bags(bags_by_embedding)
    aggregators = aggregators or [cfg.aggregator]
    folds = patient_folds(ref.labels, ref.patients, cfg.n_splits, cfg.seed)
    y, groups = ref.labels, ref.patients
    base_prob = bag_size_baseline(ref, folds)
    results: dict = {
        "config": asdict(cfg), "aggregators": aggregators, "embeddings": list(bags_by_embedding),
        "cohort": ref.summary(),
        "folds": [{"fold": k, "n_train": int(len(tr)), "n_test": int(len(te)),
                   "test_per_class": {n: int((y[te] == c).sum()) for c, n in enumerate(ref.class_names)}}
                  for k, (tr, te) in enumerate(folds)],
        "bag_size_baseline": {**_summary(y, base_prob, groups, cfg.n_boot, cfg.seed),
                              "spearman_score_vs_bag_size": _size_correlation(base_prob, ref.sizes)},
        "runs": {}, "paired": {},
    }
    oof_cols: dict[str, np.ndarray] = {"bag_size_baseline": base_prob}
    for agg in aggregators:
        c = MILConfig(**{**asdict(cfg), "aggregator": agg})
        for emb, bags in bags_by_embedding.items():
            r = cross_validate(bags, c, folds, progress)
            key = f"{agg}/{emb}"
            results["runs"][key] = {"metrics": r["metrics"], "folds": r["folds"], "dim": bags.dim,
                                    "spearman_score_vs_bag_size": _size_correlation(r["oof_prob"], bags.sizes)}
            oof_cols[key] = r["oof_prob"]
            if out_dir is not None and save_models:
                _save_final_model(bags, c, Path(out_dir) / f"model_{agg}_{emb.replace('+', '_')}.pt")
        embs = list(bags_by_embedding)
        for i in range(len(embs)):
            for j in range(i + 1, len(embs)):
                a, b = f"{agg}/{embs[j]}", f"{agg}/{embs[i]}"
                results["paired"][f"{a} - {b}"] = {
                    m: paired_bootstrap(y, oof_cols[a], oof_cols[b], groups, metric_name=m, n_boot=cfg.n_boot,
                                        seed=cfg.seed) for m in ("bacc", "auroc")}
        for emb in bags_by_embedding:
            results["paired"][f"{agg}/{emb} - bag_size_baseline"] = {
                m: paired_bootstrap(y, oof_cols[f"{agg}/{emb}"], base_prob, groups, metric_name=m,
                                    n_boot=cfg.n_boot, seed=cfg.seed) for m in ("bacc", "auroc")}
    results["seconds"] = round(time.time() - t0, 1)
    if out_dir is not None:
        write_results(results, oof_cols, ref, Path(out_dir))
    return results


def _size_correlation(prob: np.ndarray, sizes: np.ndarray) -> float:
    """Spearman correlation of the out-of-fold score of the last class with bag size
    (a leak indicator: near the bag-size baseline's would mean the model reads bag size)."""
    from scipy.stats import spearmanr

    return float(spearmanr(prob[:, -1], sizes).statistic)


def _save_final_model(bags: Bags, cfg: MILConfig, path: Path) -> None:
    fit, val = inner_split(bags.labels, bags.patients, np.arange(bags.n_bags), cfg.val_fraction, cfg.seed)
    model, info = train_model(bags, fit, val, cfg, seed=cfg.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"aggregator": cfg.aggregator, "in_dim": bags.dim, "class_names": bags.class_names,
                "embedding": bags.embedding, "config": asdict(cfg), "train_info": info,
                "state_dict": model.cpu().state_dict()}, path)


def load_mil_model(path: str | Path) -> tuple[MILModel, dict]:
    """Load a ``model_*.pt`` written by :func:`run_mil`; returns ``(model in eval mode, metadata)``."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    c = ck["config"]
    model = build_mil_model(ck["aggregator"], ck["in_dim"], len(ck["class_names"]), hidden=c["hidden"],
                            attn_dim=c["attn_dim"], dropout=c["dropout"])
    model.load_state_dict(ck["state_dict"])
    return model.eval(), {k: v for k, v in ck.items() if k != "state_dict"}


def _fmt(m: dict, k: str) -> str:
    lo, hi = m.get(f"{k}_ci", [float("nan")] * 2)
    return f"{m[k]:.3f} [{lo:.3f}, {hi:.3f}]"


def write_results(results: dict, oof_cols: dict[str, np.ndarray], bags: Bags, out_dir: Path) -> None:
    """``results.json``, ``results.md`` (tables) and ``oof_predictions.csv``."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=float))
    df = pd.DataFrame({"bag": bags.bag_ids, "patient": bags.patients,
                       "label": [bags.class_names[i] for i in bags.labels], "bag_size": bags.sizes})
    for k, p in oof_cols.items():
        df[f"p_{bags.class_names[-1]}__{k}"] = p[:, -1]
    df.to_csv(out_dir / "oof_predictions.csv", index=False)
    coh = results["cohort"]
    lines = [
        "# MIL results", "",
        f"{coh['n_bags']} bags ({coh['n_patients']} patients), {results['config']['n_splits']}-fold "
        f"patient-level CV (seed {results['config']['seed']}); training samples "
        f"{results['config']['n_instances']} instances per bag, evaluation uses all. 95 % CIs: "
        f"{results['config']['n_boot']} patient bootstrap resamples of the pooled out-of-fold predictions.", "",
        "| class | bags | instances | median bag size |", "|---|---|---|---|",
    ]
    for name, c in coh["classes"].items():
        lines.append(f"| {name} | {c['bags']} | {c['instances']} | {c['median_bag_size']:g} |")
    lines += ["", "| model | dim | balanced accuracy [95 % CI] | AUROC [95 % CI] | macro-F1 | "
              "Spearman(score, bag size) |", "|---|---|---|---|---|---|"]
    for k, r in results["runs"].items():
        m = r["metrics"]
        lines.append(f"| {k} | {r['dim']} | {_fmt(m, 'bacc')} | {_fmt(m, 'auroc')} | {m['f1_macro']:.3f} | "
                     f"{r['spearman_score_vs_bag_size']:+.2f} |")
    b = results["bag_size_baseline"]
    lines.append(f"| bag size only (logistic regression on log n) | 1 | {_fmt(b, 'bacc')} | {_fmt(b, 'auroc')} | "
                 f"{b['f1_macro']:.3f} | {b['spearman_score_vs_bag_size']:+.2f} |")
    lines += ["", "Paired bootstrap (same patients), difference [95 % CI], share of resamples <= 0:", "",
              "| comparison | Δ balanced accuracy | Δ AUROC |", "|---|---|---|"]
    for k, p in results["paired"].items():
        cells = [f"{p[m]['diff']:+.3f} [{p[m]['ci'][0]:+.3f}, {p[m]['ci'][1]:+.3f}] (p≤0 {p[m]['p_le_0']:.3f})"
                 for m in ("bacc", "auroc")]
        lines.append(f"| {k} | {cells[0]} | {cells[1]} |")
    if coh.get("skipped"):
        lines += ["", f"Skipped bags: {coh['skipped']}"]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")


__all__ = ["MILConfig", "sample_instances", "train_model", "predict", "bag_size_baseline", "cross_validate",
           "run_mil", "load_mil_model", "write_results"]
