"""Job records on disk: one JSON record + one compressed .npz of per-image scores and labels
per job, written atomically; per-job locks so concurrent runners never train a job twice at once.

Layout: <results>/<profile>/<protocol>/<dataset>/<method>/class<k>_seed<s>.{json,npz}, plus
class<k>_seed<s>.lock while a runner works on the job (deleted when it lets go, Ctrl-C included; only
a runner killed outright leaves one, which blocks nothing) (<profile> carries a "+tag" suffix for runs
with overridden hyperparameters).
The JSON is written last: a record exists only once its scores are safely on disk. The record
carries the sha256 of its scores file, so a scores file damaged later (a flipped bit the zip directory
does not show) is caught when the record is read, and the job is redone by the next run.

`load_records` reads a profile's records into one long frame, the only reading behind the reports and
the verdict.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import math
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import pandas as pd

from benchmark.data import CLASS_NAMES
from benchmark.labels import display_label, memory_size_param
from benchmark.metrics import METRIC_NAMES, REQUIRED_METRICS, THRESHOLD_METRICS

SCHEMA_VERSION = 1
TMP_PREFIX = ".tmp-"
REQUIRED_FIELDS = ("schema_version", "dataset", "normal_class", "method", "seed", "profile", "protocol", "status",
                   "metrics")
STATUSES = ("ok", "failed", "diverged")
#: The label-free threshold metrics (a held-out percentile; `benchmark.metrics.validation_threshold_metrics`).
VAL_METRICS = tuple(f"val_{m}" for m in THRESHOLD_METRICS)
#: The columns of a report's records.csv, one row per record (`load_records`).
COLUMNS = [
    "dataset",
    "normal_class",
    "class_name",
    "method",
    "label",
    "seed",
    "profile",
    "protocol",
    "status",
    *METRIC_NAMES,
    *VAL_METRICS,
    "val_percentile",
    "val_threshold",
    "n_val",
    "train_seconds",
    "score_seconds",
    "n_train",
    "n_test",
    "device",
    "threads",
    "git_commit",
    "error",
    "best_epoch_auroc_on_test",
    "record",
]
#: The frame's columns after `COLUMNS`, for the tables only (not in records.csv).
DETECTOR_COLUMNS = ["memory_size_param", "memory_size", "per_epoch", "precision"]


class ResultsWriteError(OSError):
    """Writing into the results folder failed (disk full, read-only, ...). Names the path."""


class UnreadableRecord(Exception):
    """A record file that cannot be used (truncated, hand-edited, older format)."""


@dataclass(frozen=True)
class JobKey:
    """What identifies one job, and so where its record lives.

    Parameters
    ----------
    dataset : str
        A registered dataset name.
    normal_class : int
        The class that is normal in this task.
    method : str
        The method's registry name (``pyod:<model>`` included).
    seed : int
        The detector's random_state.
    profile : str
        The profile's folder name, e.g. ``"quick"`` or ``"quick+epochs=2"`` for overridden runs.
    protocol : str
        ``"paper"`` or ``"standard"``.
    """

    dataset: str
    normal_class: int
    method: str
    seed: int
    profile: str
    protocol: str

    def directory(self, results_dir: Path) -> Path:
        """``<results>/<profile>/<protocol>/<dataset>/<method>`` (``:`` in a method name becomes ``-``)."""
        method_dir = self.method.replace(":", "-")  # pyod:knn -> pyod-knn
        return Path(results_dir) / self.profile / self.protocol / self.dataset / method_dir

    def stem(self) -> str:
        """``class<k>_seed<s>``, the file name of the job's record without extension."""
        return f"class{self.normal_class}_seed{self.seed}"

    def json_path(self, results_dir: Path) -> Path:
        """The JSON record's path."""
        return self.directory(results_dir) / f"{self.stem()}.json"

    def scores_path(self, results_dir: Path) -> Path:
        """The per-image scores' path (.npz)."""
        return self.directory(results_dir) / f"{self.stem()}.npz"

    def lock_path(self, results_dir: Path) -> Path:
        """The job's lock file."""
        return self.directory(results_dir) / f"{self.stem()}.lock"

    def label(self) -> str:
        """A short name for progress lines and messages."""
        return f"{self.dataset}/{self.method}/class{self.normal_class}/seed{self.seed}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return repr(value)


def _atomic_write(path: Path, write: Any) -> None:
    """write(file_object) into a temp file beside `path`, fsync, then rename over `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide records from the other users of a shared folder
    except OSError as exc:
        raise ResultsWriteError(exc.errno, f"cannot write results into {path.parent}: {exc.strerror}",
                                str(path.parent)) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise ResultsWriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}", str(path)) from exc
        raise


def write_record(results_dir: Path, key: JobKey, record: dict, scores: Optional[np.ndarray],
                 labels: Optional[np.ndarray], extra_arrays: Optional[dict] = None) -> Path:
    """Write one job's record atomically: the scores first, then the JSON (the commit point).

    A random ``scores_id`` in both pairs them: a run killed between the two renames (with
    --force, over an older record) leaves a JSON whose scores file is not its own, which
    `read_record` rejects. The record also carries ``scores_sha256``, the checksum of the scores
    file's bytes, which `read_record` checks.

    Parameters
    ----------
    results_dir : Path
        The results folder.
    key : JobKey
        The job.
    record : dict
        The JSON-serialisable record (NumPy scalars and arrays are converted).
    scores, labels : ndarray or None
        Per-image scores (float64) and labels (1 = anomaly); None for a failed or diverged job.
    extra_arrays : dict, optional
        More arrays stored in the .npz beside the scores (e.g. ``{"val_scores": ...}``).

    Returns
    -------
    Path
        The JSON record's path.

    Raises
    ------
    ResultsWriteError
        When the results folder cannot be written.
    """
    if scores is not None:
        scores_id = uuid.uuid4().hex
        extra = {name: np.asarray(value) for name, value in (extra_arrays or {}).items()}
        buffer = io.BytesIO()  # in memory first, to checksum exactly the bytes written
        np.savez_compressed(buffer, scores=np.asarray(scores, np.float64), labels=np.asarray(labels, np.int8),
                            scores_id=np.array(scores_id), **extra)
        content = buffer.getvalue()
        _atomic_write(key.scores_path(results_dir), lambda handle: handle.write(content))
        record = {**record, "scores_file": key.scores_path(results_dir).name, "scores_id": scores_id,
                  "scores_sha256": hashlib.sha256(content).hexdigest()}
    text = json.dumps(_json_safe(record), indent=2, allow_nan=False, sort_keys=False) + "\n"
    _atomic_write(key.json_path(results_dir), lambda handle: handle.write(text.encode()))
    return key.json_path(results_dir)


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_record(path: Path) -> dict:
    """Parse and validate a JSON record.

    Parameters
    ----------
    path : Path
        A ``class<k>_seed<s>.json`` file.

    Returns
    -------
    dict
        The record.

    Raises
    ------
    UnreadableRecord
        Saying what is wrong with it (truncated, missing fields, another schema version, an ``ok``
        record without finite metrics, a scores file from another run, or one whose bytes do not
        match the record's ``scores_sha256``; records written before the checksum have none and
        are not checked for it).
    """
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnreadableRecord(f"{path}: unreadable record ({exc})") from exc
    if not isinstance(record, dict):
        raise UnreadableRecord(f"{path}: not a JSON object")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise UnreadableRecord(f"{path}: missing fields {missing} (an older or hand-edited record)")
    if record["schema_version"] != SCHEMA_VERSION:
        raise UnreadableRecord(f"{path}: schema version {record['schema_version']!r}, "
                               f"this version reads {SCHEMA_VERSION}")
    if record["status"] not in STATUSES:
        raise UnreadableRecord(f"{path}: unknown status {record['status']!r}")
    # Hand edits the tables would trip over, or a record that is not this file's job.
    if not (_is_int(record["normal_class"], 0, 9) and _is_int(record["seed"], 0, 2**32 - 1)
            and all(isinstance(record[name], str) for name in ("dataset", "method", "profile", "protocol"))):
        raise UnreadableRecord(f"{path}: bad dataset / normal_class / method / seed / profile / protocol values")
    if Path(path).stem != f"class{record['normal_class']}_seed{record['seed']}":
        raise UnreadableRecord(f"{path}: holds the record of class {record['normal_class']}, seed {record['seed']}")
    if record["status"] == "ok":
        metrics = record["metrics"]
        if not isinstance(metrics, dict) or not all(_is_finite(metrics.get(m)) for m in REQUIRED_METRICS):
            raise UnreadableRecord(f"{path}: status ok but metrics incomplete")
        scores_file = Path(path).with_suffix(".npz")
        if not scores_file.is_file():
            raise UnreadableRecord(f"{path}: its scores file {scores_file.name} is missing")
        try:  # opens the zip directory (a truncated file has none) and reads the tiny id only
            with np.load(scores_file) as archive:
                names = set(archive.files)
                scores_id = str(archive["scores_id"]) if "scores_id" in names else None
        except Exception as exc:
            raise UnreadableRecord(f"{scores_file}: unreadable scores ({exc})") from exc
        if not {"scores", "labels"} <= names:
            raise UnreadableRecord(f"{scores_file}: no scores / labels arrays")
        if "scores_id" in record and scores_id != record["scores_id"]:
            raise UnreadableRecord(f"{path}: its scores file {scores_file.name} belongs to another run "
                                   "(interrupted rewrite)")
        if "scores_sha256" in record and scores_checksum(scores_file) != record["scores_sha256"]:
            raise UnreadableRecord(f"scores file {scores_file} does not match its record's checksum: damaged")
    return record


def scores_checksum(path: Path) -> Optional[str]:
    """The sha256 of a file's bytes, as `write_record` stores it in ``scores_sha256``.

    Parameters
    ----------
    path : Path
        A scores file (.npz).

    Returns
    -------
    str or None
        The hex digest, or None when the file cannot be read.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def read_scores(json_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The per-image scores and labels of a record (call after `read_record` accepted it).

    Parameters
    ----------
    json_path : Path
        The JSON record's path; the scores are in the .npz beside it.

    Returns
    -------
    scores, labels : ndarray

    Raises
    ------
    UnreadableRecord
        When the scores file cannot be read (missing, truncated, a bad CRC).
    """
    try:
        with np.load(Path(json_path).with_suffix(".npz")) as archive:
            return archive["scores"], archive["labels"]
    except Exception as exc:
        raise UnreadableRecord(f"{Path(json_path).with_suffix('.npz')}: unreadable scores ({exc})") from exc


def iter_records(results_dir: Path) -> Iterator[tuple[Path, Optional[dict], Optional[str]]]:
    """Every record under a folder, readable or not.

    Parameters
    ----------
    results_dir : Path
        Any folder of the results tree (a profile's, for instance).

    Yields
    ------
    tuple
        ``(path, record, None)`` for a readable record, ``(path, None, message)`` otherwise.
    """
    for path in sorted(Path(results_dir).rglob("*.json")):
        if path.name.startswith(TMP_PREFIX):
            continue
        try:
            yield path, read_record(path), None
        except UnreadableRecord as exc:
            yield path, None, str(exc)


def load_records(results_dir: Path, profile: str, protocol: Optional[str] = None) -> tuple[pd.DataFrame, list[str]]:
    """All readable records of one profile as a long frame: the one reading of the records behind
    every report table and the verdict (benchmark/reports.py, benchmark/verdict.py).

    Unreadable records are treated as missing.

    Parameters
    ----------
    results_dir : Path
        The results root.
    profile : str
        The profile's directory name.
    protocol : str, optional
        Keep only records of this protocol (default: all).

    Returns
    -------
    frame : pandas.DataFrame
        One row per record: the `COLUMNS` (records.csv's), then the `DETECTOR_COLUMNS`: the
        detector's `memory_size_param` (`benchmark.labels`; None without a memory), that argument's
        value in the record's hyperparameters, and the record's training_log.per_epoch (a dict, or None).
    problems : list of str
        The unreadable records, by name.
    """
    rows, problems = [], []
    base = Path(results_dir) / profile
    for path, record, error in iter_records(base):
        if record is None:
            problems.append(error)
            continue
        if protocol is not None and record["protocol"] != protocol:
            continue
        metrics = record.get("metrics") or {}
        val = record.get("metrics_val_threshold") or {}
        sizes = record.get("sizes") or {}
        names = CLASS_NAMES.get(record["dataset"], [str(i) for i in range(10)])
        memory_param = memory_size_param(record["method"])
        per_epoch = (record.get("training_log") or {}).get("per_epoch")
        rows.append(
            {
                "dataset": record["dataset"],
                "normal_class": int(record["normal_class"]),
                "class_name": names[int(record["normal_class"])],
                "method": record["method"],
                "label": display_label(record),
                "seed": record["seed"],
                "profile": record["profile"],
                "protocol": record["protocol"],
                "status": record["status"],
                **{m: metrics.get(m) for m in METRIC_NAMES},
                **{f"val_{m}": val.get(m) for m in THRESHOLD_METRICS},
                "val_percentile": val.get("percentile"),
                "val_threshold": val.get("threshold"),
                "n_val": sizes.get("n_val"),
                "train_seconds": record.get("train_seconds"),
                "score_seconds": record.get("score_seconds"),
                "n_train": sizes.get("n_train"),
                "n_test": sizes.get("n_test"),
                "device": (record.get("run_info") or {}).get("device"),
                "threads": record.get("threads"),
                "git_commit": (record.get("git") or {}).get("commit"),
                "error": (record.get("error") or {}).get("message"),
                "best_epoch_auroc_on_test": (
                    (record.get("diagnostics") or {}).get("best_epoch_on_test_OPTIMISTIC") or {}
                ).get("auroc"),
                "record": str(path.relative_to(Path(results_dir))),
                "memory_size_param": memory_param,
                "memory_size": (record.get("hyperparameters") or {}).get(memory_param) if memory_param else None,
                "per_epoch": per_epoch if isinstance(per_epoch, dict) else None,
                # the training precision (records from before --precision, and non-torch detectors: fp32)
                "precision": (record.get("run_info") or {}).get("precision") or "fp32",
            }
        )
    frame = pd.DataFrame(rows, columns=[*COLUMNS, *DETECTOR_COLUMNS])
    for column in DETECTOR_COLUMNS:  # as recorded: a size of 100 stays the int 100, not a float beside None
        frame[column] = pd.Series([row[column] for row in rows], index=frame.index, dtype=object)
    return frame, problems


def existing_record(results_dir: Path, key: JobKey) -> tuple[Optional[dict], Optional[str]]:
    """A job's record, if it has a usable one.

    Parameters
    ----------
    results_dir : Path
        The results folder.
    key : JobKey
        The job.

    Returns
    -------
    tuple
        ``(record, None)`` for a usable record, ``(None, None)`` when there is none, ``(None, message)``
        when it is unusable (`read_record`'s reason, its scores' checksum included).
    """
    path = key.json_path(results_dir)
    if not path.exists():
        return None, None
    try:
        return read_record(path), None
    except UnreadableRecord as exc:
        return None, str(exc)


def missing_folders(directory: Path) -> list[Path]:
    """`directory` and those of its parents that do not exist yet, deepest first.

    Parameters
    ----------
    directory : Path
        A folder about to be created.

    Returns
    -------
    list of Path
        The folders creating it would create (what `remove_empty_folders` may remove afterwards).
    """
    return [p for p in (Path(directory), *Path(directory).parents) if not p.exists()]


def remove_empty_folders(folders: Iterable[Path]) -> list[Path]:
    """Remove those of `folders` that are empty, deepest first (so a folder emptied by removing its
    subfolders goes too); the others are left as they are.

    Parameters
    ----------
    folders : iterable of Path
        Folders this process created (`missing_folders` before creating them).

    Returns
    -------
    list of Path
        The folders removed.
    """
    removed = []
    for folder in sorted({Path(f) for f in folders}, key=lambda f: len(f.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:  # not empty (something was written there), or already gone
            continue
        removed.append(folder)
    return removed


class JobLock:
    """An exclusive flock on the job's .lock file. The OS drops it when its holder dies, so a
    crashed runner never blocks a job. Used as a context manager; `acquire(blocking=False)`
    returns False when another live runner holds it.

    `release` deletes the file (so a finished or interrupted run leaves no lock files) while still
    holding the lock. Another runner may have opened the same file meanwhile and be waiting on it:
    once it gets the lock of that deleted file, `acquire` sees that the path no longer names the
    file it locked and starts again on the path's current file, so two runners never both hold
    "the" lock of a job. Only a runner killed outright (SIGKILL) leaves its file behind, unlocked.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None

    def acquire(self, blocking: bool = False) -> bool:
        """Take the lock.

        Parameters
        ----------
        blocking : bool, default=False
            Wait while another runner holds it (else return False at once).

        Returns
        -------
        bool
            True once held; False when another live runner holds it (non-blocking only).

        Raises
        ------
        ResultsWriteError
            When the lock file cannot be created.
        """
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ResultsWriteError(exc.errno, f"cannot create the lock file {self.path}: {exc.strerror}",
                                        str(self.path)) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return False
                raise
            except BaseException:  # e.g. Ctrl-C while waiting
                os.close(fd)
                raise
            self._fd = fd  # at once, so that an interrupt from here on still finds it to release
            if self._names(fd):
                return True
            self._fd = None
            os.close(fd)  # its holder deleted the file after we opened it: lock the path's current file

    def _names(self, fd: int) -> bool:
        """Whether `self.path` still names the file open as `fd`."""
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)

    def release(self) -> None:
        """Delete the lock file and let go of the lock (a no-op when not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Still locked here, so no other runner holds this file; one waiting on it re-checks the path.
            if self._names(fd):
                self.path.unlink()
        except OSError:
            pass  # a lock file that stays behind only costs a stray empty file
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "JobLock":
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def remove_stray_temp_files(key: JobKey, results_dir: Path) -> list[Path]:
    """Remove the temp files a killed writer of this job left behind (call only while holding
    its lock).

    Parameters
    ----------
    key : JobKey
        The job.
    results_dir : Path
        The results folder.

    Returns
    -------
    list of Path
        The files removed.
    """
    directory = key.directory(results_dir)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.glob(f"{TMP_PREFIX}{key.stem()}.*"):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def remove_idle_stray_temp_files(key: JobKey, results_dir: Path) -> list[Path]:
    """The same for a job that will not run (already recorded, e.g. a --force rewrite was killed):
    skipped while a live runner holds its lock, as the temp files are then that runner's."""
    if not any(key.directory(results_dir).glob(f"{TMP_PREFIX}{key.stem()}.*")):
        return []
    lock = JobLock(key.lock_path(results_dir))
    if not lock.acquire(blocking=False):
        return []
    try:
        return remove_stray_temp_files(key, results_dir)
    finally:
        lock.release()
