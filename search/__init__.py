"""Search layer: worker loop, per-pattern evaluation, Tune + Optuna, results store, CLI."""
