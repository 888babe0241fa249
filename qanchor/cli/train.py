"""``qanchor pretrain``: contrastive + next-token pretraining under DeepSpeed.

    qanchor pretrain --config configs/pretrain/tiny-cj.yaml data.path=data/completejourney output_dir=runs/cj
    deepspeed --num_gpus 8 --module qanchor.cli pretrain --config configs/pretrain/qwen2.5-0.5b.yaml data.path=...
"""

from __future__ import annotations

import argparse

from qanchor.cli.common import add_command, add_settings, settings
from qanchor.config import PretrainConfig
from qanchor.train.pretrain import run_pretrain

__all__ = ["register"]


def _cmd_pretrain(args: argparse.Namespace) -> None:
    run_pretrain(settings(args), progress=not args.quiet, print_result=args.quiet)


def register(subparsers) -> None:
    p = add_command(subparsers, "pretrain")
    add_settings(p, PretrainConfig, "data.path=data/cj output_dir=runs/cj train.max_steps=300")
    p.set_defaults(func=_cmd_pretrain)
