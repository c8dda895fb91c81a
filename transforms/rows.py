"""The rows the curate graph passes between its stages: a ``Sample`` per image, an ``ErrorRow``
per row that cannot be curated.

Plain dataclasses (no Beam), so readers, stages and tests build them alike. Every error row is
made by :meth:`ErrorRow.of`, from the row it is about: the error output names the input row
(shard, row index) whatever stage failed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# error_message is cut to this many characters: a traceback or a 10k-word caption in a
# message would bloat the error shards.
MAX_ERROR_MESSAGE = 2000


@dataclass
class Sample:
    """One image on its way through the graph; each stage returns an updated copy.

    ``caption`` is the raw web caption (str or bytes, possibly invalid UTF-8) until decode
    cleans it into ``web_caption``. Score fields stay None for stages that did not run.
    """

    key: str
    url: str | None
    sha256: str | None
    jpg: bytes
    caption: Any
    shard: int
    row: int
    seed: int = 0
    web_caption: str = ""
    width: int | None = None
    height: int | None = None
    image: Any = None  # a PIL.Image (RGB) a caller holds; the curate graph carries none (it re-decodes jpg)
    synthetic: list[str] = field(default_factory=list)
    web_itm: float | None = None
    web_itc: float | None = None
    web_clip: float | None = None
    synthetic_itm: list[float] | None = None
    synthetic_itc: list[float] | None = None
    synthetic_clip: list[float] | None = None
    # (stage, "device/precision") of each model stage that ran on it, as its worker resolved them
    ran_on: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ErrorRow:
    """One row of the error output (``transforms.schemas.ERROR_SCHEMA`` plus its origin)."""

    key: str | None
    url: str | None
    stage: str
    error_type: str
    error_message: str
    shard: int
    row: int

    @classmethod
    def of(cls, row, stage: str, error_type: str, message: str) -> "ErrorRow":
        """The error row of ``row`` (anything with ``key``, ``url``, ``shard`` and ``row``:
        a ``Sample``, or a raw row as read)."""
        return cls(row.key, row.url, stage, error_type, message, row.shard, row.row)

    def record(self) -> dict:
        return {
            "key": self.key,
            "url": self.url,
            "stage": self.stage,
            "error_type": self.error_type,
            "error_message": self.error_message[:MAX_ERROR_MESSAGE],
            "input_row": self.row,
        }
