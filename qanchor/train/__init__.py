"""Training: DeepSpeed pretraining on UserU pairs (contrastive + next-token), resumable and rank-parallel.

Layer: imports ``model``, ``data`` and the base; a sibling of ``infer`` (neither imports the other).
``engine`` is the only module that imports ``deepspeed``; ``distributed`` holds the cross-rank helpers of the
loss; ``pairs`` streams batches; ``seal`` guards resume state; ``pretrain`` is ``qanchor pretrain``.

Example:
    >>> from qanchor.config import load_config, PretrainConfig
    >>> from qanchor.train.pretrain import run_pretrain
    >>> run_pretrain(load_config("configs/pretrain/tiny-cj.yaml"))  # doctest: +SKIP
"""
