"""One exception family per kind of user error.

Every error a caller can cause derives from :class:`QAnchorError`, so pipelines can catch one type;
the subclasses say which part refused the input. Messages always say what to do next.
"""

from __future__ import annotations

__all__ = ["QAnchorError", "ConfigError", "DataValidationError", "ModelInputError", "CheckpointError", "OutputError"]


class QAnchorError(Exception):
    """Base class of every error qanchor raises on bad input."""


class ConfigError(QAnchorError):
    """A config file or ``key=value`` override is unknown, mistyped or inconsistent."""


class DataValidationError(QAnchorError):
    """A dataset directory breaks the interchange format (DESIGN section 2).

    The message names the file, the column, the first bad row and the rule broken.
    """

    def __init__(self, file: str, rule: str, column: str | None = None, row: int | None = None):
        self.file, self.rule, self.column, self.row = file, rule, column, row
        where = file
        if column is not None:
            where += f", column '{column}'"
        if row is not None:
            where += f", row {row}"
        super().__init__(f"{where}: {rule}")


class ModelInputError(QAnchorError):
    """A user record or query handed to the model is malformed (empty query, unknown modality...)."""


class CheckpointError(QAnchorError):
    """A checkpoint or head directory is missing, incomplete or incompatible with this version."""


class OutputError(QAnchorError):
    """An output path would replace or add to something qanchor did not create, or lies inside an input.

    qanchor only writes into new, empty or its own marked output directories (see ``qanchor.data.io``).
    """
