"""The published values a report compares with (read through `benchmark.references`, the one reader
of benchmark/reference/), the detectors' display labels, the one detector order of every table
(Tables 1-4, seeds, verdicts, best epoch, memory health, records.csv) and which detectors have a memory
(`memory_size_param`).

Below both the reports (benchmark/reports.py) and the verdict (benchmark/verdict.py), which import it.
Like them, it never loads torch: it reads the detector registry (`methods`, torch-free) but no detector
module, whose imports load torch.
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import re
from typing import Iterable, Optional, Union

import pandas as pd

from benchmark.datasets import CLASS_NAMES
from benchmark.datasets import PAPER_TABLES as TABLES  # dataset -> ("table<k>", reference CSV)
from benchmark.metrics import THRESHOLD_METRICS
from benchmark.references import MEAN_ROW, citations, load_sources, reference_values
from methods import REGISTRY

#: The class attribute through which a detector says which constructor argument sizes its memory
#: (`methods.base.Detector.memory_size_param`).
MEMORY_SIZE_ATTRIBUTE = "memory_size_param"
#: The old file name of the paper's Table 4 (`reference_table`).
TABLE4_CSV = "table4_mnist_threshold_metrics.csv"


@functools.lru_cache(maxsize=1)
def _sources() -> pd.DataFrame:
    """Every source of benchmark/reference/sources/, read and validated once per process."""
    return load_sources()


def published_values(protocol: str, dataset: str, metric: str = "auroc") -> pd.DataFrame:
    """The published values a report of `protocol` compares with, by class name.

    Parameters
    ----------
    protocol : str
        The records' protocol: "paper" gives the Mem_GANomaly paper's values (Tables 1-4), another
        protocol every source's values for it (e.g. Ruff et al.'s Deep SVDD, GEOM, GOAD under
        "standard"), never the Mem_GANomaly paper's.
    dataset : str
        A registered dataset name.
    metric : str, default="auroc"
        One of `benchmark.references.METRICS`.

    Returns
    -------
    pandas.DataFrame
        Index: the dataset's class names in label order, then "mean" (always all of them); columns: the
        method labels of `benchmark.references.reference_values` (none when no source matches); values
        as fractions, NaN where a source gives none (a mean-only source has values in "mean" only).
    """
    classes = CLASS_NAMES[dataset]
    values = reference_values(protocol, dataset, metric, sources=_sources())
    values = values.rename(index={i: name for i, name in enumerate(classes)})
    return values.reindex(index=[*classes, MEAN_ROW]).astype(float)


def published_citations(protocol: str, dataset: str, metric: str = "auroc") -> dict[str, str]:
    """Column label of `published_values` -> where its values come from (`benchmark.references.citations`)."""
    return citations(protocol, dataset, metric, sources=_sources())


def reference_word(protocol: str) -> str:
    """What the tables call the published values: "paper" (the Mem_GANomaly paper's, under its own
    protocol), else "published" (other papers' values, several sources)."""
    return "paper" if protocol == "paper" else "published"


def runnable_labels() -> set[str]:
    """The labels of the registered detectors: a published method outside this set (GEOM, GOAD) gets a
    column of its published values alone in the AUROC tables."""
    return {spec.label for spec in REGISTRY.values()}


def reference_table(csv_name: str) -> pd.DataFrame:
    """One of the Mem_GANomaly paper's tables in its old wide layout, read through `benchmark.references`.

    benchmark/reference/table*.csv, which the paper's tables were typed into, are no longer read by the
    package: their numbers are the source zhou2022_mem_ganomaly.csv (tests/test_references.py checks
    that every cell agrees).

    Parameters
    ----------
    csv_name : str
        A Tables 1-3 name of `benchmark.datasets.PAPER_TABLES` (e.g. "table1_mnist_auroc.csv") or
        "table4_mnist_threshold_metrics.csv".

    Returns
    -------
    pandas.DataFrame
        Tables 1-3: index the class names (`benchmark.datasets.CLASS_NAMES`) and "mean", one column per
        method, in the paper's order;
        Table 4: index gmean, false_alarm_rate, miss_rate, one column per method.
    """
    if csv_name == TABLE4_CSV:
        rows = {metric: reference_values("paper", "mnist", metric, sources=_sources()).loc[MEAN_ROW]
                for metric in THRESHOLD_METRICS}
        table = pd.DataFrame(rows).T
        table.index.name = "metric"
        return table
    dataset = next((name for name, (_, csv) in TABLES.items() if csv == csv_name), None)
    if dataset is None:
        raise ValueError(f"no paper table named {csv_name!r}; known: "
                         f"{', '.join([csv for _, csv in TABLES.values()] + [TABLE4_CSV])}")
    table = published_values("paper", dataset)
    table.index.name = "normal_class"
    return table


def paper_labels() -> list[str]:
    """The paper's seven method labels in its column order (Tables 1-3)."""
    return list(_paper_labels())


@functools.lru_cache(maxsize=1)
def _paper_labels() -> tuple[str, ...]:
    return tuple(reference_values("paper", "mnist", sources=_sources()).columns)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def display_label(record: dict) -> str:
    """The record's display label.

    Parameters
    ----------
    record : dict
        A job record.

    Returns
    -------
    str
        The record's `method_label`; for older records the paper's label of the same method
        (`mem_ganomaly` -> `Mem_GANomaly`), else the method name.
    """
    label = record.get("method_label")
    if isinstance(label, str) and label:
        return label
    by_key = {_key(label): label for label in paper_labels()}
    return by_key.get(_key(record["method"]), record["method"])


def method_order(labels: Union[pd.DataFrame, Iterable[str]]) -> list[str]:
    """The detector order of every table (Tables 1-4, seeds, verdicts, best epoch, memory health, records.csv).

    Parameters
    ----------
    labels : pandas.DataFrame or iterable of str
        Record rows (`benchmark.reports.load_records`' columns; their `label` column is used) or display
        labels.

    Returns
    -------
    list of str
        The labels present, each once: the paper's Table 1 column order first (iForest, DAGMM, f-AnoGAN,
        MemAE, GANomaly, DSVDD, Mem_GANomaly), then any other detector alphabetically.
    """
    if isinstance(labels, pd.DataFrame):
        labels = labels["label"] if len(labels) else []
    present = set(labels)
    first = paper_labels()
    return [m for m in first if m in present] + sorted(present - set(first))


def memory_size_param(method: str) -> Optional[str]:
    """The constructor argument that sets the size of `method`'s memory module, None without one.

    The detector's own answer, its class attribute `methods.base.Detector.memory_size_param` (MemAE:
    "num_slots", Mem_GANomaly: "memory_size"), read from the class's source rather than by importing it:
    the detector modules import torch at module level, and the report path must not load torch
    (tests/test_report_page.py). The class is the registry's target (`methods.MethodSpec.target`); the
    attribute is looked up as Python would, in the class body, then its bases in order, following
    ``from <module> import <Class>`` within the package, down to `methods.base.Detector`'s None.
    tests/test_report_producers.py checks that this agrees with the imported classes for every
    registered detector.

    Parameters
    ----------
    method : str
        A method's registry name, as in a record's ``method``.

    Returns
    -------
    str or None
        The argument's name; None for a detector without a memory and for a name the registry does not
        hold (``pyod:<model>``, whose wrapper has no memory, or a detector since removed).
    """
    spec = REGISTRY.get(method)
    if spec is None:
        return None
    module, class_name = spec.target.split(":")
    return _declared_attribute(module, class_name, MEMORY_SIZE_ATTRIBUTE)


@functools.lru_cache(maxsize=None)
def _module_tree(module: str) -> Optional[ast.Module]:
    found = importlib.util.find_spec(module)  # imports the parent package only, never `module` itself
    if found is None or found.origin is None or not found.origin.endswith(".py"):
        return None
    with open(found.origin, encoding="utf-8") as handle:
        return ast.parse(handle.read(), filename=found.origin)


def _declared_attribute(module: str, class_name: str, attribute: str) -> Optional[str]:
    found, value = _lookup(module, class_name, attribute)
    return value if found else None


def _lookup(module: str, class_name: str, attribute: str) -> tuple[bool, Optional[str]]:
    """(found, value): the constant assigned to `attribute` in the body of class `module`:`class_name`, else
    in its bases in order (depth first, as Python's lookup for single inheritance), following the bases
    defined in the module or imported from the same package; (False, None) when none assigns it."""
    tree = _module_tree(module)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)} if tree else {}
    if class_name not in classes:
        return False, None
    for statement in classes[class_name].body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
        elif isinstance(statement, ast.AnnAssign):
            target = statement.target
        else:
            continue
        if isinstance(target, ast.Name) and target.id == attribute:
            value = statement.value.value if isinstance(statement.value, ast.Constant) else None
            return True, value if isinstance(value, str) else None
    package = module.split(".")[0]
    imported = {alias.asname or alias.name: (node.module, alias.name) for node in tree.body
                if isinstance(node, ast.ImportFrom) and node.module and not node.level
                and node.module.split(".")[0] == package for alias in node.names}
    for base in classes[class_name].bases:
        if isinstance(base, ast.Name) and (base.id in classes or base.id in imported):
            found, value = _lookup(*((module, base.id) if base.id in classes else imported[base.id]), attribute)
            if found:
                return True, value
    return False, None
