"""One `qanchor uqa` table from rows scored in several runs on the same questions.

A TextN row with many events (TextN-128: about 3,000 prompt positions per pretraining pair) takes most of a day
to retrain on 2 CPU cores and about 23 minutes on an H200 (measured rate, 6,000 steps), so such rows can be
trained and scored elsewhere, each by its own `qanchor uqa` run from the same checkpoint, and merged here with the
rest. Runs that asked other questions (another dataset, holdout share or question seed) or trained their rows for
another budget are refused. Each run scores the checkpoint's Q-Anchor row, so the merge also says on how many
questions the copies of a row disagree (0: the runs saw the same model; a few, from another machine's last bits).

Writes ``report.md``, ``results.json``, ``uqa.png`` and ``uqa_cost.png`` (accuracy against prompt positions) into
``--out``, as `qanchor uqa` does::

    python benchmarks/uqa_merge.py --results results/uqa results/uqa-gpu/text32 results/uqa-gpu/text128 \\
        --out results/uqa-merged
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qanchor.bench.uqa import is_legacy_uqa_output, merge_results, uqa_table, write_uqa  # noqa: E402
from qanchor.data.io import OutputKind, claim_output_dir, mark_output  # noqa: E402
from qanchor.errors import QAnchorError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", nargs="+", required=True, help="qanchor uqa output directories (first one's run info kept)")
    ap.add_argument("--out", required=True, help="directory for the merged report")
    args = ap.parse_args(argv)
    loaded = []
    for d in args.results:
        path = Path(d) / "results.json"
        if not path.is_file():
            print(f"error: {path} not found; give qanchor uqa output directories", file=sys.stderr)
            return 2
        loaded.append(json.loads(path.read_text(encoding="utf-8")))
    try:
        merged, differ = merge_results(loaded, list(args.results))
        if is_legacy_uqa_output(args.out):
            mark_output(args.out, OutputKind.UQA_RESULTS)  # merged before uqa results had a kind of their own
        claim_output_dir(args.out, OutputKind.UQA_RESULTS, {f"--results {d}": d for d in args.results}, key="--out")
    except (ValueError, QAnchorError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = write_uqa(merged, args.out)
    print(uqa_table(merged))
    for row, n in differ.items():
        print(f"{row}: scored by several runs; the later copies picked differently on {n} of {merged.questions} questions")
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
