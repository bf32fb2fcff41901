"""What an epoch produces, how runs report it, and the Parquet results store (DESIGN.md).

Every path writes rows the same way: the in-process run, the Ray Train callback (from rank
0's report) and the Tune callback (from a trial's report) all call `ResultsStore.append`
with a split -> pattern -> metrics mapping; the pattern columns are derived here, once.
The store holds one row per (trial_id, epoch, split, pattern). Each (trial, epoch) is one
part file written atomically under a name derived from its key, so rows are appended as
they arrive and a repeated epoch (after a resume) replaces its own part instead of
duplicating rows. A trial that ends is compacted into one file (`compact_trial`), so that
reading a large search opens one file per trial rather than one per epoch.
"""
from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from data_pipeline.atomic import atomic_file, writing
from data_pipeline.missing import MODALITY_LETTERS, parse_pattern

from .objective import OBJECTIVE, PatternMetrics, objective_value
from .storage import filesystem

if TYPE_CHECKING:  # the config pulls in the models and torch; a reader of results needs neither
    from .config import ExperimentConfig, SearchConfig

KEY_COLUMNS = ("trial_id", "epoch", "split", "pattern")
HP_PREFIX = "hp."  # the columns of a run's flattened config

EpochResults = dict[str, PatternMetrics]  # split -> pattern name -> metric -> value


def epoch_label(epoch: int, epochs: int) -> str:
    """An epoch as every line a person reads names it: its 0-based index, as stored in the
    results' `epoch` column and named by `status`, `export` and `report`, then how far the run
    is: "epoch 2 (3/3)". (A 1-based "epoch 3/3" next to a best "at epoch 2" read as two epochs.)"""
    return f"epoch {epoch} ({epoch + 1}/{epochs})"


@dataclass
class EpochReport:
    epoch: int
    losses: dict[str, float]  # mean unweighted term values over the epoch, plus "total"
    results: EpochResults  # valid and test
    objective: float  # search.objective on valid over search.objective_patterns
    train_time_s: float
    eval_time_s: float


def epoch_metrics(report: EpochReport, search: SearchConfig) -> dict[str, Any]:
    """What a run reports each epoch (to Ray Train or Tune): the objective(s), robust_f1,
    the losses, the epoch's training and evaluation seconds, and every per-pattern result as
    one JSON string (Tune's own loggers then keep one column for them)."""
    valid = report.results["valid"]
    return {
        OBJECTIVE: report.objective, "epoch": report.epoch,
        "robust_f1": objective_value(valid, "robust_f1", search.objective_patterns),
        **{f"{OBJECTIVE}/{n}": objective_value(valid, n, search.objective_patterns) for n in search.objectives},
        "f1_non0_complete": valid.get("intra:0.0", {}).get("f1_non0", float("nan")),
        **{f"loss/{k}": v for k, v in report.losses.items()},
        "time/train_s": report.train_time_s, "time/eval_s": report.eval_time_s,
        "rows": json.dumps(report.results),
    }


def reported_results(metrics: dict[str, Any]) -> EpochResults:
    """The per-split pattern metrics inside reported `epoch_metrics`."""
    return json.loads(metrics["rows"])


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = value
    return out


@dataclass(frozen=True)
class RunInfo:
    """What every row of one run or trial shares."""

    experiment: str
    trial_id: str
    model: str
    hparams: dict[str, Any]  # the flattened config, as hp.<dotted key> columns

    @classmethod
    def of(cls, experiment: str, trial_id: str, cfg: ExperimentConfig) -> "RunInfo":
        return cls(experiment, trial_id, cfg.model.name, flatten(cfg.model_dump(mode="json")))


def _pattern_columns(name: str) -> dict[str, Any]:
    p = parse_pattern(name)
    return {"pattern": p.name, "pattern_kind": p.kind,
            "missing_rate": p.rate if p.kind == "intra" else None,
            "dropped": "+".join(MODALITY_LETTERS[m] for m in p.dropped) if p.kind == "inter" else None}


def result_rows(run: RunInfo, epoch: int, results: EpochResults, wall_time_s: float) -> list[dict]:
    return [{"experiment": run.experiment, "trial_id": run.trial_id, "model": run.model, "epoch": epoch,
             "split": split, **_pattern_columns(pattern), **{k: float(v) for k, v in metrics.items()},
             "wall_time_s": float(wall_time_s), **{f"{HP_PREFIX}{k}": v for k, v in run.hparams.items()}}
            for split, by_pattern in results.items() for pattern, metrics in by_pattern.items()]


_PART = re.compile(r"part-(.+)-epoch(\d+)\.parquet")  # one (trial, epoch): ResultsStore._part_name
_COMPACTED = re.compile(r"trial-(.+)\.parquet")  # one trial's epochs, merged: ResultsStore._compacted_name
# A read that finds a listed file gone (compacted or forgotten meanwhile) lists again; a few
# times at most, as each try only fails if another compaction lands inside it.
_READ_ATTEMPTS = 5

log = logging.getLogger(__name__)


def _safe(trial_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", trial_id)


@dataclass
class _Listing:
    """The store's files by trial (its safe name)."""

    parts: dict[str, dict[int, str]]  # trial -> epoch -> part
    compacted: dict[str, str]  # trial -> its compacted file

    def trials(self) -> list[str]:
        return sorted(self.parts.keys() | self.compacted.keys())


def _is_string(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def _without_epochs(table: pa.Table, epochs) -> pa.Table:
    """A compacted file's rows less those of `epochs`, which parts of the trial replace."""
    if not epochs:
        return table
    kept = table.filter(pc.invert(pc.is_in(table["epoch"], pa.array(sorted(epochs), table["epoch"].type))))
    # Encoded anew, so that values only the dropped rows had (a perturbed hp.*) are no category.
    for i, field in enumerate(kept.schema):
        if pa.types.is_dictionary(field.type):
            kept = kept.set_column(i, field.name, pc.dictionary_encode(kept.column(i).cast(field.type.value_type)))
    return kept


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    # Each Arrow column is freed once converted (the table is not used after): at 1.28M rows,
    # ~400 MB less at the peak, and fewer fresh pages for the kernel to zero.
    df = table.to_pandas(split_blocks=True, self_destruct=True)
    # Categories in sorted order, so that sorting and groupby order by value as on strings.
    for name, dtype in df.dtypes.items():
        if isinstance(dtype, pd.CategoricalDtype) and not dtype.categories.is_monotonic_increasing:
            df[name] = df[name].cat.reorder_categories(dtype.categories.sort_values())
    return df


class ResultsStore:
    """`root`: a local directory, or a URI of `output.storage` (search/storage.py).

    Files: `part-<trial>-epoch<NNNNN>.parquet`, one per reported (trial, epoch), and
    `trial-<trial>.parquet`, a finished trial's parts merged by `compact_trial`. A part wins
    over the compacted file for its epoch: a trial that reports again after compaction (a
    resume, PBT) replaces those epochs, and a compaction cut short leaves the same rows.
    Each trial has one writer, the process that stores its reports (Tune driver, Ray Train
    controller, in-process run), which also compacts it: a part is never written while its
    trial compacts."""

    def __init__(self, root: str | Path):
        self.root = root
        self.fs, self.path = filesystem(root)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    @staticmethod
    def _part_name(trial_id: str, epoch: int) -> str:
        return f"part-{_safe(trial_id)}-epoch{epoch:05d}.parquet"

    @staticmethod
    def _compacted_name(trial_id: str) -> str:
        return f"trial-{_safe(trial_id)}.parquet"

    def append(self, run: RunInfo, epoch: int, results: EpochResults, wall_time_s: float) -> Path | str:
        """Write all rows of one (trial, epoch); replaces that epoch's part if it exists."""
        rows = result_rows(run, epoch, results, wall_time_s)
        if not rows:
            raise ValueError(f"trial {run.trial_id} epoch {epoch}: no results to write")
        return self._write(self._part_name(run.trial_id, epoch), pa.Table.from_pylist(rows))

    def add_splits(self, run: RunInfo, epoch: int, results: EpochResults) -> Path | str:
        """Add `results` (splits evaluated later: a deferred test grid) to a stored (trial, epoch):
        its part is written with the stored rows of the other splits and the new ones, which
        take the stored rows' wall_time_s (when the epoch was reported). `compact_trial`
        then merges it as it merges any part reported after compaction."""
        safe = _safe(run.trial_id)
        listing = self._listing()
        part = listing.parts.get(safe, {}).get(epoch)
        stored = self._read_plain(part if part is not None else listing.compacted.get(safe))
        if stored is not None and part is None:
            stored = stored.filter(pc.equal(stored["epoch"], epoch))
        if stored is None or stored.num_rows == 0:
            raise KeyError(f"{self.root}: no rows of trial {run.trial_id} epoch {epoch} to add "
                           f"{', '.join(results)} to")
        wall_time_s = float(pc.max(stored["wall_time_s"]).as_py())
        stored = stored.filter(pc.invert(pc.is_in(stored["split"], pa.array(list(results)))))
        added = pa.Table.from_pylist(result_rows(run, epoch, results, wall_time_s))
        return self._write(self._part_name(run.trial_id, epoch),
                           pa.concat_tables([stored, added], promote_options="permissive"))

    def _read_plain(self, path: str | None) -> pa.Table | None:
        """A file's rows with plain string columns, as they were written (None: no file)."""
        if path is None:
            return None
        with self.fs.open_input_file(path) as source:
            return pq.read_table(source, use_threads=False)

    def write_compacted(self, trial_id: str, table: pa.Table) -> Path | str:
        """Write `table`, all rows of one trial, as its compacted file (replacing it whole):
        compaction's write, and bench/results_scale.py's quick way to a large store."""
        # Strings stored plain, as in parts: read() asks Parquet for dictionaries either way.
        plain = pa.schema([pa.field(f.name, f.type.value_type) if pa.types.is_dictionary(f.type) else f
                           for f in table.schema])
        return self._write(self._compacted_name(trial_id), table.cast(plain))

    def _write(self, name: str, table: pa.Table) -> Path | str:
        if self.local:
            path = Path(self.path) / name
            # A full or read-only disk half-way: the files written before stay whole (atomic),
            # and the file is closed at once (by path, pyarrow's writer keeps it open as long as
            # the error lives, holding the space of the removed temporary).
            with writing(path, kept=f"the rows written before stay readable in {self.path}"), \
                    atomic_file(path, force=True) as tmp, open(tmp, "wb") as fh:
                pq.write_table(table, fh)
            return path
        # An object store shows an object whole or not at all (it appears when its upload
        # completes), so a file is written in place; a rename there would be a copy.
        self.fs.create_dir(self.path, recursive=True)
        path = f"{self.path.rstrip('/')}/{name}"
        pq.write_table(table, path, filesystem=self.fs)
        return path

    def _listing(self) -> _Listing:
        listing = _Listing({}, {})
        for info in self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True)):
            if info.type != pafs.FileType.File:
                continue
            if part := _PART.fullmatch(info.base_name):
                listing.parts.setdefault(part[1], {})[int(part[2])] = info.path
            elif compacted := _COMPACTED.fullmatch(info.base_name):
                listing.compacted[compacted[1]] = info.path
        return listing

    def _read_file(self, path: str, hparams: bool = True) -> pa.Table:
        with self.fs.open_input_file(path) as source:
            footer = pq.ParquetFile(source)
            columns = None if hparams else [n for n in footer.schema_arrow.names if not n.startswith(HP_PREFIX)]
            # String columns as dictionaries, straight from Parquet's dictionary pages: pandas
            # gets categoricals, which hold each trial's repeated hp.* strings once instead of
            # a string per row (several times faster to read and convert).
            strings = [field.name for field in footer.schema_arrow if _is_string(field.type)]
            # One thread per file (read() reads several at once) beats threads per column on
            # files this small.
            return pq.ParquetFile(source, metadata=footer.metadata, read_dictionary=strings) \
                .read(columns, use_threads=False)

    def _in_parallel(self, read, files: list) -> list:
        """`read` over `files`, several at once: local reads are bound by decoding (the GIL
        released: a thread per core), remote ones by the store's latency."""
        workers = (os.cpu_count() or 1) if self.local else pa.io_thread_count()
        with ThreadPoolExecutor(max(1, min(workers, len(files)))) as pool:
            return list(pool.map(read, files))

    def compact_trial(self, trial_id: str) -> int:
        """Merge the trial's parts into its compacted file, then delete them; returns how many
        went. A crash at any point loses no row and duplicates none: the compacted file is
        replaced whole (temporary + rename; an object store's upload) before a part goes, and
        a part left beside it wins for its epoch, holding the same rows."""
        safe = _safe(trial_id)
        listing = self._listing()
        parts = listing.parts.get(safe, {})
        if not parts:
            return 0
        tables = self._in_parallel(self._read_file, [parts[epoch] for epoch in sorted(parts)])
        if safe in listing.compacted:
            tables.insert(0, _without_epochs(self._read_file(listing.compacted[safe]), parts.keys()))
        merged = pa.concat_tables(tables, promote_options="default")
        self.write_compacted(trial_id, merged.sort_by("epoch").combine_chunks())
        for path in parts.values():
            self.fs.delete_file(path)
        return len(parts)

    def trials_with_parts(self, trial_ids) -> list[str]:
        """Those of `trial_ids` with parts in the store (never compacted, or reported since)."""
        parts = self._listing().parts
        return [trial_id for trial_id in trial_ids if _safe(trial_id) in parts]

    def remove_trials_except(self, trial_ids) -> int:
        """Remove the rows of every trial not in `trial_ids`; returns how many files went. A
        resumed search calls it with the trials Tune restored: one that reported after Tune's
        last save of its state is not among them, and is started anew under another id."""
        keep = {_safe(t) for t in trial_ids}
        listing = self._listing()
        gone = [path for trial, parts in listing.parts.items() if trial not in keep for path in parts.values()]
        gone += [path for trial, path in listing.compacted.items() if trial not in keep]
        for path in gone:
            self.fs.delete_file(path)
        return len(gone)

    def elapsed_s(self, trial_id: str) -> float:
        """The latest wall_time_s of a trial's stored rows (0 when it has none): where a resumed
        run's clock goes on from, so that its epochs' times keep rising, the time it stood still
        left out."""
        df = self.read(hparams=False)
        if df.empty:
            return 0.0
        times = df.wall_time_s[df.trial_id == trial_id]
        return float(times.max()) if len(times) else 0.0

    def read(self, hparams: bool = True) -> pd.DataFrame:
        """One row per (trial_id, epoch, split, pattern), in trial then epoch order; string
        columns are categoricals (categories sorted: they compare, sort and group as strings).
        `hparams=False` leaves out the hp.* columns, most of a row: a reader that takes a
        trial's config from elsewhere (status, export) reads several times faster."""
        for attempt in range(_READ_ATTEMPTS):
            try:
                table = self._read_all(self._listing(), hparams)
                break
            except FileNotFoundError:
                # Compacted or removed since the listing: its rows are in a file the next
                # listing shows (the compacted file is in place before any part goes).
                if attempt + 1 == _READ_ATTEMPTS:
                    raise
        if table is None:
            return pd.DataFrame(columns=list(KEY_COLUMNS))
        return _to_pandas(table)

    def _read_all(self, listing: _Listing, hparams: bool) -> pa.Table | None:
        files = [(trial, path, listing.parts.get(trial, {}).keys()) for trial, path in listing.compacted.items()]
        files += [(trial, parts[epoch], ()) for trial, parts in listing.parts.items() for epoch in sorted(parts)]
        if not files:
            return None
        tables = self._in_parallel(lambda file: _without_epochs(self._read_file(file[1], hparams), file[2]), files)
        by_trial: dict[str, list[pa.Table]] = {}
        for (trial, _, _), table in zip(files, tables):
            by_trial.setdefault(trial, []).append(table)
        pieces = []
        for trial in listing.trials():
            tables = by_trial[trial]
            if trial in listing.compacted and len(tables) > 1:  # parts after compaction: epochs in order
                tables = [pa.concat_tables(tables, promote_options="default").sort_by("epoch")]
            pieces += tables
        # Parts of different models carry different hyperparameter columns: unify schemas.
        return pa.concat_tables(pieces, promote_options="default")


def compact_finished_trial(root: str | Path, trial_id: str) -> None:
    """`compact_trial` where a trial or run ends. A failure (a full disk, a store gone) leaves
    the trial's parts, which read() returns as before: logged, never raised, since the search
    or run must not fail over a file that only makes reading faster."""
    try:
        ResultsStore(root).compact_trial(trial_id)
    except Exception as exc:  # noqa: BLE001 (see above)
        log.warning("results of %s stay in parts in %s (not compacted: %s)", trial_id, root, exc)
