"""Benchmark task files: which labels, which classes, which cohorts.

A task file (YAML, format in docs/benchmark.md) names

- ``patients``: an optional per-patient table inside the data folder, joined to the
  tiles on the patient ID (``patient_id`` names its ID column);
- ``cohort``: the cohort column (of ``labels.csv`` or of the patient table);
- ``evaluations``: the cohort settings every task is evaluated in -- ``pooled``,
  ``within: <cohort>``, ``train: <cohort>, test: <cohort>`` (cross-cohort) and
  ``test_sites: [..]`` (site-held-out transfer);
- ``tasks``: per task a label ``column`` (``from: labels`` or ``from: patients`` when
  the name is in both), the ``classes`` to keep (a list: each value is a class;
  a mapping: class -> values merged into it, ``"*"`` = every other value), and an
  optional ``positive`` class.

IDs and values are read as strings (``TCGA-00-0123`` and ``007`` stay as written); a
class value matches a cell when both are equal as strings or as numbers (``1`` matches
``1.0``). Empty cells, ``NA``, ``NaN`` and ``None`` are missing values: those tiles are
left out of that task only, and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

MISSING = {"", "na", "n/a", "nan", "none", "null"}
REST = "*"
_TOP_KEYS = {"name", "description", "patients", "patient_id", "cohort", "evaluations", "tasks"}
_TASK_KEYS = {"name", "column", "from", "classes", "positive", "description"}
_EVAL_KEYS = {"name", "pooled", "within", "train", "test", "test_sites"}


class TaskFileError(ValueError):
    """A task file that cannot be used; the message names the file, the task and the fix."""


@dataclass
class Evaluation:
    """One cohort setting: ``kind`` is ``pooled``, ``within``, ``cross`` or ``sites``."""

    name: str
    kind: str
    cohort: str | None = None  # within
    train: str | None = None  # cross
    test: str | None = None  # cross
    test_sites: list[str] = field(default_factory=list)  # sites


@dataclass
class Task:
    """One label definition. ``classes`` maps class name -> raw values (``["*"]`` = the rest)."""

    name: str
    column: str
    source: str | None  # "labels", "patients" or None (looked up)
    classes: dict[str, list[str]]
    positive: str | None = None


@dataclass
class TaskFile:
    """A parsed task file (:func:`load_task_file`)."""

    path: Path
    tasks: list[Task]
    evaluations: list[Evaluation]
    patients: str | None = None
    patient_id: str = "patient_id"
    cohort: str | None = None
    name: str = ""


@dataclass
class TaskLabels:
    """A task resolved against a data set.

    Attributes:
        task: the task definition.
        classes: class names; class index i = ``classes[i]``.
        label: (T,) object array, class name per tile or None (left out of this task).
        counts: bookkeeping (JSON-able): patients/tiles labelled per class, and patients
            left out with the reason (missing value, not in the patient table, a value
            outside the classes), patients of the table without tiles.
        positive: positive class for ROC curves (the given one, else the rarer class of
            two by patients, else None).
    """

    task: Task
    classes: list[str]
    label: np.ndarray
    counts: dict
    positive: str | None


def _err(path, msg: str) -> TaskFileError:
    return TaskFileError(f"{path}: {msg}")


def _canon(v) -> str:
    """A value as a comparable string: numbers canonicalised (``1`` == ``1.0``)."""
    s = str(v).strip()
    try:
        f = float(s)
    except ValueError:
        return s
    return repr(f) if math.isfinite(f) else s


def is_missing(v) -> bool:
    """True for empty cells, NA / NaN / None (case-insensitive) and float NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return True
    return str(v).strip().lower() in MISSING


def _parse_classes(path, name: str, raw) -> dict[str, list[str]]:
    if isinstance(raw, list):
        if not raw:
            raise _err(path, f"task {name!r}: 'classes' is empty; list at least two classes.")
        classes = {str(v).strip(): [str(v).strip()] for v in raw}
        if len(classes) != len(raw):
            raise _err(path, f"task {name!r}: a class is listed twice in {raw}.")
    elif isinstance(raw, dict):
        classes = {}
        for k, v in raw.items():
            vals = v if isinstance(v, list) else [v]
            if not vals:
                raise _err(path, f"task {name!r}: class {k!r} lists no values.")
            classes[str(k).strip()] = [str(x).strip() for x in vals]
    else:
        raise _err(
            path,
            f"task {name!r}: 'classes' must be a list of values or a mapping class -> values "
            f"(e.g. {{CIMP-H: [CIMP-H], rest: '*'}}), got {raw!r}.",
        )
    if len(classes) < 2:
        raise _err(path, f"task {name!r}: needs at least two classes, got {list(classes)}.")
    rest = [k for k, v in classes.items() if REST in v]
    if len(rest) > 1 or any(len(classes[k]) > 1 for k in rest):
        raise _err(path, f"task {name!r}: '*' (every other value) may be the only value of one class; got {raw!r}.")
    seen: dict[str, str] = {}
    for k, vals in classes.items():
        for v in vals:
            if v != REST and _canon(v) in seen:
                raise _err(path, f"task {name!r}: value {v!r} is in classes {seen[_canon(v)]!r} and {k!r}.")
            seen[_canon(v)] = k
    return classes


def _entry_name(path, e, what: str, keys: set[str], hint: str) -> str:
    """The name of a task / evaluation entry, after checking it is a mapping without unknown keys."""
    if not isinstance(e, dict) or "name" not in e:
        raise _err(path, f"each {what} needs a 'name'{hint}; got {e!r}.")
    name = str(e["name"])
    unknown = set(e) - keys
    if unknown:
        raise _err(path, f"{what} {name!r}: unknown key(s) {sorted(unknown)}; keys: {sorted(keys)}.")
    return name


def _parse_evaluation(path, e) -> Evaluation:
    name = _entry_name(path, e, "evaluation", _EVAL_KEYS, " and one of pooled / within / train+test / test_sites")
    kinds = [k for k in ("pooled", "within", "train", "test_sites") if k in e]
    if len(kinds) != 1 or ("train" in e) != ("test" in e):
        raise _err(path, f"evaluation {name!r}: give exactly one of 'pooled: true', 'within: <cohort>', "
                         f"'train: <cohort>' with 'test: <cohort>', or 'test_sites: [...]'; got {sorted(e)}.")
    k = kinds[0]
    if k == "pooled":
        return Evaluation(name, "pooled")
    if k == "within":
        return Evaluation(name, "within", cohort=str(e["within"]))
    if k == "train":
        if str(e["train"]) == str(e["test"]):
            raise _err(path, f"evaluation {name!r}: train and test cohort are both {e['train']!r}; use 'within'.")
        return Evaluation(name, "cross", train=str(e["train"]), test=str(e["test"]))
    sites = e["test_sites"]
    sites = [s.strip() for s in sites.split(",")] if isinstance(sites, str) else [str(s) for s in sites]
    if not sites:
        raise _err(path, f"evaluation {name!r}: test_sites is empty.")
    return Evaluation(name, "sites", test_sites=sites)


def load_task_file(path: str | Path) -> TaskFile:
    """Parse and check a task file's structure (no data is read).

    Raises:
        FileNotFoundError: no such file.
        TaskFileError: bad YAML, unknown keys, a task without column or classes, a class
            listed twice, duplicate task / evaluation names, a cohort setting without
            a ``cohort`` column -- each message names the task or evaluation.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Task file {path} not found; the package ships one: see `jwth benchmark --help`.")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise _err(path, f"not valid YAML: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list) or not doc["tasks"]:
        raise _err(path, "a task file is a mapping with a non-empty 'tasks' list (see docs/benchmark.md).")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise _err(path, f"unknown key(s) {sorted(unknown)}; keys: {sorted(_TOP_KEYS)}.")
    tasks = []
    for t in doc["tasks"]:
        name = _entry_name(path, t, "task", _TASK_KEYS, "")
        for key in ("column", "classes"):
            if key not in t:
                raise _err(path, f"task {name!r}: missing {key!r}.")
        src = t.get("from")
        if src not in (None, "labels", "patients"):
            raise _err(path, f"task {name!r}: 'from' is {src!r}; use 'labels' (labels.csv) or 'patients' (patient table).")
        classes = _parse_classes(path, name, t["classes"])
        pos = t.get("positive")
        if pos is not None and str(pos) not in classes:
            raise _err(path, f"task {name!r}: positive class {pos!r} is not one of its classes {list(classes)}.")
        tasks.append(Task(name, str(t["column"]), src, classes, None if pos is None else str(pos)))
    evals = [_parse_evaluation(path, e) for e in (doc.get("evaluations") or [{"name": "pooled", "pooled": True}])]
    for what, names in (("task", [t.name for t in tasks]), ("evaluation", [e.name for e in evals])):
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise _err(path, f"{what} name(s) {dup} used twice; names must be unique.")
    cohort = doc.get("cohort")
    needs = [e.name for e in evals if e.kind in ("within", "cross")]
    if needs and not cohort:
        raise _err(path, f"evaluations {needs} need a cohort column: add 'cohort: <column>'.")
    return TaskFile(
        path=path, tasks=tasks, evaluations=evals, patients=doc.get("patients"),
        patient_id=str(doc.get("patient_id", "patient_id")), cohort=None if cohort is None else str(cohort),
        name=str(doc.get("name", path.stem)),
    )


def read_patient_table(data_dir: str | Path, tf: TaskFile) -> pd.DataFrame | None:
    """The task file's patient table as strings, indexed by patient ID (None without one).

    Raises:
        FileNotFoundError: the table does not exist.
        TaskFileError: no ID column, empty IDs, or a patient listed twice (rows named).
    """
    if not tf.patients:
        return None
    p = Path(tf.patients)
    p = p if p.is_absolute() else Path(data_dir) / p
    if not p.is_file():
        raise FileNotFoundError(f"{tf.path}: patient table {p} not found (key 'patients', relative to --data).")
    df = pd.read_csv(p, dtype=str, keep_default_na=False)
    if tf.patient_id not in df.columns:
        raise TaskFileError(f"{p} has no patient ID column {tf.patient_id!r} (columns: {list(df.columns)}); "
                            f"set 'patient_id' in {tf.path}.")
    ids = df[tf.patient_id].str.strip()
    empty = [i + 2 for i in np.flatnonzero(ids == "")]
    if empty:
        raise TaskFileError(f"{p}: empty patient ID in row(s) {empty[:5]}.")
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        rows = [i + 2 for i in dup.index[:4]]
        raise TaskFileError(f"{p}: patient {dup.iloc[0]!r} is listed more than once (rows {rows}); one row per patient.")
    return df.assign(**{tf.patient_id: ids}).set_index(tf.patient_id)


def _column(tf: TaskFile, what: str, column: str, source: str | None, tile_cols: pd.DataFrame,
            patients: pd.DataFrame | None, tile_pid: pd.Series) -> tuple[pd.Series, str]:
    """Per-tile values of ``column`` (strings, NaN where the patient is not in the table) and its source."""
    in_labels = column in tile_cols.columns
    in_pat = patients is not None and column in patients.columns
    if source is None:
        if in_labels and in_pat:
            raise TaskFileError(f"{tf.path}: {what}: column {column!r} is in labels.csv and in the patient table; "
                                "add 'from: labels' or 'from: patients'.")
        source = "labels" if in_labels else "patients" if in_pat else None
    if source == "labels" and in_labels:
        return tile_cols[column].astype(str).str.strip(), "labels"
    if source == "patients" and in_pat:
        return tile_pid.map(patients[column].str.strip()), "patients"
    cols = f"labels.csv columns: {list(tile_cols.columns)}"
    if patients is not None:
        cols += f"; patient table columns: {list(patients.columns)}"
    raise TaskFileError(f"{tf.path}: {what}: unknown column {column!r} ({cols}).")


def tile_cohorts(tf: TaskFile, tile_cols: pd.DataFrame, patients: pd.DataFrame | None, tile_pid: pd.Series) -> np.ndarray:
    """Cohort per tile ((T,) object array, None where unknown) from the task file's cohort column.

    Raises:
        TaskFileError: unknown cohort column, or an evaluation naming a cohort value
            absent from it (the message lists the values present).
    """
    if not tf.cohort:
        return np.full(len(tile_pid), None, dtype=object)
    vals, _ = _column(tf, "cohort", tf.cohort, None, tile_cols, patients, tile_pid)
    coh = np.array([None if is_missing(v) else str(v) for v in vals], dtype=object)
    present = sorted({c for c in coh if c is not None})
    for e in tf.evaluations:
        for c in (e.cohort, e.train, e.test):
            if c is not None and c not in present:
                raise TaskFileError(f"{tf.path}: evaluation {e.name!r}: cohort {c!r} is not a value of column "
                                    f"{tf.cohort!r} among the tiles (values: {present}).")
    return coh


def resolve_task(task: Task, tf: TaskFile, tile_cols: pd.DataFrame, patients: pd.DataFrame | None,
                 tile_pid: pd.Series) -> TaskLabels:
    """Labels of one task per tile.

    Args:
        tile_cols: labels.csv columns, one row per cache tile (strings).
        patients: patient table indexed by patient ID (:func:`read_patient_table`) or None.
        tile_pid: patient ID per tile (strings).

    Raises:
        TaskFileError: unknown column; a class value that never occurs in the column
            (named, with the values present); a class left without tiles after the
            join (named, with why); fewer than two classes with tiles.
    """
    where = f"task {task.name!r}"
    vals, source = _column(tf, where, task.column, task.source, tile_cols, patients, tile_pid)
    # values present anywhere in the column (tiles, or every patient of the table)
    universe = list(vals.dropna()) if source == "labels" else list(patients[task.column])
    present = sorted({str(v).strip() for v in universe if not is_missing(v)})
    canon_present = {_canon(v) for v in present}
    lookup: dict[str, str] = {}
    rest_class = None
    for cname, cvals in task.classes.items():
        for v in cvals:
            if v == REST:
                rest_class = cname
                continue
            if _canon(v) not in canon_present:
                raise TaskFileError(f"{tf.path}: {where}: class {cname!r} lists value {v!r}, which never occurs in "
                                    f"column {task.column!r} (values: {present}).")
            lookup[_canon(v)] = cname
    pid = tile_pid.to_numpy()
    label = np.full(len(vals), None, dtype=object)
    reason = np.full(len(vals), "", dtype=object)
    for i, v in enumerate(vals):
        if isinstance(v, float) and math.isnan(v) and source == "patients":
            reason[i] = "not_in_patient_table"
        elif is_missing(v):
            reason[i] = "missing_value"
        else:
            c = lookup.get(_canon(v), rest_class)
            if c is None:
                reason[i] = f"value:{str(v).strip()}"
            label[i] = c
    classes = list(task.classes)
    df = pd.DataFrame({"pid": pid, "label": label, "reason": reason})
    kept = df[df["label"].notna()]
    empty = [c for c in classes if not (kept["label"] == c).any()]
    if empty:
        c = empty[0]
        why = "its values occur only for patients without tiles" if source == "patients" else "no tile has its values"
        raise TaskFileError(f"{tf.path}: {where}: class {c!r} (values {task.classes[c]}) has no tiles after the join: "
                            f"{why}. Remove the class or merge it into another.")
    left = df[df["label"].isna()].drop_duplicates("pid")
    counts = {
        "source": source,
        "patients": {c: int(kept.loc[kept["label"] == c, "pid"].nunique()) for c in classes},
        "tiles": {c: int((kept["label"] == c).sum()) for c in classes},
        "left_out_patients": {
            "missing_value": int((left["reason"] == "missing_value").sum()),
            "not_in_patient_table": int((left["reason"] == "not_in_patient_table").sum()),
            "other_values": {r[6:]: int(n) for r, n in left["reason"].value_counts().items() if r.startswith("value:")},
        },
        "left_out_tiles": int(df["label"].isna().sum()),
        "table_patients_without_tiles": int(len(set(patients.index) - set(pid))) if patients is not None else 0,
    }
    pos = task.positive
    if pos is None and len(classes) == 2:
        pos = min(classes, key=lambda c: (counts["patients"][c], classes.index(c)))
    return TaskLabels(task=task, classes=classes, label=label, counts=counts, positive=pos)


def task_file_path(name_or_path: str | Path) -> Path:
    """A task file path, or the name of one shipped with the package (``tcga_crc``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = Path(__file__).resolve().parent.parent / "tasks" / f"{Path(str(name_or_path)).stem}.yaml"
    if shipped.is_file():
        return shipped
    avail = sorted(x.stem for x in shipped.parent.glob("*.yaml")) if shipped.parent.is_dir() else []
    raise FileNotFoundError(f"Task file {name_or_path} not found; shipped task files: {avail}.")
