"""The Parquet store: one file per split plus `schema.json` (also kept in the Arrow metadata).

Sequences are stored as flat fixed-size lists (one row per sample), so loading a split is
a reshape of one contiguous buffer per column: no per-row Python work.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_dir
from .errors import DataValidationError
from .invariants import check_disjoint_ids, check_split
from .presets import SPLITS
from .schema import DataSpec, MSADataset, SplitArrays

SCHEMA_FILE = "schema.json"
METADATA_KEY = b"msa_search.schema"
_ROW_GROUP = 256
# The column behind each SplitArrays field whose name differs, for check_split's messages.
COLUMNS = {"ids": "id", "labels": "label", "text_lengths": "text_length", "audio_lengths": "audio_length",
           "vision_lengths": "vision_length"}


def _flat(arr: np.ndarray) -> pa.FixedSizeBinaryArray:
    """One sample's (T, d) block as one fixed-size binary value (little-endian, C order).

    Measured on MOSI shapes: decoding a fixed-size *list* column costs ~3x more than the
    pickle it replaces (Parquet stores a repetition level per float); a fixed-size binary
    column is one memcpy per page. Shape and dtype live in schema.json and field metadata.
    """
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    n = arr.shape[0]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(arr[0:1].nbytes if n else 1), n,
                                                [None, pa.py_buffer(arr)])


def split_table(split: SplitArrays, spec: DataSpec) -> pa.Table:
    columns = {
        "id": pa.array(split.ids.astype(str), pa.string()),
        "label": pa.array(split.labels.astype(np.float32)),
        "text": _flat(split.text.astype(np.float32, copy=False)),
        "audio": _flat(split.audio.astype(np.float32, copy=False)),
        "vision": _flat(split.vision.astype(np.float32, copy=False)),
        "text_length": pa.array(split.text_lengths.astype(np.int32)),
        "audio_length": pa.array(split.audio_lengths.astype(np.int32)),
        "vision_length": pa.array(split.vision_lengths.astype(np.int32)),
    }
    if split.text_bert is not None:
        columns["text_bert"] = _flat(split.text_bert.astype(np.int32))
    if split.unimodal_labels is not None:
        for letter, values in split.unimodal_labels.items():
            columns[f"label_{letter}"] = pa.array(values.astype(np.float32))
    if split.raw_text is not None:
        columns["raw_text"] = pa.array(split.raw_text.astype(str), pa.string())
    table = pa.table(columns)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(spec.to_dict()).encode()})


def write_store(dataset: MSADataset, out_dir: str | Path, force: bool = False, progress=None) -> Path:
    """Write the dataset as `out_dir/{train,valid,test}.parquet` + `schema.json`, atomically.

    `progress(split_name)` is called after each split is written (for a progress bar).
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, force=force) as tmp:
        for name, split in dataset.splits.items():
            # Dictionary encoding only pays for the string columns; on float features it is
            # tried, abandoned and costs time on both write and read.
            pq.write_table(split_table(split, dataset.spec), tmp / f"{name}.parquet", row_group_size=_ROW_GROUP,
                           use_dictionary=["id", "raw_text"])
            if progress is not None:
                progress(name)
        (tmp / SCHEMA_FILE).write_text(json.dumps(dataset.spec.to_dict(), indent=2) + "\n")
    return out_dir


def read_spec(store_dir: str | Path) -> DataSpec:
    store_dir = Path(store_dir)
    schema_path = store_dir / SCHEMA_FILE
    if not schema_path.is_file():
        raise DataValidationError(str(store_dir), None, SCHEMA_FILE,
                                  "a Parquet dataset written by `msa-search data convert` or `data synth`",
                                  "no schema.json" if store_dir.is_dir() else
                                  "a file, not a directory" if store_dir.exists() else "nothing at that path")
    try:
        return DataSpec.from_dict(json.loads(schema_path.read_text()))
    except (ValueError, TypeError) as exc:
        raise DataValidationError(str(schema_path), None, None, "a valid schema.json", str(exc)) from None


def _column(table: pa.Table, name: str, file: str, split: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Copy one column into a fresh (writable) array of `shape`: a single copy per chunk."""
    if name not in table.column_names:
        raise DataValidationError(file, split, name, "this column", f"columns {table.column_names}")
    column = table.column(name)
    width = int(np.prod(shape[1:]))
    if column.null_count:
        raise DataValidationError(file, split, name, "no nulls", f"{column.null_count} nulls")
    out = np.empty((shape[0], width), dtype=dtype)
    binary = pa.types.is_fixed_size_binary(column.type)
    if binary and column.type.byte_width != width * out.itemsize:
        raise DataValidationError(file, split, name, f"{width * out.itemsize} bytes per row for shape {shape}",
                                  f"{column.type.byte_width}")
    offset = 0
    for chunk in column.chunks:
        if binary:
            values = np.frombuffer(chunk.buffers()[1], dtype=np.dtype(dtype).newbyteorder("<"),
                                   count=len(chunk) * width, offset=chunk.offset * column.type.byte_width)
        else:
            values = chunk.to_numpy(zero_copy_only=False)
        out[offset:offset + len(chunk)] = values.reshape(len(chunk), width)
        offset += len(chunk)
    return out.reshape(shape)


def _strings(table: pa.Table, name: str, file: str, split: str) -> np.ndarray:
    if name not in table.column_names:
        raise DataValidationError(file, split, name, "this column", f"columns {table.column_names}")
    return table.column(name).to_numpy(zero_copy_only=False).astype(str)


def read_split(store_dir: str | Path, split: str, spec: DataSpec | None = None) -> SplitArrays:
    """Load one split as arrays (a reshape per column; arrays are writable copies), checked as
    the MMSA reader checks a split: `data.path` may name a store that no reader of ours wrote."""
    store_dir = Path(store_dir)
    spec = spec or read_spec(store_dir)
    path = store_dir / f"{split}.parquet"
    if not path.is_file():
        raise DataValidationError(str(store_dir), split, None, f"file {split}.parquet", "missing")
    table = pq.read_table(path)
    file, n = str(path), table.num_rows
    get = lambda name, shape, dtype: _column(table, name, file, split, (n, *shape), dtype)
    unimodal = None
    if "label_T" in table.column_names:
        unimodal = {l: get(f"label_{l}", (), np.float32) for l in ("T", "A", "V")}
    arrays = SplitArrays(
        ids=_strings(table, "id", file, split),
        labels=get("label", (), np.float32),
        text=get("text", (spec.text_len, spec.text_dim), np.float32),
        audio=get("audio", (spec.audio_len, spec.audio_dim), np.float32),
        vision=get("vision", (spec.vision_len, spec.vision_dim), np.float32),
        text_lengths=get("text_length", (), np.int32),
        audio_lengths=get("audio_length", (), np.int32),
        vision_lengths=get("vision_length", (), np.int32),
        text_bert=get("text_bert", (3, spec.text_len), np.int32) if spec.has_text_bert else None,
        unimodal_labels=unimodal,
        raw_text=_strings(table, "raw_text", file, split) if "raw_text" in table.column_names else None,
    )
    check_split(arrays, file=file, split=split, keys=COLUMNS, label_range=(spec.label_min, spec.label_max))
    return arrays


def check_store_ids(store_dir: str | Path) -> None:
    """No sample id in two splits of a store (reads the id columns only)."""
    store_dir = Path(store_dir)
    ids = {}
    for split in SPLITS:
        path = store_dir / f"{split}.parquet"
        if not path.is_file():
            raise DataValidationError(str(store_dir), split, None, f"file {split}.parquet", "missing")
        ids[split] = _strings(pq.read_table(path, columns=["id"]), "id", str(path), split)
    check_disjoint_ids(ids, str(store_dir))


def read_store(store_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> MSADataset:
    spec = read_spec(store_dir)
    dataset = MSADataset(spec, {s: read_split(store_dir, s, spec) for s in splits})
    check_disjoint_ids({s: a.ids for s, a in dataset.splits.items()}, str(store_dir))
    return dataset
