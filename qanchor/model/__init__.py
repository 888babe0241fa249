"""Model: the Q-Anchor network (hierarchical user encoder + LLM + projection), its losses and checkpoints.

Layer: imports ``data`` (the batch type) and the base; used by ``train``, ``infer``, ``tune``.

- ``backbone``: the one place LLMs and tokenizers load; ``layout``: special tokens, prefix / suffix layout,
  query / answer tokenisation; ``user_encoder``: event -> modality -> user tokens;
- ``qanchor_model``: forward (anchor + semantic towers) -> ``QAnchorOutput``; ``losses``: pure functions;
- ``prefix_cache``: encode each user's prefix once, run any suffix on its keys / values (inference,
  prompt tuning, generation); ``factory``: build, save and load checkpoints (safetensors only).

Example:
    >>> from qanchor.model.factory import load_checkpoint
    >>> model, tokenizer, meta, run_cfg = load_checkpoint("runs/demo/pretrain")  # doctest: +SKIP
"""
