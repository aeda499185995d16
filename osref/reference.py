"""The published open-sci-ref 0.01 data (``config/reference``), read in one place.

* :class:`ReferenceData`: ``runs.csv``, ``curves.csv.gz`` and ``baselines.csv`` as data frames, read
  lazily and cached as parquet (the report, the comparison, released models);
* :func:`reference_run_ids`: which published run a (scale, dataset, budget) of ours is compared
  with, read with the ``csv`` module (the Snakefile asks, and must not import pandas for it).
"""

from __future__ import annotations

import csv
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from osref.files import stat_key, write_frame_atomic
from osref.paths import REPO_ROOT

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

REFERENCE_DIR = REPO_ROOT / "config" / "reference"


@functools.cache
def reference_run_ids(reference_dir: Path = REFERENCE_DIR) -> dict[tuple[str, str, str], str]:
    """``(size, dataset, tokens) -> run_id`` of the runs marked ``reference`` in ``runs.csv``."""
    refs = {}
    with open(Path(reference_dir) / "runs.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["reference"] == "True":
                refs[(row["size"], row["dataset"], row["tokens"])] = row["run_id"]
    return refs


@functools.cache
def reference_datasets(reference_dir: Path = REFERENCE_DIR) -> tuple[str, ...]:
    """The datasets of the reference runs (``runs.csv`` names, in its order): the default of the
    config's ``references``."""
    return tuple(dict.fromkeys(dataset for _, dataset, _ in reference_run_ids(reference_dir)))


class ReferenceData:
    """The files of ``config/reference`` (see its README), read lazily; parsed once into ``cache_dir``."""

    def __init__(self, reference_dir: Path, cache_dir: Path | None = None):
        self.reference_dir = Path(reference_dir)
        self.cache_dir = cache_dir
        self._runs: pd.DataFrame | None = None
        self._curves: pd.DataFrame | None = None
        self._baselines: pd.DataFrame | None = None
        self._parameter_counts: dict[str, int] = {}
        self._curves_by_run: dict[str, pd.DataFrame] | None = None

    def _read(self, name: str) -> pd.DataFrame:
        import pandas as pd

        path = self.reference_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"reference file not found: {path}")
        if self.cache_dir is None:
            return pd.read_csv(path)
        key = stat_key(path)
        assert key is not None  # the file exists (checked above)
        mtime_ns, size = key
        stem = name.split(".")[0]
        cached = self.cache_dir / f"reference_{stem}_{size}_{mtime_ns}.parquet"
        if cached.is_file():
            try:
                return pd.read_parquet(cached)
            except Exception as error:  # noqa: BLE001 (a damaged cache only costs a cold build)
                log.warning("ignoring unreadable cache %s (%s)", cached, error)
        frame = pd.read_csv(path)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.cache_dir.glob(f"reference_{stem}_*.parquet"):
            stale.unlink()
        write_frame_atomic(frame, cached)
        return frame

    @property
    def runs(self) -> pd.DataFrame:
        if self._runs is None:
            self._runs = self._read("runs.csv")
        return self._runs

    @property
    def curves(self) -> pd.DataFrame:
        if self._curves is None:
            self._curves = self._read("curves.csv.gz")
        return self._curves

    def curves_of(self, run_id: str) -> pd.DataFrame:
        if self._curves_by_run is None:
            self._curves_by_run = {name: rows for name, rows in self.curves.groupby("run_id", sort=False)}
        return self._curves_by_run.get(run_id, self.curves.iloc[0:0])

    @property
    def baselines(self) -> pd.DataFrame:
        if self._baselines is None:
            self._baselines = self._read("baselines.csv")
        return self._baselines

    def resolve_run(self, reference_run: str | int, context: str) -> pd.Series:
        """The runs.csv row for a run_id or a slurm job id."""
        runs = self.runs
        text = str(reference_run)
        match = runs[runs["run_id"] == text]
        if match.empty and text.isdigit():
            match = runs[runs["slurm_job_id"] == int(text)]
        if len(match) != 1:
            raise ValueError(
                f"{context}: reference_run {reference_run!r} is not a run_id or slurm_job_id in "
                f"{self.reference_dir / 'runs.csv'}"
            )
        return match.iloc[0]

    def parameter_count(self, run: pd.Series) -> int:
        if run["run_id"] not in self._parameter_counts:
            self._parameter_counts[run["run_id"]] = self._count_parameters(run)
        return self._parameter_counts[run["run_id"]]

    @staticmethod
    def _count_parameters(run: pd.Series) -> int:
        from osref.model_spec import ModelSpec

        spec = ModelSpec(
            name=str(run["size"]),
            num_layers=int(run["num_layers"]),
            hidden_size=int(run["hidden_size"]),
            ffn_hidden_size=int(run["ffn_hidden_size"]),
            num_attention_heads=int(run["num_attention_heads"]),
            kv_channels=int(run["hidden_size"]) // int(run["num_attention_heads"]),
            seq_length=int(run["seq_length"]),
            tie_embeddings=bool(run["tied_embedding"]),
        )
        return spec.parameter_count()
