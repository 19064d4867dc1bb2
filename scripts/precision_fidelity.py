"""Does bf16 training change AUROC? Records of the same jobs trained in fp32 and in bf16, compared per
method, with a verdict: "within seed noise" or "differs" (and which way).

    python scripts/precision_fidelity.py --fp32 results/quick --bf16 results/quick+bf16 \\
        --out reports/published/<folder> [--methods mem_ganomaly ganomaly]

Inputs. ``--fp32`` and ``--bf16`` are results folders as the runner writes them
(``<results>/<profile>/<protocol>/<dataset>/<method>/class<k>_seed<s>.json``): a results root, a profile
folder or any folder below one. A bf16 run writes into ``<profile>+bf16`` and each record of a deep
detector says its precision in ``run_info.precision``. When a folder given is ABOVE the profile folders
(a results root holding both ``quick`` and ``quick+bf16``, say), each side takes the profile folders of its
own precision by name (``+bf16`` in the name: bf16) and the report lists the ones left out. Then every
record of a side must be of that side's precision, or the script refuses (exit 2): by ``run_info.precision``
where the record has it, else by its profile name (records of methods without a precision setting, such as
iForest, and failed records record none). Records are read with ``benchmark.records.iter_records``
(checksums included); unreadable ones are listed, not used.

Pairs. A job is (dataset, method, normal class, seed, protocol); a pair is a job with an ``ok`` record on
both sides. Every job that is not a pair (on one side only, or not ``ok`` on one side) is listed in the
report, never dropped silently. A side holding two records of one job (two profile folders of the same
precision under the folder given) is refused: point at one profile folder. The script refuses (exit 2) when
a pair differs in anything besides precision that makes its AUROCs non-comparable: hyperparameters (all but
``random_state`` and ``device``), sampling (sample seed, caps, ``val_fraction``), data sizes, the base
profile, the detector's class, the device type (cpu / cuda). Differences that change the time but not the
job (thread count, CPU or GPU model), or that may change AUROC slightly without being a different job (git
commit, torch version, stacked training, CUDA graphs, --track-auroc) are warnings, listed in the report.

Per method (pooled over the datasets and protocols present), with d = AUROC(bf16) - AUROC(fp32) per pair:

- number of pairs, classes, seeds per class;
- mean, sd (ddof = 1), t-based 95% confidence interval of the mean, the largest |d| and its job;
- Wilcoxon signed-rank test of d (scipy.stats.wilcoxon, two-sided, ``zero_method="zsplit"``: a zero
  difference is evidence of "no change", so it is kept and its rank split between the two signs; the
  default "wilcox" would drop it and test the few non-zero pairs as if they were all): n, statistic, p;
- the fp32 seed noise sigma: per class (dataset, protocol, normal class) the sd (ddof = 1) over its paired
  seeds of the fp32 AUROC, averaged over the classes with at least 2 seeds ("no seed noise available" when
  none has 2);
- the training-time ratio fp32 / bf16 (``train_seconds``), median over the pairs trained solo on both
  sides (a stacked record's seconds are its group's), with the machines the records name.

THE RULE (stated in fidelity.md too): a method is **within seed noise** when the Wilcoxon test finds no
systematic shift (p >= 0.05) AND |mean d| <= sigma (the mean per-class fp32 seed sd); otherwise it
**differs**, "bf16 lower" or "bf16 higher" by the sign of mean d. Without a seed sd (one seed per class) a
method differs when the test finds a shift, and has no verdict otherwise.
Why this rule: the test alone is not enough (with few pairs it cannot see even a large shift: with n
non-zero pairs no outcome reaches p < 0.05 unless 2 / 2**n < 0.05, i.e. n >= 6; with many pairs it flags
shifts too small to matter), so the shift must also be no larger than what changing the seed does to one
run. A stricter margin, sigma / sqrt(s) (the standard error of a seed-mean cell of the reports, s seeds),
is not used for the verdict: mean d is itself noisy, its standard error about sqrt(2) * sigma / sqrt(n)
when bf16 and fp32 runs of one seed decorrelate, so with 9 pairs (3 classes x 3 seeds) an unchanged method
would be called "differs" about 3 times in 10 (a simulation with normal AUROCs, sigma estimated as here;
this rule: about 1 in 9). It is shown beside the verdict for the reader who wants it.

Outputs, in ``--out``: fidelity.md (what was compared, the command, the rule, warnings, a table and a
plain-words line per method, the unpaired jobs) and fidelity.csv (one row of numbers per method).
Exit status: 0 written; 2 refused (wrong precision on a side, non-comparable pairs, no pairs, bad folder).
"""
from __future__ import annotations

import argparse
import csv
import math
import shlex
import statistics
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from scipy import stats

try:
    from benchmark.records import iter_records
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmark.records import iter_records

PRECISIONS = ("fp32", "bf16")
ALPHA = 0.05
ZERO_METHOD = "zsplit"
WITHIN = "within seed noise"
DIFFERS = "differs"
NO_NOISE = "no seed noise available"
NOT_SETTINGS = ("random_state", "device")  # per job / where, not what: never a reason to refuse
RULE = ("A method is **within seed noise** when the Wilcoxon signed-rank test of the paired differences "
        "d = AUROC(bf16) - AUROC(fp32) finds no systematic shift (two-sided p >= 0.05, zero differences kept "
        "with zero_method='zsplit') AND |mean d| <= sigma, the fp32 seed noise (per class the sd over seeds of "
        "the fp32 AUROC, ddof = 1, averaged over the classes with at least 2 seeds); otherwise it **differs** "
        "(bf16 lower / higher by the sign of mean d). No seed noise (one seed per class): differs when the test "
        "finds a shift, else no verdict. The test "
        "alone cannot see a shift with few pairs (fewer than 6 non-zero pairs never reach p < 0.05) and flags "
        "negligible ones with many, hence the size condition: bf16 must move AUROC by no more than changing "
        "the seed does. The stricter margin sigma/sqrt(s) (the standard error of a seed-mean cell, s seeds) is "
        "shown for reference, not used: mean d is itself noisy (standard error about sqrt(2)*sigma/sqrt(pairs)), "
        "so with few pairs it would call unchanged methods 'differs' too often (simulated, 3 classes x 3 seeds: "
        "about 3 in 10, against about 1 in 9 for this rule).")
CSV_COLUMNS = ["method", "label", "datasets", "protocols", "pairs", "classes", "seeds_per_class", "mean_diff",
               "sd_diff", "ci95_low", "ci95_high", "max_abs_diff", "max_abs_diff_job", "wilcoxon_n",
               "wilcoxon_nonzero", "wilcoxon_statistic", "wilcoxon_p", "wilcoxon_zero_method", "seed_sd",
               "seed_sd_classes", "seed_mean_se", "abs_mean_over_seed_sd", "verdict", "direction",
               "time_ratio_fp32_over_bf16", "time_pairs", "fp32_machine", "bf16_machine", "precision_recorded"]


class Refusal(Exception):
    """The comparison cannot be made as asked: the message says why (exit status 2)."""


Key = tuple  # (dataset, method, normal_class, seed, protocol)


@dataclass
class Entry:
    """One record of a side: where it is and what it says."""
    path: Path
    record: dict

    @property
    def status(self) -> str:
        return self.record["status"]

    @property
    def auroc(self) -> float:
        return float(self.record["metrics"]["auroc"])


@dataclass
class Side:
    """The records of one precision, by job."""
    precision: str
    folder: Path
    records: dict = field(default_factory=dict)            # Key -> Entry
    profiles: dict = field(default_factory=dict)           # profile name -> number of records used
    skipped_profiles: dict = field(default_factory=dict)   # profile name -> records left out (other precision)
    unreadable: list = field(default_factory=list)         # messages
    filtered: int = 0                                      # records of methods not asked for (--methods)
    other_methods: set = field(default_factory=set)        # their methods


@dataclass
class Pair:
    """A job with an ok record on both sides."""
    key: Key
    fp32: Entry
    bf16: Entry

    @property
    def difference(self) -> float:
        return self.bf16.auroc - self.fp32.auroc


@dataclass
class Comparison:
    """Everything the report says."""
    fp32: Side
    bf16: Side
    pairs: list
    unpaired: list          # (Key, reason)
    warnings: dict          # message -> [job labels]
    summaries: list         # one dict per method


# ---- records ------------------------------------------------------------------------------------
def job_key(record: dict) -> Key:
    """(dataset, method, normal_class, seed, protocol): what pairs two records."""
    return (record["dataset"], record["method"], int(record["normal_class"]), int(record["seed"]), record["protocol"])


def job_label(key: Key) -> str:
    """``dataset/method/class<k>/seed<s>`` (with the protocol when it is not the paper's)."""
    dataset, method, normal_class, seed, protocol = key
    return f"{dataset}/{method}/class{normal_class}/seed{seed}" + ("" if protocol == "paper" else f" ({protocol})")


def profile_precision(profile: str) -> str:
    """The precision a profile folder's name says: ``bf16`` for ``<profile>[+tags]+bf16``, else fp32."""
    return "bf16" if "bf16" in profile.split("+")[1:] else "fp32"


def record_precision(record: dict) -> tuple[str, bool]:
    """(precision, recorded): ``run_info.precision`` when the record has it (True), else the profile
    name's (False: a method without a precision setting, or a job that failed before recording it)."""
    precision = (record.get("run_info") or {}).get("precision")
    if isinstance(precision, str) and precision:
        return precision, True
    return profile_precision(record["profile"]), False


def load_side(folder: Path, precision: str, methods: Optional[Sequence[str]] = None) -> Side:
    """The records of one side, checked to be of `precision`.

    Parameters
    ----------
    folder : Path
        A results root, a profile folder or any folder below one.
    precision : str
        "fp32" or "bf16": what every record used must be.
    methods : sequence of str, optional
        Keep only these methods (registry names).

    Returns
    -------
    Side

    Raises
    ------
    Refusal
        No such folder, no record of `precision`, a record of the other precision, or two records of one job.
    """
    folder = Path(folder)
    flag = f"--{precision}"
    if not folder.is_dir():
        raise Refusal(f"{flag} {folder}: no such folder")
    side = Side(precision, folder)
    wrong: list[str] = []
    seen: dict = {}
    duplicates: list[str] = []
    for path, record, error in iter_records(folder):
        if record is None:
            side.unreadable.append(error)
            continue
        profile = record["profile"]
        profile_dir = path.parents[3] if len(path.parents) > 3 else folder
        if folder in profile_dir.parents and profile_precision(profile) != precision:
            # a folder above the profile folders: take those of this side's precision by name
            side.skipped_profiles[profile] = side.skipped_profiles.get(profile, 0) + 1
            continue
        if methods and record["method"] not in methods:
            side.filtered += 1
            side.other_methods.add(record["method"])
            continue
        found, recorded = record_precision(record)
        if found != precision:
            wrong.append(f"{path} ({found}, {'run_info.precision' if recorded else 'by its profile name'})")
            continue
        key = job_key(record)
        if key in side.records:
            duplicates.append(f"{job_label(key)}: {side.records[key].path} and {path}")
            seen.setdefault(key, [side.records[key].record["profile"]]).append(profile)
            continue
        side.records[key] = Entry(path, record)
        side.profiles[profile] = side.profiles.get(profile, 0) + 1
    if wrong:
        other = " / ".join(sorted({w.split(" (")[1].split(",")[0] for w in wrong}))
        raise Refusal(f"the {flag} folder {folder} holds {len(wrong)} record(s) that are not {precision} "
                      f"({other}), e.g.\n  " + "\n  ".join(wrong[:5])
                      + f"\npoint {flag} at the {precision} run's records "
                      + ("(a <profile>+bf16 folder, or the results root holding it)" if precision == "bf16"
                         else "(a profile folder without +bf16, or the results root holding it)"))
    if duplicates:
        profiles = sorted({p for names in seen.values() for p in names})
        raise Refusal(f"the {flag} folder {folder} holds more than one {precision} record of {len(duplicates)} "
                      f"job(s), from the profile folders {', '.join(profiles)}, e.g.\n  "
                      + "\n  ".join(duplicates[:5]) + f"\npoint {flag} at one profile folder")
    if not side.records:
        details = []
        if side.skipped_profiles:
            details.append("its profile folders of the other precision, left out: "
                           + ", ".join(f"{p} ({n} records)" for p, n in sorted(side.skipped_profiles.items())))
        if side.filtered:
            details.append(f"{side.filtered} record(s) of other methods than --methods {' '.join(methods)} "
                           f"(methods there: {', '.join(sorted(side.other_methods))})")
        if side.unreadable:
            details.append(f"{len(side.unreadable)} unreadable record(s)")
        raise Refusal(f"no {precision} records under {flag} {folder}" + ("; " + "; ".join(details) if details else ""))
    return side


# ---- comparability --------------------------------------------------------------------------------
def _settings(record: dict) -> Optional[dict]:
    hyper = record.get("hyperparameters")
    if not isinstance(hyper, dict):
        return None
    return {k: v for k, v in hyper.items() if k not in NOT_SETTINGS}


def _dict_difference(a: dict, b: dict) -> str:
    names = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    return ", ".join(f"{k} {a.get(k, '<absent>')!r} (fp32) vs {b.get(k, '<absent>')!r} (bf16)" for k in names)


def _device_type(record: dict) -> Optional[str]:
    device = (record.get("run_info") or {}).get("device")
    return str(device).split(":")[0] if device else None


def _threads(record: dict) -> tuple:
    return record.get("threads"), (record.get("run_info") or {}).get("torch_num_threads")


def _stack_size(record: dict) -> int:
    return int((record.get("stack") or {}).get("size", 1) or 1)


def machine(record: dict) -> str:
    """The machine a record says it trained on: device, GPU or CPU model, threads, host."""
    info = record.get("run_info") or {}
    device = _device_type(record) or "unknown device"
    parts = [device]
    model = info.get("gpu_name") if device == "cuda" else record.get("cpu_model")
    if model:
        parts.append(str(model))
    threads = record.get("threads", info.get("torch_num_threads"))
    if threads is not None:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    host = record.get("worker_host") or record.get("host")
    if host:
        parts.append(f"host {host}")
    return ", ".join(parts)


def comparability(fp32: dict, bf16: dict) -> tuple[list[str], list[str]]:
    """What keeps two records of one job from being compared (problems), and what only needs saying (warnings).

    Parameters
    ----------
    fp32, bf16 : dict
        The two records of one job.

    Returns
    -------
    problems : list of str
        Differences besides precision that make the AUROCs non-comparable (the script refuses).
    warnings : list of str
        Differences that change the time, or may change AUROC slightly without being another job.
    """
    problems, notes = [], []
    a, b = _settings(fp32), _settings(bf16)
    if a is not None and b is not None:
        if a != b:
            problems.append(f"hyperparameters differ: {_dict_difference(a, b)}")
    elif a is not None or b is not None:
        notes.append("hyperparameters recorded on one side only: not checked")
    for name in ("sampling", "sizes"):
        a, b = fp32.get(name), bf16.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            if a != b:
                problems.append(f"{name} differ: {_dict_difference(a, b)}")
        elif a is not None or b is not None:
            notes.append(f"{name} recorded on one side only: not checked")
    base_a = fp32.get("base_profile", fp32["profile"].split("+")[0])
    base_b = bf16.get("base_profile", bf16["profile"].split("+")[0])
    if base_a != base_b:
        problems.append(f"base profile differs: {base_a} (fp32) vs {base_b} (bf16)")
    if fp32.get("method_class") and bf16.get("method_class") and fp32["method_class"] != bf16["method_class"]:
        problems.append(f"detector class differs: {fp32['method_class']} (fp32) vs {bf16['method_class']} (bf16)")
    dev_a, dev_b = _device_type(fp32), _device_type(bf16)
    if dev_a and dev_b and dev_a != dev_b:
        problems.append(f"device type differs: {dev_a} (fp32) vs {dev_b} (bf16)")
    if _threads(fp32) != _threads(bf16):
        notes.append(f"thread count differs: fp32 {_threads(fp32)[0]} (torch {_threads(fp32)[1]}), "
                     f"bf16 {_threads(bf16)[0]} (torch {_threads(bf16)[1]}): training times are not comparable, "
                     "CPU results may differ in the last bits")
    info_a, info_b = fp32.get("run_info") or {}, bf16.get("run_info") or {}
    model_a = info_a.get("gpu_name") if dev_a == "cuda" else fp32.get("cpu_model")
    model_b = info_b.get("gpu_name") if dev_b == "cuda" else bf16.get("cpu_model")
    if model_a and model_b and model_a != model_b:
        notes.append(f"machine differs: {model_a} (fp32) vs {model_b} (bf16): training times are not comparable")
    commit_a, commit_b = (fp32.get("git") or {}).get("commit"), (bf16.get("git") or {}).get("commit")
    if commit_a and commit_b and commit_a != commit_b:
        notes.append(f"made at different commits: {commit_a[:10]} (fp32) vs {commit_b[:10]} (bf16): "
                     "a difference may also come from code changes")
    torch_a, torch_b = (fp32.get("versions") or {}).get("torch"), (bf16.get("versions") or {}).get("torch")
    if torch_a and torch_b and torch_a != torch_b:
        notes.append(f"torch versions differ: {torch_a} (fp32) vs {torch_b} (bf16)")
    if _stack_size(fp32) != _stack_size(bf16):
        notes.append(f"stacked training differs: {_stack_size(fp32)} job(s) (fp32) vs {_stack_size(bf16)} (bf16) "
                     "trained together (stacked = solo up to rounding); left out of the time ratio")
    if bool(info_a.get("cuda_graphs")) != bool(info_b.get("cuda_graphs")):
        notes.append(f"CUDA graphs differ: {bool(info_a.get('cuda_graphs'))} (fp32) vs "
                     f"{bool(info_b.get('cuda_graphs'))} (bf16)")
    if bool(fp32.get("diagnostics")) != bool(bf16.get("diagnostics")):
        notes.append(f"--track-auroc differs: {bool(fp32.get('diagnostics'))} (fp32) vs "
                     f"{bool(bf16.get('diagnostics'))} (bf16) (per-epoch scoring counts in train_seconds); "
                     "left out of the time ratio")
    return problems, notes


def pair_up(fp32: Side, bf16: Side) -> tuple[list[Pair], list[tuple[Key, str]]]:
    """The jobs with an ok record on both sides, and every other job with the reason it is not a pair."""
    pairs, unpaired = [], []
    for key in sorted(set(fp32.records) | set(bf16.records)):
        a, b = fp32.records.get(key), bf16.records.get(key)
        if b is None:
            unpaired.append((key, f"only in the fp32 folder (status {a.status})"))
        elif a is None:
            unpaired.append((key, f"only in the bf16 folder (status {b.status})"))
        elif a.status != "ok" or b.status != "ok":
            unpaired.append((key, f"not ok on both sides: fp32 {a.status}, bf16 {b.status}"))
        else:
            pairs.append(Pair(key, a, b))
    return pairs, unpaired


# ---- numbers --------------------------------------------------------------------------------------
def wilcoxon(differences: Sequence[float]) -> dict:
    """Two-sided Wilcoxon signed-rank test of paired differences, zeros kept (zero_method="zsplit").

    Returns
    -------
    dict
        n (pairs), nonzero, statistic, p (nan without pairs), min_p (the smallest p any outcome of
        `nonzero` non-zero pairs could give: 2 / 2**nonzero), zero_method.
    """
    d = np.asarray(differences, dtype=float)
    nonzero = int((d != 0).sum())
    result = {"n": len(d), "nonzero": nonzero, "statistic": math.nan, "p": math.nan, "zero_method": ZERO_METHOD,
              "min_p": min(1.0, 2.0 / 2 ** nonzero) if nonzero else 1.0}
    if len(d):
        with warnings.catch_warnings():  # all differences zero: scipy says p = 1 after a 0/0 in its z
            warnings.simplefilter("ignore", RuntimeWarning)
            test = stats.wilcoxon(d, zero_method=ZERO_METHOD, alternative="two-sided")
        result["statistic"], result["p"] = float(test.statistic), float(test.pvalue)
        if nonzero == 0 and math.isnan(result["p"]):
            result["p"] = 1.0
    return result


def seed_noise(pairs: Sequence[Pair]) -> dict:
    """The fp32 seed noise of the paired jobs: per class (dataset, protocol, normal class) the sd (ddof = 1)
    over its seeds of the fp32 AUROC, averaged over the classes with at least 2 seeds.

    Returns
    -------
    dict
        sd (None when no class has 2 seeds), classes_used, classes, seeds (sorted seed counts per class).
    """
    by_class: dict = defaultdict(list)
    for pair in pairs:
        dataset, _, normal_class, _, protocol = pair.key
        by_class[(dataset, protocol, normal_class)].append(pair.fp32.auroc)
    sds = [float(np.std(values, ddof=1)) for values in by_class.values() if len(values) >= 2]
    return {"sd": float(np.mean(sds)) if sds else None, "classes_used": len(sds), "classes": len(by_class),
            "seeds": sorted(len(v) for v in by_class.values())}


def time_ratio(pairs: Sequence[Pair]) -> dict:
    """Median over pairs of train_seconds(fp32) / train_seconds(bf16): pairs trained solo on both sides,
    with the same --track-auroc setting, and both times recorded. Also the machines the records name."""
    ratios, machines = [], {"fp32": set(), "bf16": set()}
    for pair in pairs:
        a, b = pair.fp32.record, pair.bf16.record
        ta, tb = a.get("train_seconds"), b.get("train_seconds")
        if not (isinstance(ta, (int, float)) and isinstance(tb, (int, float)) and ta > 0 and tb > 0):
            continue
        if _stack_size(a) > 1 or _stack_size(b) > 1 or bool(a.get("diagnostics")) != bool(b.get("diagnostics")):
            continue
        ratios.append(ta / tb)
        machines["fp32"].add(machine(a))
        machines["bf16"].add(machine(b))
    return {"ratio": float(statistics.median(ratios)) if ratios else None, "pairs": len(ratios),
            "fp32_machine": "; ".join(sorted(machines["fp32"])), "bf16_machine": "; ".join(sorted(machines["bf16"]))}


def decide(mean: float, p: float, sigma: Optional[float], median: float = 0.0) -> tuple[str, str]:
    """The verdict by THE RULE (module docstring): (verdict, direction).

    Parameters
    ----------
    mean : float
        Mean paired difference bf16 - fp32.
    p : float
        Wilcoxon two-sided p (nan counts as no shift found).
    sigma : float or None
        Mean per-class fp32 seed sd; None (no seed noise): "differs" when p < ALPHA, else no verdict.
    median : float
        Median difference: the direction when the mean is exactly zero.

    Returns
    -------
    verdict : str
        WITHIN, DIFFERS or "no verdict (no seed noise available)".
    direction : str
        "bf16 lower", "bf16 higher" or "" (within / no verdict / no direction).
    """
    shift_found = not math.isnan(p) and p < ALPHA
    if sigma is None and not shift_found:
        return f"no verdict ({NO_NOISE})", ""
    if not shift_found and abs(mean) <= sigma:
        return WITHIN, ""
    sign = mean if mean != 0 else median
    return DIFFERS, "bf16 lower" if sign < 0 else "bf16 higher" if sign > 0 else ""


def summarize(method: str, pairs: Sequence[Pair]) -> dict:
    """Every number of one method's row (see CSV_COLUMNS) from its pairs."""
    d = np.array([pair.difference for pair in pairs], dtype=float)
    n = len(d)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    else:
        low = high = math.nan
    worst = int(np.argmax(np.abs(d)))
    test = wilcoxon(d)
    noise = seed_noise(pairs)
    sigma = noise["sd"]
    seeds = noise["seeds"]
    typical_seeds = int(statistics.median(seeds)) if seeds else 0
    verdict, direction = decide(mean, test["p"], sigma, float(np.median(d)))
    timing = time_ratio(pairs)
    recorded = [record_precision(p.bf16.record)[1] and record_precision(p.fp32.record)[1] for p in pairs]
    labels = {p.fp32.record.get("method_label") or method for p in pairs}
    return {
        "method": method, "label": ", ".join(sorted(labels)),
        "datasets": ", ".join(sorted({p.key[0] for p in pairs})),
        "protocols": ", ".join(sorted({p.key[4] for p in pairs})),
        "pairs": n, "classes": noise["classes"],
        "seeds_per_class": (str(seeds[0]) if seeds and seeds[0] == seeds[-1] else f"{seeds[0]}-{seeds[-1]}"),
        "mean_diff": mean, "sd_diff": sd, "ci95_low": low, "ci95_high": high,
        "max_abs_diff": float(d[worst]), "max_abs_diff_job": job_label(pairs[worst].key),
        "wilcoxon_n": test["n"], "wilcoxon_nonzero": test["nonzero"], "wilcoxon_statistic": test["statistic"],
        "wilcoxon_p": test["p"], "wilcoxon_min_p": test["min_p"], "wilcoxon_zero_method": test["zero_method"],
        "seed_sd": sigma, "seed_sd_classes": noise["classes_used"],
        "seed_mean_se": sigma / math.sqrt(typical_seeds) if sigma is not None and typical_seeds >= 2 else None,
        "typical_seeds": typical_seeds,
        "abs_mean_over_seed_sd": (None if sigma is None else abs(mean) / sigma if sigma > 0
                                  else 0.0 if mean == 0 else math.inf),
        "verdict": verdict, "direction": direction,
        "time_ratio_fp32_over_bf16": timing["ratio"], "time_pairs": timing["pairs"],
        "fp32_machine": timing["fp32_machine"], "bf16_machine": timing["bf16_machine"],
        "precision_recorded": "yes" if all(recorded) else "no" if not any(recorded) else "partly",
    }


def sentence(s: dict) -> str:
    """One method's outcome in plain words."""
    mean = s["mean_diff"]
    way = "higher" if mean > 0 else "lower" if mean < 0 else "different"
    text = (f"{s['label']} ({s['method']}): over {s['pairs']} pairs ({s['classes']} class"
            f"{'es' if s['classes'] != 1 else ''} x {s['seeds_per_class']} seed(s)), bf16 AUROC is on average "
            + (f"{abs(mean):.4f} {way} than fp32" if mean != 0 else "no different from fp32")
            + (f" (sd {s['sd_diff']:.4f}" if not math.isnan(s["sd_diff"]) else " (one pair")
            + f"; largest |difference| {abs(s['max_abs_diff']):.4f} on {s['max_abs_diff_job']}). ")
    if s["seed_sd"] is None:
        text += (f"The fp32 records have one seed per class: {NO_NOISE}, so only a systematic shift found by "
                 "the test can decide. ")
    else:
        ratio = s["abs_mean_over_seed_sd"]
        text += (f"The fp32 seed noise is {s['seed_sd']:.4f} (mean per-class sd over seeds); "
                 f"|mean difference| is {ratio:.2f} times it. ")
    text += f"Wilcoxon signed-rank (two-sided, zsplit): n = {s['wilcoxon_n']}, W = {s['wilcoxon_statistic']:g}, "
    text += f"p = {s['wilcoxon_p']:.4g}"
    if s["wilcoxon_min_p"] >= ALPHA:
        text += (f" (with {s['wilcoxon_nonzero']} non-zero differences no outcome can reach p < {ALPHA}: the "
                 "verdict rests on the size condition alone)")
    text += ". "
    if s["verdict"] == WITHIN:
        text += "Verdict: **within seed noise**."
    elif s["verdict"] == DIFFERS:
        reasons = []
        if not math.isnan(s["wilcoxon_p"]) and s["wilcoxon_p"] < ALPHA:
            reasons.append(f"a systematic shift (p < {ALPHA})")
        if s["seed_sd"] is not None and abs(mean) > s["seed_sd"]:
            reasons.append("a mean difference larger than the seed sd")
        text += (f"Verdict: **differs ({s['direction'] or 'no direction'})**: " + " and ".join(reasons) + ".")
    else:
        text += f"Verdict: {s['verdict']}."
    if s["time_ratio_fp32_over_bf16"] is not None:
        r = s["time_ratio_fp32_over_bf16"]
        text += (f" Training time fp32/bf16: {r:.2f} (median of {s['time_pairs']} pairs; bf16 "
                 f"{'faster' if r > 1 else 'slower' if r < 1 else 'as fast'}), {_measured_on(s)}.")
    if s["precision_recorded"] != "yes":
        text += (" Its records do not all say their precision (a method without a precision setting trains the "
                 "same either way: a control, its differences should be zero).")
    return text


def _measured_on(s: dict) -> str:
    if s["fp32_machine"] == s["bf16_machine"]:
        return f"measured on {s['fp32_machine'] or 'a machine the records do not name'}"
    return f"measured on {s['fp32_machine'] or '?'} (fp32) and {s['bf16_machine'] or '?'} (bf16)"


# ---- the comparison -------------------------------------------------------------------------------
def compare(fp32_dir: Path, bf16_dir: Path, methods: Optional[Sequence[str]] = None) -> Comparison:
    """Read both sides, pair them, check the pairs and summarise per method.

    Raises
    ------
    Refusal
        See `load_side`; also a pair that is not comparable, an unknown --methods name, or no pair at all.
    """
    fp32 = load_side(fp32_dir, "fp32", methods)
    bf16 = load_side(bf16_dir, "bf16", methods)
    if methods:
        present = {k[1] for k in fp32.records} | {k[1] for k in bf16.records}
        unknown = [m for m in methods if m not in present]
        if unknown:
            raise Refusal(f"--methods {' '.join(unknown)}: no records of {'it' if len(unknown) == 1 else 'them'} "
                          f"in either folder (methods there: {', '.join(sorted(present))})")
    pairs, unpaired = pair_up(fp32, bf16)
    problems: dict = defaultdict(list)
    notes: dict = defaultdict(list)
    for pair in pairs:
        found, said = comparability(pair.fp32.record, pair.bf16.record)
        for message in found:
            problems[message].append(job_label(pair.key))
        for message in said:
            notes[message].append(job_label(pair.key))
    if problems:
        lines = [f"- {message}: {len(jobs)} pair(s), e.g. {', '.join(jobs[:5])}" for message, jobs in problems.items()]
        raise Refusal("the two folders do not hold the same jobs at two precisions; pairs differ in more than "
                      "precision:\n" + "\n".join(lines))
    if not pairs:
        raise Refusal(f"no job has an ok record on both sides ({len(fp32.records)} fp32 and {len(bf16.records)} bf16 "
                      f"records, {len(unpaired)} unpaired jobs, e.g. "
                      + ", ".join(f"{job_label(k)} [{why}]" for k, why in unpaired[:5]) + ")")
    by_method: dict = defaultdict(list)
    for pair in pairs:
        by_method[pair.key[1]].append(pair)
    summaries = [summarize(method, by_method[method]) for method in sorted(by_method)]
    return Comparison(fp32, bf16, pairs, unpaired, dict(notes), summaries)


# ---- output ---------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def method_table(s: dict) -> str:
    """One method's Markdown table: quantity | value."""
    seed_sd = (f"{_f(s['seed_sd'])} ({s['seed_sd_classes']} of {s['classes']} classes with >= 2 seeds)"
               if s["seed_sd"] is not None else NO_NOISE)
    timing = (f"{_f(s['time_ratio_fp32_over_bf16'], 2)} (median of {s['time_pairs']} pairs; {_measured_on(s)})"
              if s["time_ratio_fp32_over_bf16"] is not None else "– (no pair trained solo on both sides with times)")
    rows = [
        ("pairs", f"{s['pairs']} ({s['classes']} classes x {s['seeds_per_class']} seed(s); dataset(s) {s['datasets']}; "
                  f"protocol {s['protocols']})"),
        ("mean difference bf16 - fp32", _f(s["mean_diff"])),
        ("sd of the differences (ddof = 1)", _f(s["sd_diff"])),
        ("95% CI of the mean difference (t)", f"[{_f(s['ci95_low'])}, {_f(s['ci95_high'])}]"),
        ("largest absolute difference", f"{s['max_abs_diff']:+.4f} ({s['max_abs_diff_job']})"),
        ("Wilcoxon signed-rank, two-sided, zero_method=zsplit",
         f"n = {s['wilcoxon_n']} ({s['wilcoxon_nonzero']} non-zero), W = {s['wilcoxon_statistic']:g}, "
         f"p = {s['wilcoxon_p']:.4g}"),
        ("fp32 seed noise sigma (mean per-class sd over seeds)", seed_sd),
        ("abs(mean difference) / sigma", _f(s["abs_mean_over_seed_sd"], 2)),
        ("for reference: sigma / sqrt(s), s = seeds per class (not used)",
         f"{_f(s['seed_mean_se'])} (s = {s['typical_seeds']})" if s["seed_mean_se"] is not None else "–"),
        ("verdict", f"**{s['verdict']}" + (f" ({s['direction']})" if s["direction"] else "") + "**"),
        ("training time fp32 / bf16", timing),
        ("precision in the records", s["precision_recorded"]),
    ]
    lines = ["| quantity | value |", "| --- | --- |"]
    lines += [f"| {name} | {value.replace('|', '/')} |" for name, value in rows]
    return "\n".join(lines)


def _side_line(side: Side) -> str:
    text = (f"`{side.folder}`: {sum(side.profiles.values())} records from profile folder(s) "
            + ", ".join(f"`{p}` ({n})" for p, n in sorted(side.profiles.items())))
    if side.skipped_profiles:
        text += ("; left out (other precision by name): "
                 + ", ".join(f"`{p}` ({n})" for p, n in sorted(side.skipped_profiles.items())))
    if side.filtered:
        text += f"; {side.filtered} record(s) of methods not in --methods left out"
    if side.unreadable:
        text += f"; {len(side.unreadable)} unreadable record(s), not used"
    return text


def render_markdown(comparison: Comparison, command: str) -> str:
    """fidelity.md's text."""
    c = comparison
    out = ["# bf16 vs fp32 training: does the precision change AUROC?", "",
           f"- fp32: {_side_line(c.fp32)}", f"- bf16: {_side_line(c.bf16)}",
           f"- pairs (same dataset, method, normal class, seed, protocol; ok on both sides): {len(c.pairs)}; "
           f"jobs not paired: {len(c.unpaired)} (listed at the end)",
           f"- command: `{command}`", "", "**The rule.** " + RULE, ""]
    if c.warnings:
        out += ["## Warnings", ""]
        for message, jobs in c.warnings.items():
            shown = ", ".join(jobs[:10]) + (f", ... ({len(jobs) - 10} more)" if len(jobs) > 10 else "")
            out.append(f"- {message}: {len(jobs)} pair(s): {shown}")
        out.append("")
    out += ["## Per method", ""]
    for s in c.summaries:
        out += [f"### {s['label']} (`{s['method']}`)", "", method_table(s), "", sentence(s), ""]
    out += ["## Jobs not paired", ""]
    if c.unpaired:
        out += [f"- {job_label(key)}: {why}" for key, why in c.unpaired]
    else:
        out.append("None: every job is on both sides and ok.")
    unreadable = [("fp32", m) for m in c.fp32.unreadable] + [("bf16", m) for m in c.bf16.unreadable]
    if unreadable:
        out += ["", "## Unreadable records (not used)", ""] + [f"- {side}: {m}" for side, m in unreadable]
    return "\n".join(out) + "\n"


def write_csv(path: Path, summaries: Sequence[dict]) -> None:
    """fidelity.csv: one row per method, CSV_COLUMNS; empty cells for no value."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for s in summaries:
            writer.writerow({k: ("" if s.get(k) is None or (isinstance(s.get(k), float) and math.isnan(s[k]))
                                 else s[k]) for k in CSV_COLUMNS})


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="precision_fidelity.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", required=True, type=Path, help="results folder of the fp32 records")
    parser.add_argument("--bf16", required=True, type=Path, help="results folder of the bf16 records")
    parser.add_argument("--out", required=True, type=Path, help="where to write fidelity.md and fidelity.csv")
    parser.add_argument("--methods", nargs="+", help="compare only these methods (registry names)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the comparison; 0 when written, 2 when refused (the message on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    command = "python scripts/precision_fidelity.py " + shlex.join(argv)
    try:
        comparison = compare(args.fp32, args.bf16, args.methods)
    except Refusal as exc:
        print(f"precision_fidelity: refused: {exc}", file=sys.stderr)
        return 2
    for message, jobs in comparison.warnings.items():
        print(f"warning: {message} ({len(jobs)} pair(s))", file=sys.stderr)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fidelity.md").write_text(render_markdown(comparison, command))
        write_csv(args.out / "fidelity.csv", comparison.summaries)
    except OSError as exc:
        print(f"precision_fidelity: cannot write into {args.out}: {exc}", file=sys.stderr)
        return 2
    for s in comparison.summaries:
        print(sentence(s).replace("**", ""))
    if comparison.unpaired:
        print(f"{len(comparison.unpaired)} job(s) not paired: listed in {args.out / 'fidelity.md'}")
    print(f"wrote {args.out / 'fidelity.md'} and {args.out / 'fidelity.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
