"""Published one-class results as data: one long-format CSV per source paper in
``benchmark/reference/sources/`` (see the README.md there), validated on load.

A source's rows say who reported what: (method, dataset, class, protocol, metric, value, citation).
A report table asks `reference_values(protocol, dataset)` for the published numbers of its protocol and
shows them beside ours, "ours (their paper)", as it shows the Mem_GANomaly paper's values under the
paper protocol; `citations` gives the footnotes. Values are stored in percent, as published;
`reference_values` returns fractions (the records' AUROC scale) unless asked for percent.

Imports neither torch nor `methods`: the report path uses it.
"""
from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Optional, Protocol, Union

import pandas as pd

from benchmark.datasets import CLASS_NAMES
from benchmark.splits import PROTOCOLS

COLUMNS = ("source", "method", "dataset", "class", "protocol", "metric", "value", "citation")
#: The metrics a source may report: AUROC (Tables 1-3 and every other paper) and the Mem_GANomaly
#: paper's Table 4 threshold metrics.
METRICS = ("auroc", "gmean", "false_alarm_rate", "miss_rate")
UNITS = ("fraction", "percent")
MEAN_ROW = "mean"
_KEY = ("method", "dataset", "class", "protocol", "metric")



class _Traversable(Protocol):
    """What the loader needs of a file or folder: a Path or an importlib.resources Traversable."""
    name: str

    def read_text(self, encoding: Optional[str] = None) -> str: ...

    def iterdir(self) -> Iterator["_Traversable"]: ...


SourcePath = Union[Path, _Traversable]


def sources_dir() -> SourcePath:
    """The package's folder of source CSVs (benchmark/reference/sources/)."""
    return resources.files("benchmark").joinpath("reference", "sources")


def _strip_comments(text: str) -> tuple[str, int]:
    """The CSV text without its leading ``#`` comment lines, and how many lines were dropped."""
    lines = text.splitlines(keepends=True)
    skipped = 0
    while skipped < len(lines) and lines[skipped].lstrip().startswith("#"):
        skipped += 1
    return "".join(lines[skipped:]), skipped


def _parse_class(raw: str, where: str, dataset: str) -> Optional[int]:
    if raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{where}: class must be an integer or empty (a mean-only row), got {raw!r}") from None
    n_classes = len(CLASS_NAMES[dataset])
    if not 0 <= value < n_classes:
        raise ValueError(f"{where}: class {value} out of range 0-{n_classes - 1} for {dataset}")
    return value


def _parse_value(raw: str, where: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{where}: value must be a number (percent), got {raw!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise ValueError(f"{where}: value must be a percentage in [0, 100], got {raw!r}")
    return value


def load_source(path: SourcePath) -> pd.DataFrame:
    """One source file, validated.

    Parameters
    ----------
    path : Path or importlib Traversable
        A CSV with the columns of `COLUMNS`, leading ``#`` lines as comments.

    Returns
    -------
    pandas.DataFrame
        Columns `COLUMNS`; ``class`` is a nullable integer (``<NA>`` for a mean-only row), ``value`` a
        float in percent.

    Raises
    ------
    ValueError
        Naming the file, the line (1-based, counting the comment lines) and the problem: a missing or
        unexpected column, a source that is not the file's stem, an empty field, an unknown dataset,
        protocol or metric, a class that is not an integer of the dataset, a value outside [0, 100], a
        row repeating another's (method, dataset, class, protocol, metric).
    """
    name = getattr(path, "name", str(path))
    stem = name.rsplit(".", 1)[0]
    text, skipped = _strip_comments(path.read_text(encoding="utf-8"))
    raw = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in raw.columns]
    extra = [c for c in raw.columns if c not in COLUMNS]
    if missing or extra:
        problems = ([f"missing column(s) {', '.join(missing)}"] if missing else []) + \
                   ([f"unexpected column(s) {', '.join(map(str, extra))}"] if extra else [])
        raise ValueError(f"{name}: line {skipped + 1}: {'; '.join(problems)} (expected {', '.join(COLUMNS)})")
    rows, seen = [], {}
    for index, row in raw.iterrows():
        line = skipped + 2 + int(index)  # +1 for the header, +1 for 1-based lines
        where = f"{name}: line {line}"
        fields = {c: row[c].strip() for c in COLUMNS}
        for column in ("source", "method", "dataset", "protocol", "metric", "value", "citation"):
            if not fields[column]:
                raise ValueError(f"{where}: empty {column}")
        if fields["source"] != stem:
            raise ValueError(f"{where}: source {fields['source']!r} is not the file's name {stem!r}")
        if fields["dataset"] not in CLASS_NAMES:
            raise ValueError(f"{where}: unknown dataset {fields['dataset']!r}; valid: {', '.join(CLASS_NAMES)}")
        if fields["protocol"] not in PROTOCOLS:
            raise ValueError(f"{where}: unknown protocol {fields['protocol']!r}; valid: {', '.join(PROTOCOLS)}")
        if fields["metric"] not in METRICS:
            raise ValueError(f"{where}: unknown metric {fields['metric']!r}; valid: {', '.join(METRICS)}")
        record = dict(fields, **{"class": _parse_class(fields["class"], where, fields["dataset"]),
                                 "value": _parse_value(fields["value"], where)})
        key = tuple(record[c] for c in _KEY)
        if key in seen:
            raise ValueError(f"{where}: duplicate of line {seen[key]} (same method, dataset, class, protocol, "
                             f"metric: {', '.join(map(str, key))})")
        seen[key] = line
        rows.append(record)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["class"] = frame["class"].astype("Int64")
    frame["value"] = frame["value"].astype(float)
    return frame


def load_sources(directory: Optional[SourcePath] = None) -> pd.DataFrame:
    """Every source file of a folder, validated and concatenated.

    Parameters
    ----------
    directory : Path or Traversable, optional
        The folder of ``*.csv`` sources (default: the package's, `sources_dir`).

    Returns
    -------
    pandas.DataFrame
        `load_source`'s columns, the files in name order. Two sources may report the same
        (method, dataset, class, protocol, metric); one source may not report it twice.
    """
    folder = sources_dir() if directory is None else directory
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".csv")), key=lambda f: f.name)
    frames = [load_source(f) for f in files]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="Int64" if c == "class" else float if c == "value" else object)
                             for c in COLUMNS})
    return pd.concat(frames, ignore_index=True)


def _select(sources: Optional[pd.DataFrame], protocol: str, dataset: Optional[str], metric: Optional[str],
            methods: Optional[Iterable[str]] = None) -> pd.DataFrame:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid choices: {', '.join(PROTOCOLS)}")
    frame = load_sources() if sources is None else sources
    keep = frame["protocol"] == protocol
    if dataset is not None:
        keep &= frame["dataset"] == dataset
    if metric is not None:
        keep &= frame["metric"] == metric
    if methods is not None:
        keep &= frame["method"].isin(list(methods))
    return frame[keep]


def _column_labels(selected: pd.DataFrame) -> pd.Series:
    """A method's label, or "method (source)" where two sources report the same method here."""
    sources_per_method = selected.groupby("method")["source"].nunique()
    shared = set(sources_per_method[sources_per_method > 1].index)
    return selected.apply(lambda r: f"{r['method']} ({r['source']})" if r["method"] in shared else r["method"],
                          axis=1)


def reference_values(protocol: str, dataset: str, metric: str = "auroc", unit: str = "fraction",
                     sources: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """The published values of one protocol and dataset, class x method.

    Parameters
    ----------
    protocol : str
        One of `benchmark.splits.PROTOCOLS`: only rows of this protocol are returned, so the standard
        protocol never shows the Mem_GANomaly paper's numbers and the paper protocol never shows
        GEOM's or GOAD's.
    dataset : str
        A registered dataset name.
    metric : str
        One of `METRICS` (default AUROC).
    unit : {"fraction", "percent"}
        ``"fraction"`` (default): value / 100, rounded to 10 decimals, the records' AUROC scale (the
        Mem_GANomaly rows then equal benchmark/reference/table*.csv exactly); ``"percent"``: as published.
    sources : pandas.DataFrame, optional
        `load_sources`' frame (default: the package's sources).

    Returns
    -------
    pandas.DataFrame
        Index: the normal classes (int, ascending), then ``"mean"`` when some source gives a mean
        (mean-only rows land there); columns: the method labels in first-appearance order (a method
        reported by two sources under this protocol becomes one column per source, "method (source)");
        NaN where a source gives no value. Empty (no rows, no columns) when no source matches.
    """
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; valid choices: {', '.join(UNITS)}")
    selected = _select(sources, protocol, dataset, metric)
    if selected.empty:
        return pd.DataFrame()
    values = selected["value"] / 100.0 if unit == "fraction" else selected["value"]
    if unit == "fraction":
        values = values.round(10)
    long = pd.DataFrame({"row": [MEAN_ROW if pd.isna(c) else int(c) for c in selected["class"]],
                         "column": _column_labels(selected).to_numpy(), "value": values.to_numpy()})
    table = long.pivot(index="row", columns="column", values="value")
    classes = sorted(r for r in table.index if r != MEAN_ROW)
    order = classes + ([MEAN_ROW] if MEAN_ROW in table.index else [])
    columns = list(dict.fromkeys(long["column"]))
    table = table.reindex(index=order, columns=columns)
    table.index.name, table.columns.name = "normal_class", None
    return table


def citations(protocol: str, dataset: Optional[str] = None, metric: Optional[str] = "auroc",
              sources: Optional[pd.DataFrame] = None) -> dict[str, str]:
    """Where the published values of a protocol come from, by the column labels of `reference_values`.

    Parameters
    ----------
    protocol : str
        One of `benchmark.splits.PROTOCOLS`.
    dataset : str, optional
        Only this dataset's rows (default: all datasets).
    metric : str, optional
        Only this metric's rows (default AUROC; None: all metrics).
    sources : pandas.DataFrame, optional
        `load_sources`' frame (default: the package's sources).

    Returns
    -------
    dict of str to str
        Column label -> its citations, distinct, joined with "; " (one method's rows may cite several
        tables of one paper).
    """
    selected = _select(sources, protocol, dataset, metric)
    if selected.empty:
        return {}
    labels = _column_labels(selected)
    out: dict[str, list[str]] = {}
    for label, citation in zip(labels, selected["citation"]):
        if citation not in out.setdefault(label, []):
            out[label].append(citation)
    return {label: "; ".join(cites) for label, cites in out.items()}
