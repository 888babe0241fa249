"""Scenario adaptation: cluster-based soft prompt tuning of per-task heads (DESIGN section 5).

Layer: imports ``model``, ``data`` and the base; used by ``bench`` and the CLI. Heads train on
``model.prefix_cache.PrefixStore`` rows: each user's prefix is encoded once for every task.

Example:
    >>> from qanchor.tune import ScenarioHead
    >>> head = ScenarioHead.load("runs/demo/heads/churn")  # doctest: +SKIP
"""

from qanchor.tune.head import ScenarioHead, kmeans_prototypes, query_prompt_init
from qanchor.tune.losses import prototype_logits, prototype_loss, prototype_score

__all__ = ["ScenarioHead", "kmeans_prototypes", "query_prompt_init", "prototype_logits", "prototype_loss",
           "prototype_score"]
