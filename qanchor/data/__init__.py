"""Data: the dataset directory format, validation at the door, streaming users, packing and UserU pairs.

Layer: above the base (config, errors, logs, metrics); imports no other qanchor package.

- ``manifest``, ``schema``, ``validate``: the interchange format (DESIGN section 2) and its checks;
- ``dataset``: ``load_dataset`` -> users streamed one partition at a time (``records_from_table``);
- ``text_cache``, ``packing``, ``batch``, ``pipeline``: event text -> cached vectors -> packed users ->
  the one batch type (``UserPipeline`` sets all of it up);
- ``userU``, ``userU_topics``: pretraining pairs with verified answers;
- ``io``: atomic writes and the ownership rule for every output qanchor writes.

Example:
    >>> from qanchor.data.dataset import load_dataset
    >>> ds = load_dataset("data/completejourney")  # doctest: +SKIP
    >>> next(ds.users()).user_id  # doctest: +SKIP
"""
