"""Resolve `data.*` config to a Parquet store: an existing store, an MMSA pickle (converted
once into a cache), or synthetic data (`data.path` empty) generated once into a cache."""
from __future__ import annotations

import hashlib
from pathlib import Path

from .config import DataConfig
from .errors import DataValidationError
from .mmsa import read_mmsa
from .store import SCHEMA_FILE, check_store_ids, write_store
from .synth import synthesize


def synthetic_store_name(cfg: DataConfig) -> str:
    return f"synth-{cfg.preset}-scale{cfg.scale:g}-seed{cfg.synth_seed}"


def prepare_store(cfg: DataConfig, cache_dir: str | Path) -> Path:
    """Path of a Parquet store for `cfg`, creating it under `cache_dir` when needed.

    The cache entry is written atomically, so concurrent or interrupted runs never see a
    half-written store; a second run reuses it.
    """
    cache_dir = Path(cache_dir)
    if not cfg.path:
        target = cache_dir / synthetic_store_name(cfg)
        if not (target / SCHEMA_FILE).is_file():
            _write_if_absent(lambda: synthesize(cfg.preset, seed=cfg.synth_seed, scale=cfg.scale), target)
        return target
    source = Path(cfg.path)
    if source.is_dir():
        if not (source / SCHEMA_FILE).is_file():
            raise DataValidationError(str(source), None, SCHEMA_FILE, "a Parquet dataset directory (data.path)",
                                      "no schema.json")
        # Each split is checked as it is read; a sample in two splits only shows across them.
        check_store_ids(source)
        return source
    if not source.is_file():
        raise DataValidationError(str(source), None, None, "an MMSA pickle or a Parquet dataset dir (data.path)",
                                  "no such file or directory")
    stat = source.stat()
    digest = hashlib.blake2b(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode(), digest_size=6)
    target = cache_dir / f"{source.stem}-{digest.hexdigest()}"
    if not (target / SCHEMA_FILE).is_file():
        _write_if_absent(lambda: read_mmsa(source), target)
    return target


def _write_if_absent(make, target: Path) -> None:
    from .atomic import OutputExistsError

    try:
        write_store(make(), target)
    except OutputExistsError:
        if not (target / SCHEMA_FILE).is_file():  # another process won the race with a complete store
            raise
