"""The experiment's Optuna study, opened in one place: a locked or corrupt database is one clear
error naming its file (status, export, report, tune --resume), and the results store beside it
is never touched by that failure."""
from __future__ import annotations

from data_pipeline.errors import MsaSearchError

from .layout import Layout


def uses_study(cfg) -> bool:
    """Whether the search (an ExperimentConfig's) samples through an Optuna study. PBT mutates
    running trials' configs, which a sequential sampler cannot model: it samples its initial
    population at random from the same space, and the experiment has no study."""
    return cfg.search.scheduler != "pbt"


class StudyUnreadableError(MsaSearchError):
    pass


def _unreadable(layout: Layout, exc: Exception) -> StudyUnreadableError:
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    if "locked" in reason:
        why = "is locked by another process (a `tune` still running on it?); try again when it ends"
    else:
        why = f"cannot be read as an Optuna study ({reason}); restore it from a backup, or start a new search"
    return StudyUnreadableError(f"{layout.study_location}: the Optuna database {why}. The results in "
                                f"{layout.results} do not depend on it and stay readable")


def storage(layout: Layout):
    """Optuna's RDBStorage of the experiment's database (created if absent), its schema read."""
    import optuna
    import sqlalchemy.exc

    try:
        return optuna.storages.RDBStorage(layout.optuna_storage)
    except (sqlalchemy.exc.SQLAlchemyError, RuntimeError) as exc:
        raise _unreadable(layout, exc) from None


def study_names(layout: Layout) -> list[str]:
    import optuna
    import sqlalchemy.exc

    try:
        return optuna.get_all_study_names(storage=storage(layout))
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise _unreadable(layout, exc) from None


def load_study(layout: Layout, name: str | None = None):
    """The study named `name` (default: the experiment's), with its trials read."""
    import optuna
    import sqlalchemy.exc

    try:
        study = optuna.load_study(study_name=name or layout.study_name, storage=storage(layout))
        study.trials  # noqa: B018 (read now, so that a failure is this error, not a later one)
        return study
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise _unreadable(layout, exc) from None


def asked_trials(layout: Layout) -> int:
    """How many trials the experiment's study holds: 0 before its searcher made it (a driver
    killed early), StudyUnreadableError when its database is locked or corrupt."""
    if not layout.has_study or layout.study_name not in study_names(layout):
        return 0
    return len(load_study(layout).trials)
