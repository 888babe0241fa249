"""qanchor: query-conditioned user embeddings (Q-Anchor).

Public entry points are imported lazily so that ``import qanchor`` stays cheap and does no work.

Layers (each imports only those before it; ``tests/test_layers.py`` enforces it)::

    base (errors, config, logs, metrics) -> data -> model -> train | infer -> tune -> bench -> cli
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "QAnchor": "qanchor.infer.api",
    "embed": "qanchor.infer.api",
    "load_config": "qanchor.config",
    "load_dataset": "qanchor.data.dataset",
    "Dataset": "qanchor.data.dataset",
    "UserRecord": "qanchor.data.dataset",
    "validate_dataset": "qanchor.data.validate",
    "QAnchorError": "qanchor.errors",
    "ConfigError": "qanchor.errors",
    "DataValidationError": "qanchor.errors",
    "ModelInputError": "qanchor.errors",
    "CheckpointError": "qanchor.errors",
    "OutputError": "qanchor.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qanchor' has no attribute '{name}'")
