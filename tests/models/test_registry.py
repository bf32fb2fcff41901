from __future__ import annotations

import pytest

from models.registry import get_model, model_names
from models.space import Dist


def test_dist_parses_every_kind_and_rejects_bad_ranges():
    assert Dist.parse({"uniform": [0, 1]}) == Dist("uniform", 0.0, 1.0)
    assert Dist.parse({"loguniform": [1e-5, 1e-3]}).kind == "loguniform"
    assert Dist.parse({"int": [1, 3]}) == Dist("int", 1, 3)
    assert Dist.parse({"choice": ["a", "b"]}).choices == ("a", "b")
    assert Dist.parse(0.5) == Dist("choice", choices=(0.5,))
    for bad in ({"uniform": [1, 0]}, {"loguniform": [0, 1]}, {"uniform": [1]}, {"normal": [0, 1]},
                {"choice": []}):
        with pytest.raises(ValueError, match="bad search dimension|needs"):
            Dist.parse(bad)
    assert Dist.parse(Dist.parse({"int": [1, 3]}).to_data()) == Dist("int", 1, 3)


def test_lnln_entry_names_its_terms_and_space():
    entry = get_model("lnln")
    assert list(entry.loss_terms) == ["task", "completeness", "adversarial", "reconstruction", "sparsity"]
    assert entry.loss_terms["completeness"] == 0.9 and entry.loss_terms["sparsity"] == 0.0
    assert entry.adversarial_terms == ("adversarial",)
    for key in ("model.loss_weights.adversarial", "model.adversarial.schedule", "model.adversarial.lambda_max",
                "model.adversarial.warmup_epochs", "model.adversarial.disc_steps", "train.lr",
                "train.weight_decay", "model.dropout"):
        assert key in entry.search_space, key
    assert "lnln" in model_names()


def test_unknown_model_and_unknown_loss_term_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'bert'; registered: .*lnln"):
        get_model("bert")
    with pytest.raises(ValueError, match=r"unknown term\(s\) kd for model 'lnln'"):
        get_model("lnln").loss_weights({"kd": 1.0})
    assert get_model("lnln").loss_weights({"task": 2.0})["task"] == 2.0
