"""Which dataset a demo's pretraining run was trained on, by content: whether ``make demo`` resumes it or starts it over.

    python3 -m data_tools.run_data mode data/synth runs/synth/pretrain .make/trained-on/runs-synth-pretrain
    python3 -m data_tools.run_data record data/synth .make/trained-on/runs-synth-pretrain

``mode`` prints the setting the Makefile passes to ``qanchor pretrain``: ``overwrite=true`` when the run's checkpoint
was trained on other data than the dataset holds now (a pull changed how its users, labels or pairs are chosen, and
``make`` rebuilt it), so that the demo does not resume, or finish at once, on data it was not trained on;
``resume=true`` otherwise, so that a re-run or a run after an interruption continues. ``record``, run after the
pretraining succeeded, writes the dataset's digest beside the run's other make stamps (``.make/``).

The digest is that of the dataset's files' contents (:func:`dataset_digest`), not their times: a dataset rebuilt
byte-identical (its builder's code changed in a way that does not change its output) keeps its run. A run with no
record (pretrained before records were kept, or by hand) is judged by times as before: older than its dataset's
``userU.parquet``, it starts over. A pretraining interrupted after it started over keeps the record of the data before,
so it starts over again on the next ``make demo`` rather than resume on a guess.

Only the standard library is used: ``mode`` runs under ``make -n`` too, before any virtual environment exists.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from data_tools.code_stamp import write_atomically

# Not data: qanchor.data.schema.CACHE_DIR (the dataset's own caches, which change as it is used), io.MARKER_FILE (it
# names the qanchor version that wrote it), and io's temporaries (.<name>.qanchor-tmp.<...>, .qanchor-old.), which a
# killed writer leaves behind; this module does not import qanchor (numpy, pyarrow), so they are named here.
CACHE_DIR, MARKER_FILE = ".qanchor_cache", ".qanchor-output"
_TEMPORARY_TAGS = (".qanchor-tmp.", ".qanchor-old.")


def _is_data(name: str) -> bool:
    return name not in (CACHE_DIR, MARKER_FILE) and not (name.startswith(".") and any(t in name for t in _TEMPORARY_TAGS))


def dataset_digest(dataset: Path) -> str:
    """SHA-256 over the dataset's files (relative path and contents), its caches, marker and temporaries left out;
    the same for a byte-identical copy anywhere. ``-`` when there is no such directory."""
    if not dataset.is_dir():
        return "-"
    h = hashlib.sha256()
    for folder, dirs, files in os.walk(dataset):
        dirs[:] = sorted(d for d in dirs if _is_data(d))
        for name in sorted(f for f in files if _is_data(f)):
            path = Path(folder, name)
            h.update(f"{path.relative_to(dataset).as_posix()}\0".encode())
            digest = hashlib.sha256()  # (hashlib.file_digest is 3.11's; qanchor runs on 3.10)
            with path.open("rb") as source:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
            h.update(digest.digest())
    return h.hexdigest()


def run_mode(dataset: Path, run: Path, record: Path) -> str:
    """``overwrite=true`` or ``resume=true`` for the pretraining run in ``run`` on ``dataset`` (see the module)."""
    checkpoint = run / "checkpoint" / "model.safetensors"
    if not checkpoint.exists():
        return "resume=true"  # nothing to keep or lose: a first run, or one killed before its first save
    try:
        trained_on = record.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pairs = dataset / "userU.parquet"
        rebuilt = pairs.exists() and pairs.stat().st_mtime_ns > checkpoint.stat().st_mtime_ns
        return "overwrite=true" if rebuilt else "resume=true"
    return "resume=true" if trained_on == dataset_digest(dataset) else "overwrite=true"


def write_record(dataset: Path, record: Path) -> None:
    """Write ``dataset``'s digest to ``record`` (atomically)."""
    write_atomically(record, dataset_digest(dataset) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "mode":
        print(run_mode(Path(argv[1]), Path(argv[2]), Path(argv[3])))
        return 0
    if len(argv) == 3 and argv[0] == "record":
        write_record(Path(argv[1]), Path(argv[2]))
        return 0
    print("usage: python3 -m data_tools.run_data mode DATASET RUN RECORD | record DATASET RECORD", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
