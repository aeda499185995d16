"""The documents that pass between stages, typed: the resolved run (``run.json``) and the report's
manifest.

A stage never reads another stage's JSON as a bare dict: ``run.json`` is a :class:`RunDocument`
(a released checkpoint's is a :class:`ReleasedRunDocument`, :func:`load_run_document` tells them
apart), the report's manifest a :class:`ReportManifest`. Each is a frozen dataclass with
``from_json``/``to_json``; every default lives in its field, so training, export, checkpointing,
the run identity, evaluation and the report cannot disagree about one. Training, export and the
checkpoint code take the run's paths from :meth:`RunDocument.layout` (:class:`osref.paths.RunLayout`).

Compatibility, both ways, because campaigns have these files on disk and Snakemake compares a
rule's params by their ``repr``:

* ``to_json`` gives back the exact dict the pipeline wrote before these types existed — the same
  keys in the same order (the tokenizer's keys in the order they came from the config), the same
  values (an ``int`` stays an ``int``) — so a ``run.json`` rule's params and the run identity do not
  change (``tests/test_contracts.py`` against files written by the previous version,
  ``tests/data/contracts/``);
* ``from_json`` reads those files, and the smaller hand-written ones of the tests and benchmarks: a
  missing optional key takes the field's default, a missing required key or an unknown one is an
  error naming it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from osref.model_spec import ModelSpec
from osref.paths import RunLayout

# the task name of the unweighted in-average mean row in every results table (eval, report, compare)
AVG_TASK = "avg"


class ContractError(ValueError):
    """A stage document that does not have the shape its reader needs (names the file and key)."""


def _fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def _build(cls, data: Mapping[str, Any], where: str, convert: Mapping[str, Any] | None = None):
    """``cls(**data)`` with a clear error for a missing or unknown key; ``convert`` maps a field to
    a function applied to its value (lists to tuples, nested documents)."""
    if not isinstance(data, Mapping):
        raise ContractError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in _fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ContractError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(sorted(names))})"
        )
    required = [
        f.name for f in _fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ContractError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
    values = dict(data)
    for name, function in (convert or {}).items():
        if name in values and values[name] is not None:
            values[name] = function(values[name])
    return cls(**values)


def _ints(values) -> tuple[int, ...]:
    return tuple(values)


# ---- run.json --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """``run.json``'s ``train`` block: the recipe resolved for one run and this cluster's device."""

    schedule: str
    lr: float
    min_lr: float
    warmup_iters: int
    cooldown_iters: int
    train_iters: int
    global_batch_size: int
    micro_batch_size: int
    seq_length: int
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    weight_decay: float
    clip_grad: float
    save_interval: int
    checkpoint_iters: tuple[int, ...] = ()  # saved besides the segment's end
    segment_ends: tuple[int, ...] = ()
    seed: int
    split: str
    precision: str = "fp32"
    device: str = "cpu"
    log_interval: int = 1
    eval_iters: int = 2  # validation batches at a segment's end
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    recompute: str = "none"
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    tensorboard: bool = False
    kernels: dict[str, Any] | None = None  # None: every variant this device can run (osref.kernels)
    # set only by benchmarks and tests: left out of run.json when unset
    attention: str | None = None  # "local", "sdpa", "te" (default: osref.megatron_model.attention_backend)
    peak_tflops: float | None = None  # MFU denominator (default: the GPU's bf16 peak)

    OMITTED_WHEN_NONE: ClassVar[tuple[str, ...]] = ("attention", "peak_tflops")

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "train") -> TrainSettings:
        """A ``run.json`` ``train`` block."""
        return _build(cls, data, where, {"checkpoint_iters": _ints, "segment_ends": _ints, "kernels": dict})

    @classmethod
    def coerce(cls, train: TrainSettings | Mapping[str, Any]) -> TrainSettings:
        return train if isinstance(train, TrainSettings) else cls.from_json(train)

    @property
    def validation_batches(self) -> int:
        return max(1, int(self.eval_iters or 2))


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """``run.json``'s ``data`` block: the Megatron prefixes a run trains on and its index cache."""

    prefixes: tuple[str, ...]
    cache_dir: str
    weights: tuple[float, ...] | None = None  # None: by token count (one prefix: 1)

    KEY_ORDER: ClassVar[tuple[str, ...]] = ("prefixes", "weights", "cache_dir")


@dataclasses.dataclass(frozen=True)
class TokenizerSettings:
    """``run.json``'s ``tokenizer`` block: the config's ``tokenizer`` section, path resolved."""

    path: str
    eod_id: int = 0
    size: int = 50277
    sha256: str | None = None
    backend: str | None = None
    verify_documents: int | None = None
    bad_documents: str | None = None
    max_bad_fraction: float | None = None
    # the order the keys came in (the config's): to_json keeps it, so the document's repr does not change
    key_order: tuple[str, ...] = dataclasses.field(default=(), compare=False, repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "tokenizer") -> TokenizerSettings:
        settings = _build(cls, {k: v for k, v in data.items() if k != "key_order"}, where)
        return dataclasses.replace(settings, key_order=tuple(data))

    def to_json(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in _fields(self) if f.name != "key_order"}
        order = list(self.key_order) + [k for k in values if k not in self.key_order and values[k] is not None]
        return {key: values[key] for key in order}


@dataclasses.dataclass(frozen=True)
class BranchSettings:
    """Where a WSD cool-down branch starts: its parent's run and checkpoint (``run.json`` ``branch``)."""

    parent_run_id: str
    parent_run_dir: str
    iteration: int
    parent_train_iters: int


@dataclasses.dataclass(frozen=True)
class RunDocument:
    """A resolved training run, as ``{runs}/{run_id}/run.json`` holds it (:func:`osref.grid.run_document`
    writes it; training, export, the run identity and evaluation read it)."""

    run_id: str
    model: ModelSpec
    train: TrainSettings
    data: DataSettings
    tokenizer: TokenizerSettings
    run_dir: str  # run.json: paths.run_dir
    experiment: str | None = None
    scale: str | None = None
    dataset: str | None = None
    budget: str | None = None
    tokens: int | None = None
    branch: BranchSettings | None = None

    KEY_ORDER: ClassVar[tuple[str, ...]] = (
        "run_id", "experiment", "scale", "dataset", "budget", "tokens",
        "model", "train", "data", "tokenizer", "paths", "branch",
    )  # fmt: skip
    OPTIONAL_HEAD: ClassVar[tuple[str, ...]] = ("experiment", "scale", "dataset", "budget", "tokens")

    @property
    def layout(self) -> RunLayout:
        """The run directory's paths (checkpoints, metrics, locks)."""
        return RunLayout(self.run_dir)

    @property
    def tokens_per_iteration(self) -> int:
        return self.train.tokens_per_iteration

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "run.json") -> RunDocument:
        """A ``run.json`` dict (also an older or hand-written one; see the module docstring)."""
        if not isinstance(data, Mapping):
            raise ContractError(f"{where}: expected a JSON object")
        known = set(cls.KEY_ORDER)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ContractError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
        for key in ("run_id", "model", "train", "data", "tokenizer", "paths"):
            if key not in data:
                raise ContractError(f"{where}: missing key {key!r}")
        paths = data["paths"]
        if not isinstance(paths, Mapping) or "run_dir" not in paths:
            raise ContractError(f"{where}: missing key 'paths.run_dir'")
        model = _build(ModelSpec, data["model"], f"{where}: model")
        train = TrainSettings.from_json(data["train"], f"{where}: train")
        data_block = _build(DataSettings, data["data"], f"{where}: data", {"prefixes": tuple, "weights": tuple})
        branch = data.get("branch")
        return cls(
            run_id=data["run_id"],
            model=model,
            train=train,
            data=data_block,
            tokenizer=TokenizerSettings.from_json(data["tokenizer"], f"{where}: tokenizer"),
            run_dir=str(paths["run_dir"]),
            branch=None if branch is None else _build(BranchSettings, branch, f"{where}: branch"),
            **{key: data[key] for key in cls.OPTIONAL_HEAD if key in data},
        )

    def to_json(self) -> dict[str, Any]:
        """The ``run.json`` dict, key for key what the pipeline has always written."""
        train = {}
        for f in _fields(TrainSettings):
            value = getattr(self.train, f.name)
            if f.name in TrainSettings.OMITTED_WHEN_NONE and value is None:
                continue
            train[f.name] = list(value) if isinstance(value, tuple) else value
        data = {
            "prefixes": list(self.data.prefixes),
            "weights": None if self.data.weights is None else list(self.data.weights),
            "cache_dir": self.data.cache_dir,
        }
        document: dict[str, Any] = {"run_id": self.run_id}
        for key in self.OPTIONAL_HEAD:
            if getattr(self, key) is not None:
                document[key] = getattr(self, key)
        document |= {
            "model": self.model.as_dict(),
            "train": train,
            "data": data,
            "tokenizer": self.tokenizer.to_json(),
            "paths": {"run_dir": self.run_dir},
            "branch": None if self.branch is None else dataclasses.asdict(self.branch),
        }
        return document

    @classmethod
    def coerce(cls, run: RunDocument | Mapping[str, Any]) -> RunDocument:
        """``run`` itself, or a ``run.json`` dict read into a :class:`RunDocument`."""
        return run if isinstance(run, RunDocument) else cls.from_json(run)

    def replace(self, **changes: Any) -> RunDocument:
        """A copy with some fields changed (``train=dataclasses.replace(run.train, ...)``)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ReleasedTrainSettings:
    """What a released checkpoint's ``run.json`` says of its training (``tokens_seen`` per iteration)."""

    global_batch_size: int
    seq_length: int
    train_iters: int
    save_interval: int

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length


@dataclasses.dataclass(frozen=True)
class ReleasedRunDocument:
    """``{runs}/released/{name}/run.json``: a released checkpoint evaluated like our runs
    (:func:`osref.released_models.run_document` writes it; evaluation reads it)."""

    run_id: str
    repo: str
    reference_run: str | None
    train: ReleasedTrainSettings
    source: str = "released"

    @property
    def tokens_per_iteration(self) -> int:
        return self.train.tokens_per_iteration

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "run.json") -> ReleasedRunDocument:
        values = dict(data)
        if "train" in values:
            values["train"] = _build(ReleasedTrainSettings, values["train"], f"{where}: train")
        return _build(cls, values, where)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "source": self.source,
            "repo": self.repo,
            "reference_run": self.reference_run,
            "train": dataclasses.asdict(self.train),
        }


def run_document_from_json(data: Mapping[str, Any], where: str = "run.json") -> RunDocument | ReleasedRunDocument:
    """The document a ``run.json`` dict holds: a released checkpoint's (``source: released``) or a run's."""
    if isinstance(data, Mapping) and data.get("source") == "released":
        return ReleasedRunDocument.from_json(data, where)
    return RunDocument.from_json(data, where)


def load_run_document(path: str | Path) -> RunDocument | ReleasedRunDocument:
    """Read a ``run.json`` (ours or a released checkpoint's); errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ContractError(f"{path}: cannot read the run document ({error})") from None
    return run_document_from_json(data, str(path))


# ---- the report's manifest -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProtocolTask:
    """One task of the evaluation protocol (``evaluation.protocols.<name>`` entries)."""

    task: str
    shots: int
    metric: str
    in_average: bool | None = None  # None: not given, which counts it in the average (kept as given)

    @property
    def counts_in_average(self) -> bool:
        return self.in_average is None or bool(self.in_average)

    def to_json(self) -> dict[str, Any]:
        document = {"task": self.task, "shots": self.shots, "metric": self.metric}
        return document if self.in_average is None else document | {"in_average": self.in_average}


def parse_protocol(protocol: Any, where: str = "manifest") -> tuple[ProtocolTask, ...]:
    """The protocol's entries (a list of ``{task, shots, metric[, in_average]}``), checked: not
    empty, the three keys present, task names unique and not ``avg`` (the average's row)."""
    if not protocol:
        raise ContractError(f"{where} key 'protocol' is empty")
    tasks = []
    for index, spec in enumerate(protocol):
        missing = {"task", "shots", "metric"} - set(spec)
        if missing:
            raise ContractError(f"{where} protocol[{index}] lacks key(s) {sorted(missing)}: {spec!r}")
        tasks.append(_build(ProtocolTask, spec, f"{where} protocol[{index}]"))
    names = [spec.task for spec in tasks]
    if len(set(names)) != len(names) or AVG_TASK in names:
        raise ContractError(f"{where} protocol task names must be unique and not {AVG_TASK!r}: {names}")
    return tuple(tasks)


@dataclasses.dataclass(frozen=True)
class ReportRun:
    """One run in the report's manifest: what it is, what was scheduled, where its files are."""

    run_id: str
    checkpoint_iters: tuple[int, ...]  # the evaluated checkpoints
    eval_files: tuple[str, ...]
    dataset: str | None = None
    scale: str | None = None
    budget: str | None = None
    tokens: int | None = None
    seq_length: int | None = None
    global_batch_size: int | None = None
    params: int | None = None
    train_iters: int | None = None
    reference_run: str | int | None = None  # a runs.csv run_id or slurm_job_id
    train_metrics: str | None = None
    valid_metrics: str | None = None
    # training-relevant values that differ from the reference run's recipe, each
    # {"key": "global_batch_size", "run": 1008, "reference": 1024}; () when the recipe is the same
    # (or there is no reference run)
    recipe_differences: tuple[dict[str, Any], ...] = ()

    KEY_ORDER: ClassVar[tuple[str, ...]] = (
        "run_id", "dataset", "scale", "budget", "tokens", "seq_length", "global_batch_size", "params",
        "train_iters", "checkpoint_iters", "reference_run", "eval_files", "train_metrics", "valid_metrics",
        "recipe_differences",
    )  # fmt: skip

    @property
    def tokens_per_iteration(self) -> int | None:
        if self.global_batch_size and self.seq_length:
            return int(self.global_batch_size) * int(self.seq_length)
        return None

    def to_json(self) -> dict[str, Any]:
        document = {key: list(v) if isinstance(v := getattr(self, key), tuple) else v for key in self.KEY_ORDER}
        if not self.recipe_differences:
            del document["recipe_differences"]  # a manifest of the previous version round-trips unchanged
        return document


@dataclasses.dataclass(frozen=True)
class ReportManifest:
    """What the report reads: the protocol and every scheduled run with its evaluation files
    (:meth:`osref.workflow.WorkflowIndex.report_manifest` writes it; :func:`osref.report.build_report`
    reads it)."""

    protocol: tuple[ProtocolTask, ...]
    runs: tuple[ReportRun, ...]
    # datasets (runs.csv names) whose published curves and final scores the report shows whether or
    # not they are scheduled; None: every dataset of config/reference/runs.csv
    references: tuple[str, ...] | None = None
    # the released-checkpoint results (workflow/rules/released.smk: results.csv and reproduction.csv
    # of scripts/released.py results), None when the config names no released models
    released_results: str | None = None
    released_reproduction: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "manifest") -> ReportManifest:
        for key in ("protocol", "runs"):
            if key not in data:
                raise ContractError(f"{where} lacks key {key!r}")
        protocol = parse_protocol(data["protocol"], where)
        runs, seen = [], set()
        for index, run in enumerate(data["runs"]):
            for key in ("run_id", "checkpoint_iters", "eval_files"):
                if key not in run:
                    raise ContractError(f"{where} runs[{index}] ({run.get('run_id', '?')}) lacks key {key!r}")
            if run["run_id"] in seen:
                raise ContractError(f"{where} runs[{index}]: duplicate run_id {run['run_id']!r}")
            seen.add(run["run_id"])
            runs.append(
                _build(
                    ReportRun,
                    run,
                    f"{where} runs[{index}] ({run['run_id']})",
                    {
                        "checkpoint_iters": lambda values: tuple(int(i) for i in values),
                        "eval_files": tuple,
                        "recipe_differences": lambda values: tuple(dict(v) for v in values),
                    },
                )
            )
        extra = {key: data.get(key) for key in ("references", "released_results", "released_reproduction")}
        unknown = sorted(set(data) - {"protocol", "runs", *extra})
        if unknown:
            raise ContractError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
        if extra["references"] is not None:
            extra["references"] = tuple(str(name) for name in extra["references"])
        return cls(protocol=protocol, runs=tuple(runs), **extra)

    def to_json(self) -> dict[str, Any]:
        document = {
            "protocol": [spec.to_json() for spec in self.protocol],
            "runs": [run.to_json() for run in self.runs],
        }
        for key in ("references", "released_results", "released_reproduction"):
            value = getattr(self, key)
            if value is not None:
                document[key] = list(value) if isinstance(value, tuple) else value
        return document

    @classmethod
    def coerce(cls, manifest: ReportManifest | Mapping[str, Any]) -> ReportManifest:
        return manifest if isinstance(manifest, ReportManifest) else cls.from_json(manifest)
