from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.loader import SplitTensors, batch_rows, load_split, make_batch
from data_pipeline.missing import (INTER_DROPS, UNK_TOKEN_ID, TrainingMissing, default_eval_grid, droppable_mask,
                                   parse_pattern)
from data_pipeline.synth import synthesize

MODALITIES = ("text", "audio", "vision")


@pytest.fixture(scope="module")
def test_split(tiny_store):
    return load_split(tiny_store, "test")


def _all_rows(data):
    return np.arange(len(data))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_observed_intra_rate_matches_r_and_padding_is_untouched(rate):
    data = SplitTensors.from_arrays(*_spec_and_split("mosi", 0.05, "train"))
    batch = make_batch(data, _all_rows(data), parse_pattern(f"intra:{rate}"), seed=1111)
    for m in MODALITIES:
        inp = batch.modality(m)
        lengths = data.lengths[m]
        droppable = droppable_mask(inp.valid.numpy(), lengths, data.spec.text_special_tokens and m == "text")
        observed = 1.0 - inp.keep.numpy()[droppable].mean()
        assert abs(observed - rate) <= 0.02, (m, observed)
        pad = ~inp.valid
        assert not inp.keep[pad].any()
        assert torch.equal(inp.observed[pad], inp.complete[pad]), "padding is never touched"
        assert (inp.observed[pad] == 0).all()
        kept = inp.keep
        assert torch.equal(inp.observed[kept], inp.complete[kept])
        assert (inp.observed[inp.valid & ~kept] == 0).all(), "dropped positions become 0"


def _spec_and_split(preset, scale, split):
    data = synthesize(preset, seed=4, scale=scale)
    return data.spec, split, data.split(split)


def test_text_special_tokens_are_never_dropped_and_ids_become_unk(test_split):
    batch = make_batch(test_split, _all_rows(test_split), parse_pattern("intra:1.0"), seed=1)
    lengths = test_split.lengths["text"]
    rows = np.arange(len(test_split))
    keep = batch.text.keep.numpy()
    assert keep[rows, 0].all() and keep[rows, lengths - 1].all(), "[CLS]/[SEP] stay"
    assert keep.sum(1).tolist() == [2] * len(rows)
    ids = batch.text_bert_observed[:, 0].numpy()
    dropped = batch.text.valid.numpy() & ~keep
    assert (ids[dropped] == UNK_TOKEN_ID).all()
    assert np.array_equal(ids[~dropped], batch.text_bert_complete[:, 0].numpy()[~dropped])
    assert torch.equal(batch.text_bert_observed[:, 1], batch.text_bert_complete[:, 1]), "attention mask unchanged"
    torch.testing.assert_close(batch.text_missing_fraction, torch.ones(len(rows)))


def test_masks_identical_across_batch_orders_and_batch_sizes(test_split):
    pattern = parse_pattern("intra:0.5")

    def masks(batch_size, shuffle_seed):
        rows_per_batch = batch_rows(len(test_split), batch_size, shuffle=True, seed=shuffle_seed, epoch=0)
        out = {}
        for rows in rows_per_batch:
            b = make_batch(test_split, rows, pattern, seed=1111)
            for i, r in enumerate(rows):
                out[int(r)] = tuple(b.modality(m).keep[i].numpy().tobytes() for m in MODALITIES)
        return out

    a, b = masks(4, shuffle_seed=1), masks(7, shuffle_seed=2)
    assert a == b and len(a) == len(test_split)


def test_batch_split_gives_the_batches_of_its_row_ranges(test_split):
    rows = _all_rows(test_split)[:11]
    whole = make_batch(test_split, rows, TrainingMissing(), seed=3, epoch=0)
    parts = whole.split(3)
    assert [len(p) for p in parts] == [3, 4, 4]
    start = 0
    for part in parts:
        alone = make_batch(test_split, rows[start:start + len(part)], TrainingMissing(), seed=3, epoch=0)
        for m in MODALITIES:
            for field in ("complete", "observed", "valid", "keep"):
                assert torch.equal(getattr(part.modality(m), field), getattr(alone.modality(m), field))
        assert torch.equal(part.label, alone.label)
        assert torch.equal(part.text_missing_fraction, alone.text_missing_fraction)
        start += len(part)
    assert len(whole.split(50)) == 11  # never an empty chunk


def test_training_masks_are_fresh_each_epoch_and_identical_across_shards(test_split):
    spec = TrainingMissing()
    rows = _all_rows(test_split)
    e0 = make_batch(test_split, rows, spec, seed=3, epoch=0)
    e0_again = make_batch(test_split, rows[::-1], spec, seed=3, epoch=0)
    e1 = make_batch(test_split, rows, spec, seed=3, epoch=1)
    assert torch.equal(e0.audio.keep, e0_again.audio.keep.flip(0))
    assert not torch.equal(e0.audio.keep, e1.audio.keep)
    # Two ranks of a 2-worker run see exactly the masks a 1-worker run sees for their rows.
    for rank in (0, 1):
        shard = batch_rows(len(rows), 8, shuffle=True, seed=9, epoch=0, rank=rank, world_size=2)[0]
        part = make_batch(test_split, shard, spec, seed=3, epoch=0)
        assert torch.equal(part.vision.keep, e0.vision.keep[torch.from_numpy(shard)])


def test_lnln_training_distribution_keeps_about_half_the_samples_complete():
    data = SplitTensors.from_arrays(*_spec_and_split("mosi-aligned", 0.5, "train"))
    batch = make_batch(data, _all_rows(data), TrainingMissing("lnln"), seed=5, epoch=0)
    for m in ("audio", "vision"):
        complete = (batch.modality(m).keep == batch.modality(m).valid).all(1).float().mean().item()
        assert 0.42 < complete < 0.58, (m, complete)


def test_mixture_training_gives_inter_drops_to_about_the_requested_fraction():
    data = SplitTensors.from_arrays(*_spec_and_split("mosi-aligned", 0.5, "train"))
    batch = make_batch(data, _all_rows(data), TrainingMissing("mixture", inter_fraction=0.3), seed=5, epoch=2)
    fully_dropped = torch.stack([~batch.modality(m).keep.any(1) for m in MODALITIES], 1)
    inter = fully_dropped.any(1).float().mean().item()
    assert 0.24 < inter < 0.36
    assert not fully_dropped.all(1).any(), "never all three modalities"


@pytest.mark.parametrize("dropped", INTER_DROPS)
def test_each_inter_pattern_zeroes_exactly_its_modalities(test_split, dropped):
    pattern = parse_pattern(f"inter:{dropped}")
    batch = make_batch(test_split, _all_rows(test_split), pattern, seed=1111)
    for m in MODALITIES:
        inp = batch.modality(m)
        if m in pattern.dropped:
            assert (inp.observed == 0).all() and not inp.keep.any()
        else:
            assert torch.equal(inp.observed, inp.complete) and torch.equal(inp.keep, inp.valid)
    ids = batch.text_bert_observed[:, 0]
    if "text" in pattern.dropped:
        assert (ids[batch.text.valid] == UNK_TOKEN_ID).all()
        torch.testing.assert_close(batch.text_missing_fraction, torch.ones(len(test_split)))
    else:
        assert torch.equal(ids, batch.text_bert_complete[:, 0])


def test_intra_masks_are_nested_across_rates(test_split):
    rows = _all_rows(test_split)
    keeps = [make_batch(test_split, rows, parse_pattern(f"intra:{r}"), seed=8).audio.keep for r in (0.2, 0.3, 0.7)]
    assert (keeps[1] <= keeps[0]).all() and (keeps[2] <= keeps[1]).all()


def test_mask_seed_changes_masks_and_same_seed_repeats_them(test_split):
    rows = _all_rows(test_split)
    p = parse_pattern("intra:0.5")
    a, b, c = (make_batch(test_split, rows, p, seed=s).vision.keep for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pattern_parsing_round_trips_and_rejects_bad_names():
    grid = default_eval_grid()
    assert len(grid) == 16 and grid[0] == "intra:0.0" and grid[-1] == "inter:A+V"
    assert [parse_pattern(p).name for p in grid] == grid
    assert parse_pattern("complete").name == "intra:0.0"
    assert parse_pattern("inter:V+L").name == "inter:L+V"
    for bad in ("intra:1.5", "inter:L+A+V", "inter:X", "inter:", "dropout:0.1", "intra:abc", "inter:L+L"):
        with pytest.raises(ValueError, match="bad missing pattern"):
            parse_pattern(bad)


def test_batch_rows_give_every_rank_the_same_number_of_batches():
    shards = [batch_rows(45, 8, shuffle=True, seed=0, epoch=3, rank=r, world_size=2) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    covered = np.concatenate([np.concatenate(s) for s in shards])
    assert set(covered.tolist()) == set(range(45))
