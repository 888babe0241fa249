"""``qanchor prompt-tune``: one scenario head per task on a frozen pretrained checkpoint.

    qanchor prompt-tune --config configs/prompt_tune/tiny-cj.yaml checkpoint=runs/demo/pretrain \\
        data.path=data/completejourney task=all output_dir=runs/demo/heads
"""

from __future__ import annotations

import argparse

from qanchor.cli.common import add_command, add_settings, settings
from qanchor.config import PromptTuneConfig
from qanchor.tune.prompt_tune import format_summary, run_prompt_tune

__all__ = ["register"]


def _cmd_prompt_tune(args: argparse.Namespace) -> None:
    summary = run_prompt_tune(settings(args), progress=not args.quiet)
    print(format_summary(summary))


def register(subparsers) -> None:
    p = add_command(subparsers, "prompt-tune")
    add_settings(p, PromptTuneConfig, "checkpoint=runs/cj data.path=data/cj task=churn steps=200")
    p.set_defaults(func=_cmd_prompt_tune)
