from __future__ import annotations

from pathlib import Path

import pytest

from search.config import ConfigError, ExperimentConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_every_shipped_config_is_valid():
    for path in sorted(CONFIGS.glob("*.yaml")):
        assert isinstance(load_config(path), ExperimentConfig), path


def test_overrides_are_typed_and_nested():
    cfg = load_config(CONFIGS / "quick.yaml", ["train.epochs=7", "train.lr=3e-4", "model.loss_weights.task=0.5",
                                               "missing.eval_grid=[complete, 'inter:A+V']", "data.path="])
    assert cfg.train.epochs == 7 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.loss_weights == {"task": 0.5}
    assert cfg.missing.eval_grid == ["intra:0.0", "inter:A+V"]
    assert cfg.data.path == ""


def test_defaults_hold_out_two_patterns_from_the_objective():
    cfg = ExperimentConfig()
    assert len(cfg.missing.eval_grid) == 16
    assert set(cfg.missing.eval_grid) - set(cfg.search.objective_patterns) == {"intra:0.9", "inter:L+V"}


def test_unknown_key_names_the_path_and_the_allowed_keys():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.epochz=3"])
    message = str(info.value)
    assert "'train.epochz'" in message and "unknown key" in message and "epochs" in message and "batch_size" in message


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match=r"'trian'.*allowed keys here: data, missing, model, train"):
        load_config(None, ["trian.epochs=3"])


def test_bad_choice_names_the_key_and_the_allowed_values():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.engine=horovod"])
    message = str(info.value)
    assert "'train.engine'" in message and "deepspeed" in message and "ddp" in message and "horovod" in message


def test_bad_number_and_bad_pattern_name_their_keys():
    with pytest.raises(ConfigError, match=r"'train.batch_size'.*greater than or equal to 1"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"'missing.eval_grid'.*bad missing pattern 'inter:X'"):
        load_config(None, ["missing.eval_grid=[inter:X]"])
    with pytest.raises(ConfigError, match=r"'data.scale'"):
        load_config(None, ["data.scale=-1"])


def test_override_into_a_value_and_malformed_override_are_errors():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(CONFIGS / "quick.yaml", ["train.epochs.x=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.epochs"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    wrong = tmp_path / "list.yaml"
    wrong.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(wrong)


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(CONFIGS / "quick.yaml", ["model.loss_weights.adversarial=0.3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_evaluation_rows_default_per_device_and_follow_the_config():
    train = ExperimentConfig().train.model_copy(update={"batch_size": 32})
    assert (train.eval_rows("cpu"), train.eval_rows("cuda:0")) == (128, 1024)
    assert train.model_copy(update={"batch_size": 2048}).eval_rows("cuda") == 2048
    assert train.model_copy(update={"eval_batch_size": 300}).eval_rows("cuda") == 300
    with pytest.raises(ConfigError, match="train.eval_batch_size"):
        load_config(None, ["train.eval_batch_size=0"])


def test_lnln_forward_pass_options_can_be_searched():
    cfg = ExperimentConfig.model_validate({"search": {"space": {
        "model.lnln.grl_placement": {"choice": ["shared", "adversarial"]},
        "model.lnln.hyper_update": {"choice": ["normalized", "raw"]}}}})
    space = cfg.search_space()
    assert space["model.lnln.grl_placement"].choices == ("shared", "adversarial")
    trial = cfg.with_params({"model.lnln.grl_placement": "adversarial", "model.lnln.hyper_update": "raw"})
    assert (trial.model.lnln.grl_placement, trial.model.lnln.hyper_update) == ("adversarial", "raw")
    with pytest.raises(ValueError, match="search.space.model.lnln.fusion_query.*sideways.*'language' or 'hyper'"):
        ExperimentConfig.model_validate({"search": {"space": {"model.lnln.fusion_query": {"choice": ["sideways"]}}}})


@pytest.mark.parametrize("model", ["lnln", "hrlf"])
@pytest.mark.parametrize("dataset", ["mosi", "mosei", "sims"])
def test_full_size_configs_build_their_models_with_the_datasets_defaults(model, dataset):
    from data_pipeline.presets import get_preset
    from data_pipeline.schema import DataSpec
    from models.registry import get_model

    cfg = load_config(CONFIGS / f"{model}_{dataset}.yaml")
    assert (cfg.data.preset, cfg.data.scale, cfg.train.epochs, cfg.train.batch_size) == (dataset, 1.0, 200, 64)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_epochs, cfg.train.grad_clip) == (1e-4, 1e-4, 20, 0.0)
    assert cfg.model.loss_weights == {}, "per-dataset weights come from the registry, not the YAML"
    assert cfg.train.seeds == [1111, 1112, 1113], "train runs the papers' seeds as one group"
    p = get_preset(dataset)
    spec = DataSpec(name=dataset, text_len=p.text_len, audio_len=p.audio_len, vision_len=p.vision_len,
                    text_dim=p.text_dim, audio_dim=p.audio_dim, vision_dim=p.vision_dim, label_min=-p.label_max,
                    label_max=p.label_max, has_text_bert=True, text_special_tokens=True)
    entry = get_model(model)
    built = entry.build(cfg.model, spec)
    weights = entry.loss_weights(cfg.model.loss_weights, spec.name)
    if model == "lnln":
        assert len(built.fusion.transformer.transformer.blocks) == (2 if dataset == "mosi" else 4)
        assert weights["adversarial"] == (0.6 if dataset == "sims" else 0.8)
        if dataset == "mosi":
            assert sum(t.numel() for t in built.parameters()) == 6_483_012  # the reference's
    else:
        assert cfg.missing.train_mode == "mixture" and weights == entry.loss_terms


def test_tpe_options_reach_the_sampler(tmp_path):
    import warnings

    from search.layout import Layout
    from search.strategy import searcher

    cfg = ExperimentConfig.model_validate({"search": {"sampler": "tpe", "tpe": {
        "multivariate": True, "constant_liar": True, "n_startup_trials": 4}}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks both options experimental
        sampler = searcher(cfg, Layout(tmp_path)).searcher._sampler
    # Private attributes of Optuna 4's TPESampler: a contract on its internals.
    assert (sampler._multivariate, sampler._constant_liar, sampler._n_startup_trials) == (True, True, 4)
    with pytest.raises(Exception, match="search.tpe.greedy"):
        load_config(Path(__file__).resolve().parents[2] / "configs" / "quick.yaml", ["search.tpe.greedy=true"])
    # The default sampler is GP: TPE's options without search.sampler: tpe would do nothing.
    with pytest.raises(ConfigError, match="search.tpe.multivariate sets an option of the TPE sampler, but "
                                          "search.sampler is 'gp'"):
        load_config(Path(__file__).resolve().parents[2] / "configs" / "quick.yaml", ["search.tpe.multivariate=true"])


def test_gp_options_reach_the_sampler_and_are_refused_with_another(tmp_path):
    from search.layout import Layout
    from search.strategy import searcher

    quick = Path(__file__).resolve().parents[2] / "configs" / "quick.yaml"
    cfg = load_config(quick, ["search.gp.n_startup_trials=4"])
    sampler = searcher(cfg, Layout(tmp_path)).searcher._sampler
    # A private attribute of Optuna's GPSampler: a contract on its internals.
    assert sampler._n_startup_trials == 4
    (tmp_path / "default").mkdir()
    assert searcher(load_config(quick), Layout(tmp_path / "default")).searcher._sampler._n_startup_trials == 10
    with pytest.raises(ConfigError, match="search.gp.n_startup_trials sets an option of the GP sampler, but "
                                          "search.sampler is 'tpe'; set search.sampler: gp, or drop it"):
        load_config(quick, ["search.sampler=tpe", "search.gp.n_startup_trials=4"])


def test_gp_sampler_searches_through_tunes_searcher_with_trials_pending(tmp_path):
    """search.sampler: gp is Optuna's GPSampler behind the same Tune searcher: asked while
    another trial runs (max_concurrent 2), it finds the optimum of a smooth function far
    better than its random start-up trials did."""
    import numpy as np
    import optuna

    from models.space import Dist
    from search.layout import Layout
    from search.space import tune_domains
    from search.strategy import searcher

    cfg = ExperimentConfig.model_validate({"search": {"seed": 3}})  # gp: the default
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        limited = searcher(cfg, Layout(tmp_path))
        assert isinstance(limited.searcher._sampler, optuna.samplers.GPSampler)
        limited.set_search_properties(None, None, tune_domains(
            {"x": Dist("uniform", 0.0, 1.0), "y": Dist("loguniform", 1e-4, 1.0)}))

        def score(p):  # best 0 at x = 0.7, y = 0.01
            return -((p["x"] - 0.7) ** 2) - 0.1 * (np.log10(p["y"]) + 2) ** 2

        values, running = [], {}
        for i in range(24):
            running[f"t{i}"] = limited.suggest(f"t{i}")
            if len(running) == 2:  # the older of the two running trials ends
                done = next(iter(running))
                values.append(score(running.pop(done)))
                limited.on_trial_complete(done, {"objective": values[-1]})
    finally:
        optuna.logging.set_verbosity(level)
    start_up = max(values[:10])  # Optuna's 10 random start-up trials
    assert max(values[10:]) > -0.005 and max(values[10:]) > start_up + 0.01, (start_up, values[10:])


def test_a_deferred_test_grid_needs_in_process_trials():
    """Ray Train's checkpoints are not what search/deferred_test.py loads: refused with the config."""
    with pytest.raises(ConfigError, match=r"train.eval_test.: deferred needs in-process trials .* train.workers: 2"):
        load_config(CONFIGS / "quick.yaml", ["train.eval_test=deferred", "train.workers=2"])
    load_config(CONFIGS / "quick.yaml", ["train.eval_test=deferred"])  # in-process trials: accepted
    with pytest.raises(ConfigError, match=r"search.test_top"):
        load_config(CONFIGS / "quick.yaml", ["train.eval_test=deferred", "search.test_top=-1"])
