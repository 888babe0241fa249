"""CLI plug-in: ``qanchor prompt-tune --config FILE key=value ...`` (registered by ``qanchor.cli``)."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def _cmd_prompt_tune(args: argparse.Namespace) -> None:
    from qanchor.tune.prompt_tune import run_prompt_tune

    run_prompt_tune(args.config, args.overrides, progress=not args.quiet)


def register(subparsers) -> None:
    """Add the ``prompt-tune`` subcommand. Example::

        qanchor prompt-tune --config configs/prompt_tune/tiny-cj.yaml model=runs/demo/pretrain \\
            data.path=data/completejourney task=all output_dir=runs/demo/heads
    """
    p = subparsers.add_parser("prompt-tune", help="cluster-based soft prompt tuning of scenario heads (one per task)")
    p.add_argument("--config", default=None, help="a configs/prompt_tune/*.yaml")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary table")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=DIR data.path=DIR task=churn steps=200")
    p.set_defaults(func=_cmd_prompt_tune)
