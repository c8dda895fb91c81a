"""The pyarrow schemas of every row the project reads or writes (docs/architecture.md, "Contracts").

Every reader validates against these before doing work, and every writer writes exactly
these, so a contract change is one edit here.
"""
from __future__ import annotations

import pyarrow as pa

# img2dataset `output_format=parquet` (plus `exif` and `sha256`, which img2dataset adds when
# asked). `jpg` holds the encoded image bytes.
RAW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
        ("jpg", pa.binary()),
    ]
)

# Columns a raw shard must have before curate starts; the rest are optional and nulled.
RAW_REQUIRED_COLUMNS = ("key", "caption", "jpg")

CURATED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("sha256", pa.string()),
        ("jpg", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("web_caption", pa.string()),
        ("web_itm", pa.float32()),
        ("web_itc", pa.float32()),
        ("web_clip", pa.float32()),
        ("synthetic_captions", pa.list_(pa.string())),
        ("synthetic_itm", pa.list_(pa.float32())),
        ("synthetic_itc", pa.list_(pa.float32())),
        ("synthetic_clip", pa.list_(pa.float32())),
        ("captions", pa.list_(pa.string())),
        ("caption_sources", pa.list_(pa.string())),
        ("keep", pa.bool_()),
        ("drop_reason", pa.string()),
        ("round", pa.int32()),
        ("seed", pa.int64()),
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        # Where the row came from, with the file name (errors/part-<shard> <- its input shard):
        # a row without a usable key (missing_key) can be found again in the input.
        ("input_row", pa.int64()),
    ]
)

# Stages named in the `stage` column of an error row.
ERROR_STAGES = ("read", "download", "decode", "caption", "filter", "rank", "select", "write")


def empty_table(schema: pa.Schema) -> pa.Table:
    """A zero-row table of `schema` (used for empty shards and zero-row inputs)."""
    return schema.empty_table()


def check_columns(schema: pa.Schema, required: tuple[str, ...], expected: pa.Schema, where: str) -> None:
    """Raise ValueError naming `where` and the column when a required column is missing, a
    column of `expected` appears more than once (which one holds the value would be a guess),
    or has a type that cannot be cast to the expected one. Columns not in `expected` are not
    checked: a reader reads only its own. Castable: integer widths, integers to floats, any
    string or binary layout (large, view, dictionary-encoded) to the plain one."""
    for name in required:
        if name not in schema.names:
            raise ValueError(f"{where}: missing required column {name!r} (has {schema.names})")
    for name in expected.names:
        count = schema.names.count(name)
        if count > 1:
            raise ValueError(f"{where}: column {name!r} appears {count} times; which one to read is ambiguous")
    for field in schema:
        exp_idx = expected.get_field_index(field.name)
        if exp_idx < 0:
            continue
        want = expected.field(exp_idx).type
        if field.type == want or pa.types.is_null(field.type):
            continue
        if _castable(field.type, want):
            continue
        raise ValueError(
            f"{where}: column {field.name!r} has type {field.type}, expected {want}"
        )


def _castable(have: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_dictionary(have):  # pandas categories: the values decide
        return _castable(have.value_type, want)
    if pa.types.is_integer(want):
        return pa.types.is_integer(have)
    if pa.types.is_floating(want):
        return pa.types.is_floating(have) or pa.types.is_integer(have)
    if pa.types.is_string(want):
        return pa.types.is_string(have) or pa.types.is_large_string(have) or pa.types.is_string_view(have)
    if pa.types.is_binary(want):
        return pa.types.is_binary(have) or pa.types.is_large_binary(have) or pa.types.is_binary_view(have)
    return False
