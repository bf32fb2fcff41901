"""No host syncs in the hot loop (issue 14): batch building, forward, losses and backward never
make the host wait for the device, evaluation copies predictions to the host once per call,
and every loss term is fp32 whatever the model's dtype. Counted on the CPU (tests/host_syncs.py)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from data_pipeline.loader import SplitTensors, apply_missing, gather, make_batch
from data_pipeline.missing import TrainingMissing, parse_pattern
from data_pipeline.synth import synthesize
from host_syncs import count_host_syncs
from models.config import ModelConfig
from models.hrlf import HRLF
from models.layers import TokenEncoder
from models.lnln import LNLN
from random_batches import random_batch
from search.evaluate import predict_patterns

MODALITIES = ("text", "audio", "vision")
CONFIGS = {
    "lnln": {"hidden_dim": 16, "num_heads": 2, "dim_head": 8, "mlp_dim": 16, "lnln": {"tokens": 2}},
    "hrlf": {"hidden_dim": 16, "num_heads": 2, "dim_head": 8, "mlp_dim": 16, "hrlf": {"fusion_dims": [12, 8]}},
}
BUILDERS = {"lnln": LNLN, "hrlf": HRLF}
TRAINING_MISSING = {"lnln": TrainingMissing("lnln"), "hrlf": TrainingMissing("mixture", inter_fraction=0.5)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and a busy machine cannot stall its spin-waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def splits() -> dict[str, SplitTensors]:
    ds = synthesize("mosi-aligned", seed=3, scale=0.01)  # 13 / 4 / 7 rows, 50 positions
    return {s: SplitTensors.from_arrays(ds.spec, s, ds.split(s)) for s in ds.splits}


def build(name: str, spec, **hrlf) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(CONFIGS[name])
    if hrlf:
        cfg["hrlf"] = {**cfg["hrlf"], **hrlf}
    return BUILDERS[name](ModelConfig.model_validate(cfg), spec)


def test_the_counter_sees_each_kind_of_sync_once():
    t = torch.tensor([1.0, 0.0, 2.0])
    with count_host_syncs() as syncs:
        bool(t.all())
        t.nonzero()
        t[t > 0]
        t.cpu().numpy()
        int(t[0])
        t.sum().item()
        torch.where(t > 0)
        t.index_select(0, torch.tensor([0, 2]))  # no sync: an index gather
    assert syncs.count == 7, str(syncs)
    assert "test_host_syncs.py" in syncs.seen[0]


def test_the_counter_catches_the_device_side_fallbacks(splits):
    # A hand-made batch has no host lengths or keep masks: LNLN and the encoders then read
    # them from the device, and the counter must say so.
    spec = splits["train"].spec
    model = build("lnln", spec).train()
    with count_host_syncs() as syncs:
        model(random_batch(spec, 4, seed=0))
    assert any("lnln.py" in s for s in syncs.seen) and any("layers.py" in s for s in syncs.seen), str(syncs)


@pytest.mark.parametrize("name, options", [("lnln", {}), ("hrlf", {"mi_estimator": "infonce"}),
                                           ("hrlf", {"mi_estimator": "jsd"})])
def test_a_training_step_makes_no_host_sync(name, options, splits):
    train = splits["train"]
    model = build(name, train.spec, **options).train()
    weights = BUILDERS[name].LOSS_TERMS
    with count_host_syncs() as syncs:
        batch = make_batch(train, np.arange(len(train)), TRAINING_MISSING[name], seed=1, epoch=0)
        outputs = model(batch, progress=0.5)
        terms = model.losses(outputs, batch, 0.5)
        sum(w * terms[k] for k, w in weights.items()).backward()
        model.discriminator_loss(outputs).backward()  # the trainer's extra discriminator steps
    assert syncs.count == 0, str(syncs)
    assert all(p.grad is not None for p in model.discriminator_parameters())


def test_host_planned_length_groups_equal_the_device_ones():
    torch.manual_seed(0)
    enc = TokenEncoder(20, 32, depth=2, heads=4, dim_head=8, mlp_dim=32, tokens=4, d_in=5, length_buckets=4)
    for lengths in ([20, 3, 17, 8, 11, 5, 14], [6, 6, 20, 6, 20], [4], [20, 20]):
        lengths = np.array(lengths)
        x = torch.randn(len(lengths), 20, 5)
        mask = torch.arange(20)[None, :] < torch.from_numpy(lengths)[:, None]
        with count_host_syncs() as syncs:
            planned = enc(x, mask, lengths)
        assert syncs.count == 0, str(syncs)
        assert torch.equal(planned, enc(x, mask)), lengths


def test_lnln_with_host_masks_equals_lnln_reading_the_device(splits):
    train = splits["train"]
    model = build("lnln", train.spec).train()
    batch = make_batch(train, np.arange(len(train)), TRAINING_MISSING["lnln"], seed=1, epoch=0)
    bare = batch._map(lambda t: t, host=lambda a: None)  # no host lengths or keep masks
    assert bare.text.lengths is None and bare.text.keep_host is None
    torch.manual_seed(1)
    planned = model(batch)
    torch.manual_seed(1)
    read = model(bare)
    for key in ("prediction", "discriminator_logits"):
        torch.testing.assert_close(planned[key], read[key], atol=1e-5, rtol=1e-5)
    for m in MODALITIES:
        torch.testing.assert_close(planned["complete_features"][m], read["complete_features"][m], atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("name", ["lnln", "hrlf"])
def test_evaluation_copies_predictions_to_the_host_once_and_never_builds_complete_features(name, splits):
    test = splits["test"]
    model = build(name, test.spec)
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    patterns = [parse_pattern(p) for p in ("intra:0.0", "intra:0.5", "inter:L", "inter:A+V")]
    with count_host_syncs() as syncs:
        shard = predict_patterns(model, test, patterns, seed=5, batch_size=3)  # 3 chunks of rows
    assert syncs.count == 1, str(syncs)  # one per call (per split), whatever the chunks and patterns
    assert len(seen) == 3 * len(patterns)
    assert all(b.modality(m).complete is None for b in seen for m in MODALITIES)
    assert all(b.text_bert_complete is None for b in seen)
    assert shard.preds.shape == (4, len(test)) and np.isfinite(shard.preds).all()
    # Same predictions as evaluating each pattern alone in one chunk.
    for i, pattern in enumerate(patterns):
        alone = predict_patterns(model, test, [pattern], seed=5, batch_size=len(test))
        np.testing.assert_allclose(shard.preds[i], alone.preds[0], atol=1e-5)
        np.testing.assert_array_equal(shard.digests[i], alone.digests[0])


def test_evaluation_batches_carry_no_complete_tensor(splits):
    test = splits["test"]
    batch = apply_missing(gather(test, np.arange(len(test))), parse_pattern("intra:0.3"), seed=5,
                          with_complete=False)
    assert all(batch.modality(m).complete is None for m in MODALITIES) and batch.text_bert_complete is None
    assert batch.text_bert_observed is not None
    for name in ("lnln", "hrlf"):
        with torch.no_grad():
            assert build(name, test.spec).eval()(batch)["prediction"].shape == (len(test),)


def test_low_precision_batches_cast_features_only_and_keep_labels_exact(splits):
    train = splits["train"]
    data = replace(train, labels=train.labels.clone())
    data.labels[0] = 2.2
    rows = np.arange(len(data))
    batch = make_batch(data, rows, TrainingMissing("lnln"), seed=1, epoch=0, dtype=torch.bfloat16)
    full = make_batch(data, rows, TrainingMissing("lnln"), seed=1, epoch=0)
    for m in MODALITIES:
        x = batch.modality(m)
        assert x.complete.dtype == x.observed.dtype == torch.bfloat16
        assert x.valid.dtype == x.keep.dtype == torch.bool
        assert torch.equal(x.observed, full.modality(m).observed.to(torch.bfloat16))
    assert batch.label.dtype == batch.text_missing_fraction.dtype == torch.float32
    assert batch.label[0].item() == torch.tensor(2.2).item()  # 2.2 in fp32, not bf16's 2.1875
    assert torch.equal(batch.text_missing_fraction, full.text_missing_fraction)
    moved = full.to("cpu", dtype=torch.bfloat16)  # Batch.to casts the features only, too
    assert moved.text.observed.dtype == torch.bfloat16
    assert moved.label.dtype == torch.float32 and moved.label[0].item() == torch.tensor(2.2).item()
    assert moved.text.lengths is full.text.lengths  # host arrays stay as they are


@pytest.mark.parametrize("name", ["lnln", "hrlf"])
def test_losses_are_fp32_for_a_bf16_model_on_a_bf16_batch(name, splits):
    train = splits["train"]
    model = build(name, train.spec).to(torch.bfloat16).train()
    batch = make_batch(train, np.arange(len(train)), TRAINING_MISSING[name], seed=1, epoch=0, dtype=torch.bfloat16)
    outputs = model(batch, progress=0.5)
    assert outputs["prediction"].dtype == torch.bfloat16  # the model really runs in bf16
    terms = model.losses(outputs, batch, 0.5)
    assert {k: v.dtype for k, v in terms.items()} == dict.fromkeys(terms, torch.float32)
    assert all(torch.isfinite(v) for v in terms.values())
    assert model.discriminator_loss(outputs).dtype == torch.float32
    sum(w * terms[k] for k, w in BUILDERS[name].LOSS_TERMS.items()).backward()


@pytest.mark.parametrize("name", ["lnln", "hrlf"])
def test_losses_are_fp32_under_bf16_autocast(name, splits):
    # The trainer runs forward and losses under autocast: a matmul inside a loss would turn bf16.
    train = splits["train"]
    model = build(name, train.spec).train()
    batch = make_batch(train, np.arange(len(train)), TRAINING_MISSING[name], seed=1, epoch=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch, progress=0.5)
        terms = model.losses(outputs, batch, 0.5)
    assert {k: v.dtype for k, v in terms.items()} == dict.fromkeys(terms, torch.float32)
