"""The paper's reference tables (benchmark/reference/), the detectors' display labels and the one
detector order of every table (Tables 1-4, seeds, verdicts, best epoch, memory health, records.csv).

Below both the reports (benchmark/reports.py) and the verdict (benchmark/verdict.py), which import it.
Like them, it reads records only: it imports neither `methods` nor torch.
"""
from __future__ import annotations

import re
from importlib import resources
from typing import Iterable, Union

import pandas as pd

from benchmark.datasets import PAPER_TABLES as TABLES  # dataset -> ("table<k>", reference CSV)


def reference_table(csv_name: str) -> pd.DataFrame:
    """The paper's numbers, shipped as package data (benchmark/reference/).

    Parameters
    ----------
    csv_name : str
        File name of the table under benchmark/reference/.

    Returns
    -------
    pandas.DataFrame
        The table.
    """
    with resources.files("benchmark").joinpath("reference", csv_name).open("r") as handle:
        return pd.read_csv(handle, index_col=0)


def paper_labels() -> list[str]:
    """The paper's seven method labels in its column order (Tables 1-3)."""
    return list(reference_table(TABLES["mnist"][1]).columns)


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
