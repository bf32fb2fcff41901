"""Model weights from a checkpoint file, ours or a model's reference code's (LNLN's), for
`train --init-from` and `evaluate`.

Ours: the `model` entry of a checkpoints/last.pt that trainer.save_state writes (in-process
runs) or of a DDP run's client_state.pt, the `module` entry of a DeepSpeed run's model states
(through DeepSpeed's own reader under ZeRO-3, whose weights are partitioned), or a plain state
dict; a run directory or a Ray Train checkpoint directory stands for the newest checkpoint in
it. A reference code's: e.g. the `state_dict` entry of the LNLN code's {"epoch", "state_dict",
"optimizer"} files, or a plain state dict with its names, told apart by those names (the
registry entry's `reference_checkpoints`, e.g. models/lnln_reference.py).
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from data_pipeline.errors import MsaSearchError
from data_pipeline.schema import DataSpec
from models.entry import ModelEntry
from models.registry import get_model, model_names

from .config import ExperimentConfig, load_config
from .layout import Layout
from .nested_runs import run_index
from .storage import local
from .trainer import load_checkpoint

StateDict = dict[str, torch.Tensor]
# A file's entry that holds the weights: ours (save_state), DeepSpeed's model states, then the
# reference code's (save_model).
WEIGHT_ENTRIES = ("model", "module", "state_dict")
# Where a Ray checkpoint directory keeps the weights: an in-process Tune trial's and a DDP run's
# save_state file (search/trials.py, search/worker.py), DeepSpeed's model states under the tag
# the worker saves with (ZeRO-3: rank 0's partition's).
RAY_CHECKPOINT_FILES = ("state.pt", "client_state.pt", "state/mp_rank_00_model_states.pt",
                        "state/zero_pp_rank_0_mp_rank_00_model_states.pt")


def checkpoint_file(path: Path) -> Path:
    """`path` itself, or for a directory the newest checkpoint in it: a run directory's
    checkpoints/last.pt (in-process) or its newest Ray Train checkpoint (checkpoint_<time>
    directories, named so that they sort in time), a Tune trial directory's newest
    (checkpoint_<number>), or a Ray checkpoint directory's file."""
    if not path.is_dir():
        if not path.is_file():
            raise MsaSearchError(f"{path}: no such checkpoint file or directory")
        return path
    layout = Layout(path)
    if layout.last_checkpoint.is_file():
        return layout.last_checkpoint
    # A Tune trial of Ray Train workers keeps its checkpoints in its nested runs, beside Tune's
    # directory: <experiment or output.storage>/trials/<trial id>[-<n>]/checkpoint_<time>
    # (search/nested_runs.py); the names sort in time.
    trial = checkpoint_name(path) if (path / "result.json").is_file() else None
    nested = Path(Layout(path.parent.parent.parent).nested_trials)
    runs = [run for run in nested.iterdir() if run_index(run.name, trial) is not None] \
        if trial and nested.is_dir() else []
    newest = [max((p for p in pattern if p.is_dir()), default=path, key=lambda p: p.name)
              for pattern in (layout.checkpoints.glob("*/checkpoint_*"), path.glob("checkpoint_*"),
                              (c for run in runs for c in run.glob("checkpoint_*")))]
    for directory in [path, *newest]:
        for name in RAY_CHECKPOINT_FILES:
            if (directory / name).is_file():
                return directory / name
    if layout.seed_group.is_file():
        runs = sorted(p.name for p in path.iterdir() if Layout(p).config.is_file())
        raise MsaSearchError(f"{path}: a seed group, one run per seed; name one of its runs "
                             f"({', '.join(str(path / r) for r in runs) or 'none started yet'})")
    if layout.is_experiment:
        stored = _stored(layout)  # its trials' directories are in output.storage when set
        raise MsaSearchError(f"{path}: a search; name one of its trials' directories ({local(stored.ray)}/tune*/*_<trial "
                             f"id>_*, its newest checkpoint, or {local(stored.nested_trials)}/<trial id> for a trial of "
                             "Ray Train workers) or retrain a trial's config (msa-search export)")
    raise MsaSearchError(f"{path}: a directory without a checkpoint (expected a run directory with "
                         f"checkpoints/last.pt or checkpoints/*/checkpoint_*/, a Tune trial directory with "
                         f"checkpoint_*/, or a Ray checkpoint directory with {', '.join(RAY_CHECKPOINT_FILES)})")


def _stored(layout: Layout) -> Layout:
    """The experiment's layout with the storage its config names (as it was, where the config
    cannot be read: this only words an error)."""
    try:
        return layout.with_config(load_config(layout.config, stored=True))
    except Exception:  # noqa: BLE001
        return layout


def checkpoint_name(path: Path) -> str:
    """What to call the weights at `path` (evaluate's trial_id and default eval-<name>): a Tune
    trial's id for its directory or one of its checkpoints (from the trial's result.json: Ray's
    directory names carry every sampled value), else the file's stem or the directory's name."""
    for directory in (path, path.parent, path.parent.parent)[:3 if path.is_file() else 2]:
        results = directory / "result.json"
        if results.is_file():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                with results.open() as fh:
                    return str(json.loads(fh.readline())["trial_id"])
    return path.stem


def read_checkpoint(path: str | Path) -> StateDict:
    """The state dict inside `path` (a file, or a directory: `checkpoint_file`), as saved (not yet
    converted). Only tensors and plain containers are unpickled (torch.load weights_only): a
    checkpoint runs no code. The one exception is a ZeRO-3 checkpoint, which DeepSpeed's reader
    unpickles whole: a run's own."""
    path = checkpoint_file(Path(path))
    try:
        saved = load_checkpoint(path, "cpu")
    except Exception as exc:  # pickle, zip and torch's own errors (a KeyError for plain text)
        lines = str(exc).strip().splitlines()
        raise MsaSearchError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}"
                             + (f": {lines[0]})" if lines and not isinstance(exc, KeyError) else ")")) from None
    if isinstance(saved, dict) and (saved.get("ds_config") or {}).get("zero_optimization", {}).get("stage") == 3:
        saved = _zero3_weights(path)
    if isinstance(saved, dict):
        saved = next((saved[k] for k in WEIGHT_ENTRIES if isinstance(saved.get(k), dict)), saved)
    if not (isinstance(saved, dict) and saved and all(isinstance(v, torch.Tensor) for v in saved.values())):
        raise MsaSearchError(f"{path}: no model weights found (expected a state dict, or a checkpoint with a "
                             f"{' or '.join(repr(k) for k in WEIGHT_ENTRIES)} entry)")
    if all(k.startswith("module.") for k in saved):  # saved from a DataParallel/DDP wrapper
        saved = {k[len("module."):]: v for k, v in saved.items()}
    return saved


def _zero3_weights(model_states: Path) -> StateDict:
    """Under ZeRO-3 the model states hold only partitions: DeepSpeed's own reader gathers the
    fp32 weights from every rank's files in the checkpoint (state/ under its parent). What it
    prints of its work (and its logger's lines, when this first imports it) goes to stderr:
    `evaluate`'s stdout carries its results."""
    tag = model_states.parent
    try:
        with contextlib.redirect_stdout(sys.stderr):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return dict(get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name))
    except Exception as exc:  # DeepSpeed raises ValueError, FileNotFoundError, ...
        raise MsaSearchError(f"{tag.parent}: a ZeRO-3 checkpoint DeepSpeed could not read "
                             f"({type(exc).__name__}: {exc})") from None


def fitted_weights(entry: ModelEntry, model: nn.Module, saved: StateDict, source: str | Path,
                   on_skip: Callable[[str], None] | None = None) -> StateDict:
    """`saved` as a state dict of `model` (built by `entry`): converted from a reference code's
    names where it has them, then checked to fit exactly (names and shapes), so loading cannot
    fail half-way."""
    entries = [get_model(name) for name in model_names()]
    owner = next((e for e in entries if e.reference_checkpoints and e.reference_checkpoints.detect(saved)), None)
    if owner is not None:
        if owner.name != entry.name:
            raise MsaSearchError(f"{source}: a checkpoint of {owner.reference_checkpoints.source}, but the config "
                                 f"builds model '{entry.name}'; use a config with model.name: {owner.name}")
        try:
            saved = owner.reference_checkpoints.convert(saved, model, on_skip)
        except ValueError as exc:
            raise MsaSearchError(f"{source}: {exc}") from None
    expected = model.state_dict()
    saved = {**_tied_copies(model, saved), **saved}
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        parts = [f"{what} {_some(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise MsaSearchError(f"{source}: does not fit the model the config builds ('{entry.name}'): "
                             f"{'; '.join(parts)} (a checkpoint of another model or config?)")
    for key, tensor in expected.items():
        if saved[key].shape != tensor.shape:
            raise MsaSearchError(f"{source}: '{key}' has shape {tuple(saved[key].shape)}, the model the config "
                                 f"builds expects {tuple(tensor.shape)} (a checkpoint of another config?)")
    return saved


def init_weights(saved: StateDict, source: str | Path, cfg: ExperimentConfig, spec: DataSpec,
                 on_skip: Callable[[str], None] | None = None) -> StateDict:
    """The weights a new run starts from (`train --init-from`; `saved` from `read_checkpoint`),
    checked against the model `cfg` builds for `spec` (one throwaway build), so that every
    worker loads them as they are."""
    entry = get_model(cfg.model.name)
    return fitted_weights(entry, entry.build(cfg.model, spec), saved, source, on_skip)


def _tied_copies(model: nn.Module, saved: StateDict) -> StateDict:
    """The entries of tied parameters (one tensor under two names, e.g. LNLN's shared fusion
    token) that `saved` holds under one name only, as DeepSpeed's ZeRO-3 reader writes them."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    copies = {}
    for names in names_of.values():
        present = [n for n in names if n in saved]
        copies.update({n: saved[present[0]] for n in names if present and n not in saved})
    return copies


def _some(keys: list[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(f"'{k}'" for k in keys[:shown]) + more
