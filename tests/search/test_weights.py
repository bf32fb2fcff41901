"""Checkpoint files, ours or the reference LNLN's: where the weights are, and what fits."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from data_pipeline.errors import MsaSearchError
from search.weights import read_checkpoint


def test_weights_are_found_in_every_checkpoint_layout(tmp_path):
    weights = nn.Linear(3, 2).state_dict()
    optimizer = torch.optim.AdamW(nn.Linear(3, 2).parameters()).state_dict()
    layouts = {
        "ours.pt": {"epoch": 3, "model": weights, "optimizer": optimizer, "scheduler": {"last_epoch": 3}},  # save_state
        "reference.pth": {"epoch": 3, "state_dict": weights, "optimizer": optimizer},  # the reference's save_model
        "plain.pt": weights,
        "wrapped.pt": {f"module.{k}": v for k, v in weights.items()},  # DataParallel / DDP
    }
    for name, saved in layouts.items():
        torch.save(saved, tmp_path / name)
        found = read_checkpoint(tmp_path / name)
        assert found.keys() == weights.keys() and all(torch.equal(found[k], weights[k]) for k in weights), name


def test_a_file_without_weights_is_refused(tmp_path):
    torch.save({"epoch": 3, "notes": "no weights"}, tmp_path / "empty.pt")
    with pytest.raises(MsaSearchError, match="no model weights found"):
        read_checkpoint(tmp_path / "empty.pt")
