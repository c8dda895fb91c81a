"""The curate graph's row types (transforms/rows.py)."""
from capfilt.transforms.rows import MAX_ERROR_MESSAGE, ErrorRow, Sample


def test_error_row_of_a_sample_keeps_its_origin():
    s = Sample(key="k", url="http://h/k.jpg", sha256=None, jpg=b"", caption="c", shard=3, row=17)
    err = ErrorRow.of(s, "decode", "truncated", "image file is truncated")
    assert err == ErrorRow("k", "http://h/k.jpg", "decode", "truncated", "image file is truncated", 3, 17)


def test_record_is_the_error_schema_row_with_the_message_cut():
    err = ErrorRow(None, None, "read", "missing_key", "m" * (MAX_ERROR_MESSAGE + 50), 0, 4)
    record = err.record()
    assert list(record) == ["key", "url", "stage", "error_type", "error_message", "input_row"]
    assert (record["key"], record["stage"], record["input_row"]) == (None, "read", 4)
    assert record["error_message"] == "m" * MAX_ERROR_MESSAGE
