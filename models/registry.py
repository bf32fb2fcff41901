"""The model registry: model name -> ModelEntry (builder, loss terms with default weights,
search space).

Everything the trainer and the search know about a model comes from its entry. Adding a
model = its file (defining `ENTRY`) + one line below; nothing in search/ changes. (A model
with options of its own also gets its section in models/config.py, as `model.lnln` and
`model.hrlf`.) Imported eagerly: a model whose module fails to import fails here, with its
own error.
"""
from __future__ import annotations

from . import hrlf, lnln
from .entry import ModelEntry

_MODELS: dict[str, ModelEntry] = {entry.name: entry for entry in (
    lnln.ENTRY,
    hrlf.ENTRY,
)}


def model_names() -> list[str]:
    return sorted(_MODELS)


def get_model(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; registered: {', '.join(model_names())}")
    return _MODELS[name]
