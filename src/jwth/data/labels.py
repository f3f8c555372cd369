"""Reading and validating label tables, shared by every label source.

A label table maps identifiers (tile paths, slide ids, patient ids) to class labels.
The tile probe (``labels.csv`` of a tile data set), MIL over slide feature files and
MIL over a token cache all read and check their labels here, so a bad table gets the
same error wherever it is used:

- every column is read as text: ``001`` stays ``001`` (IDs never lose leading zeros,
  ``NA`` is not a missing value but the text ``NA``); cells are stripped of spaces;
- a row with an empty label is an error naming its line;
- labels that differ only in case or spacing (``MSIMUT`` / ``msimut`` / ``MSI MUT``)
  are an error naming them: they would silently become separate classes;
- an identifier listed twice is an error (naming both lines, and whether the two rows
  agree or conflict);
- labels outside the expected classes are an error;
- fewer than two classes is an error;
- a group (patient) whose rows carry different labels is an error.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Sequence

import pandas as pd

#: Line number in the csv file of data row 0 (line 1 is the header).
FIRST_DATA_LINE = 2


def read_table(path: str | Path, required: Sequence[str] = (), hint: str = "") -> pd.DataFrame:
    """Read a csv label table with every column as text, cells stripped.

    Args:
        path: the csv file.
        required: columns that must be present.
        hint: appended to the missing-column error (e.g. which option renames a column).

    Returns:
        The table (``str`` columns, empty cells as ``""``), in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: empty file, header without rows, or a missing required column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Label file {path} not found.")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path} is empty: add a header line and one row per item.") from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}; e.g. saved as UTF-16 by a spreadsheet): "
            "save it as CSV in UTF-8."
        ) from None
    df.columns = [str(c).strip() for c in df.columns]  # 'path, label' headers
    for col in required:
        if col not in df.columns:
            sep = next((c for c in ";\t|" if len(df.columns) == 1 and c in df.columns[0]), None)
            sep_name = "tab" if sep == "\t" else repr(sep)
            sep_hint = f" The header looks {sep_name}-separated: write it comma-separated." if sep else ""
            close = difflib.get_close_matches(col, list(df.columns), n=1, cutoff=0.6)
            guess = f" Did you mean {close[0]!r}?" if close and not sep else ""
            raise ValueError(
                f"{path} has no column {col!r} (columns: {list(df.columns)}).{guess}{sep_hint} {hint}".strip()
            )
    if len(df) == 0:
        raise ValueError(f"{path} has a header but no rows: list one item per row.")
    return df.apply(lambda s: s.str.strip())


def _lines(index) -> list[int]:
    return [int(i) + FIRST_DATA_LINE for i in index]


def class_key(label: str) -> str:
    """The form two labels are compared in: case-folded, runs of spaces/underscores/hyphens removed."""
    return re.sub(r"[\s_\-]+", "", str(label)).casefold()


def validate_labels(
    df: pd.DataFrame,
    source: str | Path,
    id_col: str,
    label_col: str = "label",
    group_col: str | None = None,
    classes: Sequence[str] | None = None,
    id_what: str = "tile",
    group_what: str = "patient",
    fix_group: str = "",
) -> list[str]:
    """Check a label table; return its classes.

    Args:
        df: the table (as from :func:`read_table`: text columns, default integer index =
            data row number, so errors can name file lines).
        source: the file name used in messages.
        id_col: column of the item identifier (tile path, slide id); each at most once.
        label_col: column of the class label.
        group_col: column of the group every split keeps together (patient); ``None``
            skips the one-label-per-group check.
        classes: the allowed classes (default: the labels found).
        id_what, group_what: what an id and a group are, for messages.
        fix_group: extra advice appended to the group-conflict error.

    Returns:
        The class names: ``classes`` when given, else the sorted distinct labels.

    Raises:
        ValueError: empty labels, near-duplicate labels (case or spacing), an id listed
            twice, unknown classes, fewer than two classes, a group with two labels. The
            message names the file lines and the fix.
    """
    labels = df[label_col].astype(str).str.strip()
    empty = df.index[(labels == "") | df[label_col].isna()]
    if len(empty):
        raise ValueError(
            f"{source}: {len(empty)} rows have an empty label (column {label_col!r}, lines "
            f"{_lines(empty[:5])}). Fill in the label or remove those rows.")
    found = sorted(labels.unique())
    by_key: dict[str, list[str]] = {}
    for lab in found:
        by_key.setdefault(class_key(lab), []).append(lab)
    near = [v for v in by_key.values() if len(v) > 1]
    if near:
        raw = df[label_col].astype(str)

        def where(lab: str) -> str:  # the value as written (spaces visible) and its first lines
            rows = df.index[labels == lab]
            return f"{sorted(set(raw[rows]))[0]!r} (lines {_lines(rows[:3])})"

        shown = "; ".join(" / ".join(where(x) for x in v) for v in near)
        raise ValueError(
            f"{source}: labels that differ only in case, spaces, '_' or '-' would become separate classes: "
            f"{shown}. Write each class exactly one way in column {label_col!r}.")
    ids = df[id_col].astype(str)
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        first = dup.iloc[0]
        rows = dup.index[dup == first]
        conflict = labels[rows].nunique() > 1
        what = f"with different labels {sorted(labels[rows].unique())}" if conflict else "with the same label"
        raise ValueError(
            f"{source}: {dup.nunique()} {id_what} ids are listed twice (e.g. {first!r} on lines "
            f"{_lines(rows)}, {what}); list each {id_what} once.")
    if classes is not None:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(
                f"{source}: labels {unknown} are not among the expected classes {list(classes)}. "
                "Fix the label file or the --classes option.")
    if len(found) < 2:
        raise ValueError(
            f"{source}: only one class ({found}) -- a classifier needs at least two. "
            f"Check the label column (--label-col, now {label_col!r}).")
    if group_col is not None:
        groups = df[group_col].astype(str)
        per_group = labels.groupby(groups).nunique()
        mixed = per_group.index[per_group > 1].tolist()
        if mixed:
            rows = groups.index[groups == mixed[0]]
            raise ValueError(
                f"{source}: {len(mixed)} {group_what}s have rows with different labels (e.g. {mixed[0]}: "
                f"{sorted(labels[rows].unique())} on lines {_lines(rows[:6])}). Patient-level splits and "
                f"metrics need one label per {group_what}: fix the labels{fix_group}.")
    return list(classes) if classes is not None else found


def class_counts(labels: Sequence[str], groups: Sequence[str], classes: Sequence[str]) -> pd.DataFrame:
    """Items and distinct groups (patients) per class, one row per class in ``classes`` order."""
    d = pd.DataFrame({"label": list(labels), "group": list(groups)})
    out = d.groupby("label").agg(items=("group", "size"), groups=("group", "nunique"))
    return out.reindex(list(classes), fill_value=0)


def describe_classes(labels: Sequence[str], groups: Sequence[str], classes: Sequence[str],
                     items: str = "tiles", group_what: str = "patients") -> str:
    """One line naming every class with its item and group counts, e.g.
    ``2 classes: MSIMUT (1600 tiles, 43 patients), MSS (2929 tiles, 241 patients)``."""
    c = class_counts(labels, groups, classes)
    parts = [f"{name} ({int(r['items'])} {items}, {int(r['groups'])} {group_what})" for name, r in c.iterrows()]
    return f"{len(c)} classes: " + ", ".join(parts)


__all__ = ["read_table", "validate_labels", "class_key", "class_counts", "describe_classes"]
