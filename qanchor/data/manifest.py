"""The dataset manifest (``manifest.yaml``): name, cutoff, modalities, tasks and provenance.

The model is built from the manifest, never from hard-coded modality names, so a dataset may declare
four modalities or eight. Example manifest::

    name: synth
    cutoff: "2024-06-30T00:00:00+00:00"
    modalities:
      - {name: bill, kind: sequence, numeric_columns: [discount]}
      - {name: tabular, kind: tabular}
    tasks:
      - {name: churn, domain: engagement, query: "Will this user stop using the app?",
         label_window_days: 90}
    provenance: {generator: data_tools.synth, seed: 1}
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from qanchor.data.io import RepeatedKeyError, UniqueKeyLoader, write_yaml
from qanchor.errors import DataValidationError

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

__all__ = ["ModalityKind", "TaskDomain", "ModalitySpec", "TaskSpec", "Manifest", "MANIFEST_FILE"]

MANIFEST_FILE = "manifest.yaml"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
NAME_RULE = "lowercase letters, digits and _, starting with a letter, at most 40 characters"


class ModalityKind(str, Enum):
    SEQUENCE = "sequence"  # timestamped events with text
    TABULAR = "tabular"  # one numeric vector per user (tabular.parquet)


class TaskDomain(str, Enum):
    ENGAGEMENT = "engagement"
    RISK = "risk"
    MARKETING = "marketing"
    PROFILE = "profile"


@dataclass(frozen=True)
class ModalitySpec:
    """One modality. ``numeric_columns`` are extra float columns of the event files for this modality.

    ``time_varying`` (tabular only): the values are a snapshot taken at the dataset's cutoff that changes over time
    (e.g. "logins in the last 30 days", an account balance), not a fixed attribute (demographics, sign-up channel).
    Pretraining pairs cut at an earlier time then see the tabular modality as missing: the snapshot describes the
    very window their answers are about.
    """

    name: str
    kind: ModalityKind
    numeric_columns: tuple[str, ...] = ()
    description: str = ""
    time_varying: bool = False


@dataclass(frozen=True)
class TaskSpec:
    """A binary user-level task: labels in ``tasks/<name>.parquet``, anchored by ``query``."""

    name: str
    domain: TaskDomain
    query: str
    label_window_days: int
    description: str = ""


@dataclass(frozen=True)
class Manifest:
    name: str
    cutoff: datetime  # timezone-aware UTC; inputs strictly before it, labels after it
    modalities: tuple[ModalitySpec, ...]
    tasks: tuple[TaskSpec, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def cutoff_us(self) -> int:
        """The cutoff in whole microseconds since the epoch, computed exactly: ``int(cutoff.timestamp() * 1e6)`` goes
        through a float and is 1 us off for some cutoffs with a fractional second, which lets an event at the cutoff
        through (before 1970) or refuses one just before it.

        Example:
            >>> Manifest("x", datetime(2005, 4, 19, 15, 17, 4, 547000, tzinfo=timezone.utc), ()).cutoff_us
            1113923824547000
        """
        return (self.cutoff - _EPOCH) // timedelta(microseconds=1)

    @property
    def sequence_modalities(self) -> tuple[ModalitySpec, ...]:
        return tuple(m for m in self.modalities if m.kind is ModalityKind.SEQUENCE)

    @property
    def tabular(self) -> ModalitySpec | None:
        return next((m for m in self.modalities if m.kind is ModalityKind.TABULAR), None)

    def tabular_readable_at(self, cutoff_us: int) -> bool:
        """Whether a user seen at ``cutoff_us`` may read the tabular snapshot: always for fixed attributes; for a
        ``time_varying`` one (taken at the dataset's cutoff) only from that cutoff on, since before it the snapshot
        describes the very window that follows."""
        tabular = self.tabular
        return tabular is None or not tabular.time_varying or cutoff_us >= self.cutoff_us

    def modality(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.modalities)
        raise KeyError(f"unknown modality '{name}'; the manifest declares: {known}")

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        known = ", ".join(t.name for t in self.tasks) or "(none)"
        raise KeyError(f"unknown task '{name}'; the manifest declares: {known}")

    # ----------------------------------------------------------------------------------------- io
    def to_dict(self) -> dict[str, Any]:
        def clean(spec) -> dict:
            d = asdict(spec)
            for k, v in list(d.items()):
                if isinstance(v, Enum):
                    d[k] = v.value
                elif isinstance(v, tuple):
                    d[k] = list(v)
            if d.get("time_varying") is False:
                del d["time_varying"]  # the default: manifests written before the key existed stay byte-identical
            return {k: v for k, v in d.items() if v not in ("", [], ())}

        return {
            "name": self.name,
            "cutoff": self.cutoff.isoformat(),
            "modalities": [clean(m) for m in self.modalities],
            "tasks": [clean(t) for t in self.tasks],
            "provenance": dict(self.provenance),
        }

    def save(self, dataset_dir: str | Path) -> None:
        write_yaml(self.to_dict(), Path(dataset_dir) / MANIFEST_FILE)

    @classmethod
    def load(cls, dataset_dir: str | Path) -> Manifest:
        path = Path(dataset_dir) / MANIFEST_FILE
        if not path.is_file():
            raise DataValidationError(str(path), "file not found; every dataset directory needs a manifest.yaml")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
        except RepeatedKeyError as exc:
            raise DataValidationError(str(path), f"line {exc.line}: key {exc.key!r} is given twice (YAML would keep the "
                                      "last one without a word); keep one") from None
        except UnicodeDecodeError as exc:
            raise DataValidationError(str(path), f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                                      "save the file as UTF-8") from None
        except yaml.YAMLError as exc:
            raise DataValidationError(str(path), f"not valid YAML ({exc.__class__.__name__}: {exc})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = MANIFEST_FILE) -> Manifest:
        def fail(key: str, rule: str) -> DataValidationError:
            return DataValidationError(source, rule, column=key)

        if not isinstance(raw, dict):
            raise DataValidationError(source, "must be a YAML mapping with keys name, cutoff, modalities, tasks")
        unknown = set(raw) - {"name", "cutoff", "modalities", "tasks", "provenance"}
        if unknown:
            raise fail(sorted(unknown)[0], "unknown key; allowed: name, cutoff, modalities, tasks, provenance")
        for key in ("name", "cutoff", "modalities"):
            if key not in raw:
                raise fail(key, "required key is missing")
        cutoff = _parse_cutoff(raw["cutoff"], fail)
        if not isinstance(raw["modalities"], list) or not raw["modalities"]:
            raise fail("modalities", "must be a non-empty list")
        modalities = tuple(_parse_modality(m, i, fail) for i, m in enumerate(raw["modalities"]))
        names = [m.name for m in modalities]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise fail("modalities", f"modality '{sorted(dup)[0]}' is declared twice")
        if sum(m.kind is ModalityKind.TABULAR for m in modalities) > 1:
            raise fail("modalities", "at most one modality may be of kind 'tabular'")
        tasks_raw = raw.get("tasks") or []
        if not isinstance(tasks_raw, list):
            raise fail("tasks", "must be a list")
        tasks = tuple(_parse_task(t, i, fail) for i, t in enumerate(tasks_raw))
        tnames = [t.name for t in tasks]
        if len(set(tnames)) != len(tnames):
            raise fail("tasks", "two tasks share a name")
        prov = raw.get("provenance") or {}
        if not isinstance(prov, dict):
            raise fail("provenance", "must be a mapping")
        return cls(str(raw["name"]), cutoff, modalities, tasks, prov)


def _parse_cutoff(value: Any, fail) -> datetime:
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value))
        except ValueError:
            raise fail("cutoff", f"'{value}' is not an ISO datetime such as 2017-09-30T00:00:00+00:00") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)  # a naive cutoff is read as UTC, like the event timestamps
    try:
        return dt.astimezone(timezone.utc)
    except OverflowError:  # 9999-12-31T23:00-05:00 is past the last representable instant in UTC
        raise fail("cutoff", f"'{value}' lies beyond the year 9999 in UTC; give a real cutoff") from None


def _parse_modality(raw: Any, i: int, fail) -> ModalitySpec:
    key = f"modalities[{i}]"
    if not isinstance(raw, dict):
        raise fail(key, "must be a mapping with name and kind")
    unknown = set(raw) - {"name", "kind", "numeric_columns", "description", "time_varying"}
    if unknown:
        raise fail(f"{key}.{sorted(unknown)[0]}",
                   "unknown key; allowed: name, kind, numeric_columns, description, time_varying")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise fail(f"{key}.name", f"'{name}' is not a valid modality name ({NAME_RULE})")
    try:
        kind = ModalityKind(raw.get("kind", "sequence"))
    except ValueError:
        raise fail(f"{key}.kind", f"'{raw.get('kind')}' is not one of: sequence, tabular") from None
    cols = raw.get("numeric_columns") or []
    if not isinstance(cols, list) or not all(isinstance(c, str) and _NAME_RE.match(c) for c in cols):
        raise fail(f"{key}.numeric_columns", f"must be a list of column names ({NAME_RULE})")
    reserved = {"user_id", "modality", "ts", "text", "value"}
    if reserved & set(cols):
        raise fail(f"{key}.numeric_columns", f"'{sorted(reserved & set(cols))[0]}' is a core column, not an extra")
    time_varying = raw.get("time_varying", False)
    if not isinstance(time_varying, bool):
        raise fail(f"{key}.time_varying", f"must be true or false, not {time_varying!r}")
    if time_varying and kind is not ModalityKind.TABULAR:
        raise fail(f"{key}.time_varying", "applies to the tabular modality only (a sequence's events carry their times)")
    return ModalitySpec(name, kind, tuple(cols), str(raw.get("description", "")), time_varying)


def _parse_task(raw: Any, i: int, fail) -> TaskSpec:
    key = f"tasks[{i}]"
    if not isinstance(raw, dict):
        raise fail(key, "must be a mapping with name, domain, query, label_window_days")
    unknown = set(raw) - {"name", "domain", "query", "label_window_days", "description"}
    if unknown:
        raise fail(f"{key}.{sorted(unknown)[0]}", "unknown key")
    for k in ("name", "domain", "query", "label_window_days"):
        if k not in raw:
            raise fail(f"{key}.{k}", "required key is missing")
    if not isinstance(raw["name"], str) or not _NAME_RE.match(raw["name"]):
        raise fail(f"{key}.name", f"'{raw['name']}' is not a valid task name ({NAME_RULE})")
    try:
        domain = TaskDomain(raw["domain"])
    except ValueError:
        raise fail(f"{key}.domain", f"'{raw['domain']}' is not one of engagement, risk, marketing, profile") from None
    query = raw["query"]
    if not isinstance(query, str) or not query.strip():
        raise fail(f"{key}.query", "must be a non-empty question text")
    window = raw["label_window_days"]
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:  # YAML's true is an int to Python
        raise fail(f"{key}.label_window_days", "must be a positive whole number of days")
    return TaskSpec(raw["name"], domain, query.strip(), window, str(raw.get("description", "")))
