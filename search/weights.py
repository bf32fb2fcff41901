"""Model weights from a checkpoint file, ours or a model's reference code's (LNLN's), for
`train --init-from` and `evaluate`.

Ours: the `model` entry of a checkpoints/last.pt that trainer.save_state writes, or a plain
state dict. A reference code's: e.g. the `state_dict` entry of the LNLN code's {"epoch",
"state_dict", "optimizer"} files, or a plain state dict with its names, told apart by those
names (the registry entry's `reference_checkpoints`, e.g. models/lnln_reference.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from data_pipeline.errors import MsaSearchError
from data_pipeline.schema import DataSpec
from models.entry import ModelEntry
from models.registry import get_model, model_names

from .config import ExperimentConfig
from .trainer import load_checkpoint

StateDict = dict[str, torch.Tensor]
# A file's entry that holds the weights: ours (save_state), then the reference code's (save_model).
WEIGHT_ENTRIES = ("model", "state_dict")


def read_checkpoint(path: str | Path) -> StateDict:
    """The state dict inside `path`, as saved (not yet converted). Only tensors and plain
    containers are unpickled (torch.load weights_only): a checkpoint runs no code."""
    path = Path(path)
    if not path.is_file():
        raise MsaSearchError(f"{path}: no such checkpoint file")
    try:
        saved = load_checkpoint(path, "cpu")
    except Exception as exc:  # pickle, zip and torch's own errors (a KeyError for plain text)
        lines = str(exc).strip().splitlines()
        raise MsaSearchError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}"
                             + (f": {lines[0]})" if lines and not isinstance(exc, KeyError) else ")")) from None
    if isinstance(saved, dict):
        saved = next((saved[k] for k in WEIGHT_ENTRIES if isinstance(saved.get(k), dict)), saved)
    if not (isinstance(saved, dict) and saved and all(isinstance(v, torch.Tensor) for v in saved.values())):
        raise MsaSearchError(f"{path}: no model weights found (expected a state dict, or a checkpoint with a "
                             f"{' or '.join(repr(k) for k in WEIGHT_ENTRIES)} entry)")
    if all(k.startswith("module.") for k in saved):  # saved from a DataParallel/DDP wrapper
        saved = {k[len("module."):]: v for k, v in saved.items()}
    return saved


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


def _some(keys: list[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(f"'{k}'" for k in keys[:shown]) + more
