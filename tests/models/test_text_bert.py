"""text_encoder: bert for LNLN and HRLF (models/text_bert.py): a local BERT, fine-tuned, that
reads dropped tokens as [UNK]; clear errors without one; the mode in results and exports.

Every BERT here is a tiny random one built from a config and saved to a tmp dir: no download.
"""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_pipeline.loader import SplitTensors, make_batch
from data_pipeline.missing import UNK_TOKEN_ID, parse_pattern
from data_pipeline.synth import VOCAB, synthesize
from models.config import ModelConfig
from models.metrics import metric_names
from models.registry import get_model
from search.config import ConfigError, ExperimentConfig, load_config
from search.export import export_best
from search.layout import Layout
from search.results import ResultsStore, RunInfo
from search.trainer import fit

transformers = pytest.importorskip("transformers", reason="text_encoder bert needs the [bert] extra")

ROOT = Path(__file__).resolve().parents[2]
TINY = {"lnln": {"hidden_dim": 32, "num_heads": 4, "dim_head": 8, "mlp_dim": 32, "lnln": {"tokens": 4}},
        "hrlf": {"hidden_dim": 16, "num_heads": 2, "dim_head": 8, "mlp_dim": 16, "hrlf": {"fusion_dims": [24, 12, 8]}}}
DROPPING = parse_pattern("intra:0.5")


def save_tiny_bert(path: Path, vocab_size: int = VOCAB, max_positions: int = 64) -> Path:
    """A random 2-layer BERT (hidden 32) whose vocabulary covers the synthetic ids and [UNK]."""
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=max_positions)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


@pytest.fixture(scope="module")
def splits() -> dict[str, SplitTensors]:
    data = synthesize("mosi-aligned", seed=3, scale=0.005)  # 6 / 4 / 4 rows, text length 50
    return {s: SplitTensors.from_arrays(data.spec, s, data.split(s)) for s in data.splits}


def model_config(name: str, bert_dir: Path | str, **extra) -> ModelConfig:
    return ModelConfig.model_validate({"name": name, **TINY[name], "text_encoder": "bert",
                                       "bert_path": str(bert_dir), **extra})


def build(name: str, bert_dir: Path, spec):
    torch.manual_seed(0)
    return get_model(name).build(model_config(name, bert_dir), spec)


def berts(model) -> list[torch.nn.Module]:
    return [model.bert] if hasattr(model, "bert") else [model.student.bert, model.teacher.bert]


def record_ids(bert) -> list[torch.Tensor]:
    seen = []
    bert.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["input_ids"].clone()),
                                   with_kwargs=True)
    return seen


# --- fine-tuning and [UNK] ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lnln", "hrlf"])
def test_bert_is_fine_tuned_with_the_model(name, bert_dir, splits):
    train = splits["train"]
    model = build(name, bert_dir, train.spec).train()
    assert all(b.training for b in berts(model))  # model.train() reaches BERT (dropout on)
    batch = make_batch(train, np.arange(len(train)), DROPPING, seed=1, epoch=0)
    outputs = model(batch, progress=0.5)
    terms = model.losses(outputs, batch, progress=0.5)
    weights = get_model(name).loss_weights({}, train.spec.name)
    total = sum(w * terms[k] for k, w in weights.items())
    assert torch.isfinite(total)
    total.backward()
    for bert in berts(model):
        # Every trainable BERT tensor gets a gradient (DDP waits for each); the unused pooler is frozen.
        trainable = {n: p for n, p in bert.named_parameters() if p.requires_grad}
        assert trainable and all(not n.startswith("pooler.") for n in trainable)
        assert [n for n, p in trainable.items() if p.grad is None] == []
    grads = [b.embeddings.word_embeddings.weight.grad for b in berts(model)]
    assert all(g.abs().sum() > 0 for g in grads)
    # [UNK]'s embedding trains where dropped tokens are read (HRLF: the student, not the teacher).
    assert grads[0][UNK_TOKEN_ID].abs().sum() > 0


@pytest.mark.parametrize("name", ["lnln", "hrlf"])
def test_dropped_tokens_reach_bert_as_unk_and_complete_ids_reach_the_teacher_path(name, bert_dir, splits):
    train = splits["train"]
    model = build(name, bert_dir, train.spec).train()
    seen = [record_ids(b) for b in berts(model)]
    batch = make_batch(train, np.arange(len(train)), DROPPING, seed=1, epoch=0)
    model(batch, progress=0.5)
    complete = batch.text_bert_complete[:, 0]
    dropped = batch.text.valid & ~batch.text.keep  # (B, L)
    assert dropped.any() and not (complete == UNK_TOKEN_ID).any()
    observed = seen[0][0][: len(train)]  # LNLN encodes [observed ; changed complete rows] in one call
    assert (observed[dropped] == UNK_TOKEN_ID).all()
    assert torch.equal(observed[~dropped], complete[~dropped])
    if name == "hrlf":  # the teacher's BERT reads the complete ids
        assert torch.equal(seen[1][0], complete)
    else:  # the complete-input H_L (the discriminator's and reconstructor's target) from complete ids
        changed = seen[0][0][len(train):]
        assert len(changed) and not (changed == UNK_TOKEN_ID).any()


@pytest.mark.parametrize("name", ["lnln", "hrlf"])
def test_a_dropped_token_s_word_has_no_effect_and_a_kept_one_does(name, bert_dir, splits):
    """From the stored ids to the prediction: the loader writes [UNK] and the model reads it."""
    test = splits["test"]
    model = build(name, bert_dir, test.spec).eval()
    rows = np.arange(len(test))

    def predict(ids: torch.Tensor):
        batch = make_batch(replace(test, text_bert=ids), rows, DROPPING, seed=5, with_complete=False)
        with torch.no_grad():
            return model(batch)["prediction"], batch

    base, batch = predict(test.text_bert)
    keep, valid = batch.text.keep[0], batch.text.valid[0]
    dropped = int(torch.nonzero(valid & ~keep)[0])
    words = torch.arange(len(keep)) < int(valid.sum()) - 1  # before [SEP]
    words[0] = False  # [CLS]
    kept = int(torch.nonzero(keep & words)[0])
    for position, changes in ((dropped, False), (kept, True)):
        ids = test.text_bert.clone()
        ids[0, 0, position] = 1000 + (int(ids[0, 0, position]) + 7) % 100  # another word
        prediction, _ = predict(ids)
        assert torch.equal(prediction[1:], base[1:])
        assert (prediction[0] != base[0]).item() == changes, position


def test_hrlf_trains_its_berts_through_the_trainer(bert_dir, splits):
    torch.set_num_threads(1)  # its numbers at one thread count, as in the suite
    cfg = ExperimentConfig.model_validate({
        "model": model_config("hrlf", bert_dir).model_dump(mode="json"),
        "missing": {"eval_grid": ["intra:0.0", "intra:0.5"]},
        "train": {"epochs": 1, "batch_size": 3, "lr": 1e-3, "device": "cpu"}})
    torch.manual_seed(0)
    before = get_model("hrlf").build(cfg.model, splits["train"].spec).student.bert.state_dict()
    state = fit(cfg, splits, device=torch.device("cpu"))
    after = state.model.student.bert.state_dict()
    assert not torch.equal(after["embeddings.word_embeddings.weight"], before["embeddings.word_embeddings.weight"])
    assert len(state.history) == 1 and np.isfinite(state.history[0].losses["total"])


# --- clear errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lnln", "hrlf"])
def test_missing_bert_directory_is_refused_at_build_and_at_the_edge(name, tmp_path, splits):
    with pytest.raises(ValueError, match="model.bert_path: .*local directory of BERT weights"):
        build(name, tmp_path / "absent", splits["train"].spec)
    with pytest.raises(ConfigError, match="config key 'model.bert_path'"):
        load_config(overrides=[f"model.name={name}", "model.text_encoder=bert"])
    assert get_model(name).check_config is not None


@pytest.mark.parametrize("name", ["lnln", "hrlf"])
def test_a_dataset_without_token_ids_is_refused(name, bert_dir, splits):
    spec = replace(splits["train"].spec, has_text_bert=False)
    with pytest.raises(ValueError, match="needs BERT token ids \\(text_bert\\).*use model.text_encoder: features"):
        build(name, bert_dir, spec)


@pytest.mark.parametrize("name", ["lnln", "hrlf"])
def test_without_transformers_the_error_names_the_extra(name, bert_dir, splits, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda module, *a: None if module == "transformers" else find_spec(module, *a))
    with pytest.raises(ValueError, match=r"needs the 'transformers' package \(pip install '\.\[bert\]'\)"):
        build(name, bert_dir, splits["train"].spec)
    with pytest.raises(ConfigError, match="config key 'model.text_encoder'.*transformers"):
        load_config(overrides=[f"model.name={name}", "model.text_encoder=bert", f"model.bert_path={bert_dir}"])


def test_a_bert_that_cannot_read_the_dataset_is_refused(tmp_path, splits):
    spec = splits["train"].spec
    short = save_tiny_bert(tmp_path / "short", vocab_size=200, max_positions=16)
    with pytest.raises(ValueError, match="at most 16 tokens.*has 50"):
        build("lnln", short, spec)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no BERT weights loadable"):
        build("lnln", empty, spec)
    # A vocabulary whose [UNK] is not id 100 would read dropped tokens as a word.
    other = save_tiny_bert(tmp_path / "other", vocab_size=200)
    (other / "vocab.txt").write_text("\n".join(["[UNK]", *(f"w{i}" for i in range(199))]) + "\n")
    with pytest.raises(ValueError, match="\\[UNK\\] = id 100"):
        build("lnln", other, spec)


# --- the text mode in results rows and exported configs ----------------------------------------

def test_results_rows_and_exported_configs_record_the_text_mode(bert_dir, tmp_path):
    cfg = load_config(ROOT / "configs" / "quick.yaml",
                      ["model.text_encoder=bert", f"model.bert_path={bert_dir}", "train.epochs=1"])
    assert RunInfo.of("exp", "t0", load_config()).hparams["model.text_encoder"] == "features"
    layout = Layout(tmp_path / "exp")
    layout.results.mkdir(parents=True)
    layout.config.write_text(cfg.to_yaml())
    results = {split: {p: dict.fromkeys(metric_names(cfg.data.preset), 0.5) for p in cfg.missing.eval_grid}
               for split in ("valid", "test")}
    ResultsStore(layout.results).append(RunInfo.of(layout.root.name, "t0", cfg), 0, results, 1.0)
    rows = ResultsStore(layout.results).read()
    assert len(rows) and (rows["hp.model.text_encoder"] == "bert").all()
    assert (rows["hp.model.bert_path"] == str(bert_dir)).all()
    exported = load_config(export_best(layout.root, tmp_path / "best.yaml")[0])
    assert exported.model.text_encoder == "bert" and exported.model.bert_path == str(bert_dir)


def test_a_bert_experiment_is_read_back_where_its_bert_directory_is_absent(tmp_path):
    """status, export and report read a stored config on machines that may not train it (a
    laptop without the cluster's BERT directory): only training checks the directory."""
    layout = Layout(tmp_path / "exp")
    layout.results.mkdir(parents=True)
    cfg = load_config(ROOT / "configs" / "quick.yaml", ["train.epochs=1"])
    raw = cfg.model_dump(mode="json")
    raw["model"].update(text_encoder="bert", bert_path=str(tmp_path / "on-the-cluster-only"))
    layout.config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="config key 'model.bert_path'"):
        load_config(layout.config)
    stored = load_config(layout.config, stored=True)
    results = {split: {p: dict.fromkeys(metric_names(stored.data.preset), 0.5) for p in stored.missing.eval_grid}
               for split in ("valid", "test")}
    ResultsStore(layout.results).append(RunInfo.of(layout.root.name, "t0", stored), 0, results, 1.0)
    exported = export_best(layout.root, tmp_path / "best.yaml")[0]
    assert "on-the-cluster-only" in exported.read_text()
