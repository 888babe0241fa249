"""Inference: ``QAnchor`` (embed users under queries, one cached prefix per user), batch export, the daily
update and faiss look-alike search.

Layer: imports ``model``, ``data`` and the base; a sibling of ``train``. ``api.QAnchor.iter_embed`` is the one
embedding loop that export, update and the benchmark call.

Example:
    >>> from qanchor.infer.api import QAnchor
    >>> QAnchor.from_pretrained("runs/demo/pretrain").embed(users, ["Will this household churn?"])  # doctest: +SKIP
"""
