"""Configuration: validation against the JSON schema, then cross-field checks.

The Snakefile, the stage scripts and the tests all load a config through :func:`load_config`, so
a bad key, type, unknown dataset or scale fails the same way everywhere and before any job runs,
with a message that names the key (``experiments[0].scales[1]: unknown scale '0.2b' ...``).

Validation fills the schema's defaults in place (the open-sci-ref 0.01 values), which is why the
shipped configs can stay short. It is stricter than plain JSON schema where plain would let a
mistake through: a key given twice in a YAML file is an error (PyYAML and Snakemake keep the last
one silently), ``integer`` means a Python int (JSON schema also accepts ``3.0e+11``), patterns
must match the whole value (``$`` also matches before a final newline), and no number may be
``.inf`` or ``.nan``.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import math
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from osref.paths import REPO_ROOT

SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"

_BUDGET_UNITS = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


class ConfigError(ValueError):
    """A config problem, phrased for the person who edits the YAML."""


# ---- reading YAML strictly ------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are overrides by design
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first_line:
                        raise ConfigError(
                            f"duplicate key {key!r} on lines {first_line[key]} and {line} "
                            "(YAML would silently keep the second); remove one"
                        )
                    first_line[key] = line
                except TypeError:  # an unhashable key: the base constructor reports it
                    pass
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> Any:
    """A YAML (or JSON) file, refusing duplicate keys; errors name the file (and lines)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


RELEASE_CONFIG = REPO_ROOT / "config" / "config.yaml"


def merge_config(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` on top of ``base``, in place, exactly as Snakemake stacks ``--configfile A B``
    (``snakemake.utils.update_config``): mappings merge key by key, recursively; anything else —
    lists included, so an overlay's ``experiments`` — replaces the base's value."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_config(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def is_overlay(config: dict[str, Any]) -> bool:
    """A config that needs the release config under it: no ``experiments`` at all (``--config`` only,
    or a config of settings), or experiments without ``scales`` (an overlay given alone, e.g.
    ``--configfile config/examples/my-dataset.yaml``). A config of released models only
    (``experiments: []``, config/released.yaml) stands alone."""
    return "experiments" not in config or (bool(config["experiments"]) and "scales" not in config)


def with_release_config(config: dict[str, Any]) -> dict[str, Any]:
    """The Snakefile's config, completed in place: an overlay (:func:`is_overlay`) is merged on top of
    ``config/config.yaml`` the way Snakemake merges ``--configfile config/config.yaml overlay.yaml``,
    so both forms give the same grid."""
    if is_overlay(config):
        merged = merge_config(read_yaml(RELEASE_CONFIG), config)
        config.clear()
        config.update(merged)
    return config


def check_config_files(paths: Iterable[str | Path]) -> None:
    """Re-read config files that Snakemake already parsed (``--configfile``), for what its loader
    lets through: a key given twice, of which it keeps the last without a word."""
    for path in paths:
        read_yaml(path)


# ---- schema validation ------------------------------------------------------------------------


def _full_match(validator, pattern, instance, schema):
    """``pattern`` against the whole string (JSON schema searches, so ``^a$`` accepts "a\\n")."""
    if validator.is_type(instance, "string") and not re.fullmatch(pattern, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def _strict_integer(checker, instance) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(
        validator_class,
        {"properties": set_defaults, "pattern": _full_match},
        type_checker=validator_class.TYPE_CHECKER.redefine("integer", _strict_integer),
    )


_DefaultFillingValidator = _with_defaults(jsonschema.Draft202012Validator)
_SCHEMA_CACHE: dict[str, Any] = {}


def schema() -> dict[str, Any]:
    if "schema" not in _SCHEMA_CACHE:
        _SCHEMA_CACHE["schema"] = yaml.safe_load(SCHEMA_PATH.read_text())
    return _SCHEMA_CACHE["schema"]


def key_path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    where = key_path(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        hint = f" (allowed: {', '.join(sorted(allowed))})" if allowed else ""
        return f"{where}: unknown key {', '.join(map(repr, extra))}{hint}"
    if error.validator == "propertyNames" or "propertyNames" in error.schema_path:
        return f"{where}: bad name {error.instance!r}: {error.message}"
    if error.validator == "anyOf" and error.schema.get("description"):
        hint = ""
        if isinstance(error.instance, float) and error.instance.is_integer():
            hint = f" (write {int(error.instance)}, not the float {error.instance!r})"
        return f"{where}: {error.instance!r} is not valid: expected {error.schema['description']}{hint}"
    if error.validator == "type" and isinstance(error.instance, float) and error.instance.is_integer():
        return f"{where}: {error.message} (write {int(error.instance)}, not the float {error.instance!r})"
    return f"{where}: {error.message}"


def _non_finite(value: Any, parts: tuple = ()) -> list[str]:
    """Key paths of every ``.inf``/``.nan`` in the config (no setting accepts one)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{key_path(parts)}: {value!r} is not a finite number"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, (*parts, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _non_finite(v, (*parts, i))]
    return []


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Schema-validate ``config`` in place (filling defaults), then run the semantic checks."""
    problems = _non_finite(config)
    validator = _DefaultFillingValidator(schema())
    errors = sorted(
        validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path)))
    )
    problems += [_describe(e) for e in errors]
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems[:10]))
    check_semantics(config)
    return config


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read (strictly, see :func:`read_yaml`) and validate one config file."""
    path = Path(path)
    config = read_yaml(path) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level")
    if overrides:
        config.update(overrides)
    try:
        return validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def repo_relative(path: str) -> str:
    """Resolve a config path that is relative to the repository (assets, local datasets)."""
    return path if Path(path).is_absolute() else str(REPO_ROOT / path)


# ---- units --------------------------------------------------------------------------------------


def budget_tokens(budget: str | int) -> int:
    if isinstance(budget, int):
        return budget
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([KMBT])", budget)
    if not match:
        raise ConfigError(f"budget {budget!r}: expected e.g. 300B, 1T, 0.25M or an integer")
    return int(round(float(match.group(1)) * _BUDGET_UNITS[match.group(2)]))


def walltime_minutes(text: str) -> int:
    value, unit = float(text[:-1]), text[-1]
    return int(math.ceil(value * (60 if unit == "h" else 1)))


# ---- cross-field checks ---------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _sha256_of(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_tokenizer(tokenizer: dict[str, Any]) -> list[str]:
    """``tokenizer.path`` must hold a ``tokenizer.json`` whose sha256 is ``tokenizer.sha256``: found
    here, before any job, instead of in the first tokenize job after the listings and downloads."""
    path = Path(repo_relative(tokenizer["path"])) / "tokenizer.json"
    try:
        stat = path.stat()
        digest = _sha256_of(str(path), stat.st_mtime_ns, stat.st_size)
    except OSError as exc:
        return [f"tokenizer.path: {tokenizer['path']!r}: cannot read {path} ({exc.strerror or exc})"]
    if digest != tokenizer["sha256"]:
        return [
            f"tokenizer.sha256: {path} has sha256 {digest}, the config says {tokenizer['sha256']} "
            "(a different tokenizer, or a wrong hash)"
        ]
    return []


def check_semantics(config: dict[str, Any]) -> None:
    """Cross-references a schema cannot express; run-level checks follow in ``osref.grid``."""
    problems: list[str] = check_tokenizer(config["tokenizer"])
    datasets, scales, recipes = config["datasets"], config["scales"], config["recipes"]
    for name, ds in datasets.items():
        need = {"hub": ["repo_id"], "local": ["paths"], "http": []}[ds["source"]]
        problems += [f"datasets.{name}.{k}: required for source '{ds['source']}'" for k in need if k not in ds]
        if ds["source"] == "http" and ("urls_file" in ds) == ("list_url" in ds):
            problems.append(
                f"datasets.{name}: source 'http' needs exactly one of list_url (the source's own "
                "list, fetched by the listing job) and urls_file (a list on disk)"
            )
        if "://" not in ds.get("list_url", "://") and "://" not in ds.get("base_url", ""):
            problems.append(
                f"datasets.{name}.base_url: required (an https:// URL) for the relative list_url {ds['list_url']!r}"
            )
        if ds["source"] == "local":  # glob patterns, relative to the repository; each must match a file
            for k, pattern in enumerate(ds.get("paths", [])):
                if next(glob.iglob(repo_relative(pattern), recursive=True), None) is None:
                    problems.append(f"datasets.{name}.paths[{k}]: no file matches {pattern!r}")
        if ds["groups_used"] == "auto" and ds["shard_groups"] > 1:
            problems += [
                f"datasets.{name}.{k}: required to choose how many of its {ds['shard_groups']} shard_groups the "
                "runs need (groups_used: auto); give approx_bytes and tokens_per_byte, or set groups_used: all"
                for k in ("approx_bytes", "tokens_per_byte")
                if ds[k] is None
            ]
    for name, recipe in recipes.items():
        if int(recipe["split"].split(",")[0]) == 0:  # GPTDataset would train on nothing
            problems.append(
                f"recipes.{name}.split: {recipe['split']!r} gives training no share (its first number is 0)"
            )
    for i, exp in enumerate(config["experiments"]):
        where = f"experiments[{i}]"
        for j, d in enumerate(exp["datasets"]):
            if d not in datasets:
                problems.append(f"{where}.datasets[{j}]: unknown dataset {d!r} (known: {', '.join(datasets)})")
        for j, s in enumerate(exp["scales"]):
            if s not in scales:
                problems.append(f"{where}.scales[{j}]: unknown scale {s!r} (known: {', '.join(scales)})")
        if exp["recipe"] not in recipes:
            problems.append(f"{where}.recipe: unknown recipe {exp['recipe']!r} (known: {', '.join(recipes)})")
        for j, b in enumerate(exp["budgets"]):
            try:
                if budget_tokens(b) <= 0:
                    problems.append(f"{where}.budgets[{j}]: must be positive, got {b!r}")
            except ConfigError as exc:
                problems.append(f"{where}.budgets[{j}]: {exc}")
    evaluation = config["evaluation"]
    if evaluation["protocol"] not in evaluation["protocols"]:
        problems.append(
            f"evaluation.protocol: unknown protocol {evaluation['protocol']!r} "
            f"(defined: {', '.join(evaluation['protocols']) or 'none'})"
        )
    else:
        from osref.protocol import check_tasks

        problems += check_tasks(evaluation["protocols"][evaluation["protocol"]], evaluation)
    if evaluation["local_tasks"] is not None and evaluation["local_tasks"] not in datasets:
        problems.append(f"evaluation.local_tasks: unknown dataset {evaluation['local_tasks']!r}")
    if config["references"] is not None:
        from osref.reference import reference_datasets

        known_references = reference_datasets()
        for k, name in enumerate(config["references"]):
            if name not in known_references:
                problems.append(
                    f"references[{k}]: {name!r} is not a dataset of config/reference/runs.csv "
                    f"(known: {', '.join(known_references)})"
                )
    for key in ("runs", "datasets", "scales"):
        known = {"datasets": datasets, "scales": scales}.get(key)
        for value in config["select"].get(key, []):
            if known is not None and value not in known:
                problems.append(f"select.{key}: unknown {key[:-1]} {value!r}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
