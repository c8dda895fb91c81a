"""The one error route of the curate graph (pipeline/curate/errors.py) and the raw-row check."""
import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from capfilt.pipeline.curate.errors import StageError, catch, dead_letter_to_error, unbatch
from capfilt.pipeline.curate.sources import RawRow, to_sample
from capfilt.transforms.rows import ErrorRow, Sample


def raw(shard=0, row=0, **values):
    base = {"key": b"k", "url": b"http://h/k", "caption": b"c", "status": b"success", "error_message": None,
            "sha256": None, "jpg": b"img"}
    return RawRow({**base, **values}, shard, row)


def dead(element, err):
    return element, (type(err), repr(err), [])


def test_to_sample_and_the_error_of_each_bad_raw_row():
    s = to_sample(raw(2, 5))
    assert (s.key, s.url, s.jpg, s.caption, s.shard, s.row) == ("k", "http://h/k", b"img", b"c", 2, 5)
    cases = [
        (raw(key=b"\xff"), ErrorRow("\ufffd", "http://h/k", "read", "invalid_key", "key is not valid UTF-8", 0, 0)),
        (raw(status=b"failed_to_download", error_message=b"HTTP 404"),
         ErrorRow("k", "http://h/k", "download", "failed_to_download", "HTTP 404", 0, 0)),
        (raw(status=b"failed_to_resize"),
         ErrorRow("k", "http://h/k", "download", "failed_to_resize", "img2dataset status 'failed_to_resize'", 0, 0)),
        (raw(key=b"", status=b"failed_to_download"),  # a failed download keeps its (empty) key
         ErrorRow("", "http://h/k", "download", "failed_to_download", "img2dataset status 'failed_to_download'",
                  0, 0)),
        (raw(key=b""), ErrorRow(None, "http://h/k", "read", "missing_key", "key is null or empty", 0, 0)),
        (raw(key=None), ErrorRow(None, "http://h/k", "read", "missing_key", "key is null or empty", 0, 0)),
    ]
    for row, want in cases:
        with pytest.raises(StageError) as info:
            to_sample(row)
        assert dead_letter_to_error(dead(row, info.value), "read") == want


def test_unexpected_exceptions_keep_their_class_and_repr_under_the_default_stage():
    s = Sample(key="k", url=None, sha256=None, jpg=b"", caption="", shard=1, row=2)
    err = dead_letter_to_error(dead(s, ZeroDivisionError("division by zero")), "select")
    assert err == ErrorRow("k", None, "select", "ZeroDivisionError", "ZeroDivisionError('division by zero')", 1, 2)


def test_unbatch_gives_one_dead_letter_per_row_of_a_failed_batch():
    a = Sample(key="a", url=None, sha256=None, jpg=b"", caption="", shard=0, row=0)
    b = Sample(key="b", url=None, sha256=None, jpg=b"", caption="", shard=0, row=1)
    exc = (StageError, repr(StageError("rank", "RuntimeError", "out of memory")), [])
    letters = list(unbatch(([("a", a), ("b", b)], exc)))
    assert [dead_letter_to_error(d, "rank") for d in letters] == [
        ErrorRow("a", None, "rank", "RuntimeError", "out of memory", 0, 0),
        ErrorRow("b", None, "rank", "RuntimeError", "out of memory", 0, 1)]


def _half(x, limit):
    if x % 2:
        raise StageError("decode", "odd", f"{x} is odd")
    if x > limit:
        raise ValueError(x)
    return x // 2


def test_catch_splits_results_from_error_rows_and_counts_them():
    rows = [Sample(key=str(i), url=None, sha256=None, jpg=b"", caption="", shard=0, row=i) for i in range(5)]
    with test_pipeline.TestPipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        good, errors = catch(p | beam.Create(rows) | beam.Map(lambda s: s), "Half",
                             lambda s, limit: (s.key, _half(s.row, limit)), stage="decode", limit=3)
        assert_that(good, equal_to([("0", 0), ("2", 1)]), label="good")
        assert_that(errors | beam.Map(lambda e: (e.key, e.stage, e.error_type, e.error_message)),
                    equal_to([("1", "decode", "odd", "1 is odd"), ("3", "decode", "odd", "3 is odd"),
                              ("4", "decode", "ValueError", "ValueError(4)")]), label="errors")
    counters = {c.key.metric.name: c.committed for c in p.result.metrics().query()["counters"]
                if c.key.metric.namespace == "capfilt"}
    assert counters == {"errors": 3, "decode_errors": 3}
