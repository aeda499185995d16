"""What a released checkpoint's remote code declares for its QK norms, read without running it.

The released open-sci-ref 0.01 models ship their modelling code (``modeling_opensci.py``, loaded by
``trust_remote_code=True``). Our converter maps their ``q_layernorm``/``k_layernorm`` (or
``q_norm``/``k_norm``) weights onto the per-head RMSNorm of our export class, which is right only if
the released code applies an RMSNorm over ``head_dim`` with the eps we use. Drafts of that code were
seen with ``nn.LayerNorm(head_dim, bias=False)`` (which also subtracts the mean), and a published
README prints ``OpensciRMSNorm((64,), eps=1e-05)``; which one a given checkpoint ships must be read
from the checkpoint itself.

Running downloaded code is not an option (it is a remote code execution, and it breaks on the
transformers we pin), so the file is parsed with :mod:`ast` and never imported or executed. The
reader recognises a small set of norm constructions and refuses anything else, naming it:

* the attribute assignments ``self.q_layernorm = …`` / ``self.k_layernorm = …`` (or ``q_norm``/``k_norm``)
  in any class of the module, possibly as ``A if cond else nn.Identity()``;
* the norm class: ``nn.LayerNorm``/``torch.nn.LayerNorm`` (kind ``layernorm``), ``nn.RMSNorm``,
  transformers' ``LlamaRMSNorm``/``Qwen2RMSNorm``/``Qwen3RMSNorm``/``MistralRMSNorm`` (``rmsnorm``), or
  a class defined in the file whose ``forward`` computes ``x * rsqrt(mean(x**2) + eps)`` without
  subtracting a mean (``rmsnorm``) or that subclasses one of the above;
* its size: ``self.head_dim``/``config.head_dim``/``hidden_size // num_attention_heads`` (per head) or
  ``config.hidden_size`` (across heads);
* its eps: a number, ``config.<key>`` (looked up in the checkpoint's ``config.json``), or the class's
  default (the ``eps`` default of a class defined in the file; ``1e-5`` for ``nn.LayerNorm``).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

QK_NORM_ATTRIBUTES = ("q_layernorm", "k_layernorm", "q_norm", "k_norm")
_TORCH_LAYERNORM = {"nn.LayerNorm", "torch.nn.LayerNorm", "LayerNorm"}
_TORCH_RMSNORM = {"nn.RMSNorm", "torch.nn.RMSNorm", "RMSNorm"}
# transformers' RMSNorm classes (all: x * rsqrt(mean(x^2) + eps) * weight, eps default 1e-6)
_TRANSFORMERS_RMSNORM = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}
_TRANSFORMERS_RMSNORM_EPS = 1e-6
_IDENTITY = {"nn.Identity", "torch.nn.Identity", "Identity"}
_PER_HEAD_SIZES = {"self.head_dim", "config.head_dim", "head_dim", "self.config.head_dim"}
_ACROSS_HEAD_SIZES = {"config.hidden_size", "self.hidden_size", "hidden_size", "self.config.hidden_size"}


class RemoteCodeError(ValueError):
    """The remote code declares something about its QK norms that the converter does not know."""


@dataclasses.dataclass(frozen=True)
class QKNorm:
    """The QK norm the remote code applies: ``kind`` rmsnorm | layernorm, ``eps``, ``per_head``."""

    kind: str
    eps: float
    per_head: bool
    declared: str  # the constructor call as written, e.g. "OpensciRMSNorm(self.head_dim, eps=config.rms_norm_eps)"
    attributes: tuple[str, ...]  # the attribute names it is assigned to (q_layernorm, k_layernorm, ...)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


def _number(node: ast.AST) -> float | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _number(node.operand)
        return -value if value is not None else None
    return None


def _method(node: ast.AST) -> str | None:
    """The called name of a Call: ``mean`` for ``x.pow(2).mean(-1)``, ``rsqrt`` for ``torch.rsqrt(v)``."""
    if isinstance(node, ast.Call):
        func = node.func
        return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return None


def _is_rms_forward(cls: ast.ClassDef) -> bool:
    """forward computes x * rsqrt(mean(x^2) + eps) and subtracts no mean (that would be a LayerNorm)."""
    forward = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward"), None)
    if forward is None:
        return False
    calls = {_method(n) for n in ast.walk(forward)} - {None}
    squares = any(
        (isinstance(n, ast.Call) and _method(n) == "pow" and n.args and _number(n.args[0]) == 2)
        or (isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) and _number(n.right) == 2)
        for n in ast.walk(forward)
    )
    subtracts_mean = any(
        isinstance(n, ast.BinOp) and isinstance(n.op, ast.Sub) and any(_method(m) == "mean" for m in ast.walk(n.right))
        for n in ast.walk(forward)
    )
    mean_assigned = {  # mu = x.mean(...); x - mu (a mean of squares is the RMS statistic, not a centre)
        t.id
        for n in ast.walk(forward)
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
        and _method(n.value) == "mean"
        and not any(_method(m) == "pow" for m in ast.walk(n.value))
        and not any(isinstance(m, ast.BinOp) and isinstance(m.op, ast.Pow) for m in ast.walk(n.value))
    }
    subtracts_named_mean = any(
        isinstance(n, ast.BinOp)
        and isinstance(n.op, ast.Sub)
        and isinstance(n.right, ast.Name)
        and n.right.id in mean_assigned
        for n in ast.walk(forward)
    )
    return "rsqrt" in calls and "mean" in calls and squares and not subtracts_mean and not subtracts_named_mean


def _eps_default(cls: ast.ClassDef) -> float | None:
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None:
        return None
    args = init.args.args[len(init.args.args) - len(init.args.defaults) :]
    for arg, default in [
        *zip(args, init.args.defaults, strict=False),
        *zip(init.args.kwonlyargs, init.args.kw_defaults, strict=False),
    ]:
        if arg.arg in ("eps", "epsilon", "variance_epsilon") and default is not None:
            return _number(default)
    return None


class _Module:
    def __init__(self, tree: ast.Module, name: str):
        self.name = name
        self.classes = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}

    def classify(self, func: str, seen: frozenset[str] = frozenset()) -> tuple[str, float | None]:
        """(kind, default eps) of a norm class named ``func``; raises on anything unknown."""
        short = func.rsplit(".", 1)[-1]
        if func in _TORCH_LAYERNORM:
            return "layernorm", 1e-5
        if func in _TORCH_RMSNORM:
            raise RemoteCodeError(
                f"{self.name}: QK norm {func} without an explicit eps (torch's default depends on "
                "the dtype); the converter does not know it"
            )
        if short in self.classes and short not in seen:
            cls = self.classes[short]
            if _is_rms_forward(cls):
                return "rmsnorm", _eps_default(cls)
            for base in cls.bases:
                base_name = _dotted(base)
                if base_name and base_name not in ("nn.Module", "torch.nn.Module", "Module"):
                    kind, eps = self.classify(base_name, seen | {short})
                    own = _eps_default(cls)
                    return kind, own if own is not None else eps
            raise RemoteCodeError(
                f"{self.name}: QK norm class {short} (defined in the file) is neither an RMSNorm "
                "(x * rsqrt(mean(x^2) + eps)) nor a subclass of a known norm; the converter does not know it"
            )
        if short in _TRANSFORMERS_RMSNORM:
            return "rmsnorm", _TRANSFORMERS_RMSNORM_EPS
        raise RemoteCodeError(
            f"{self.name}: QK norm class {func!r} is unknown to the converter "
            "(known: nn.LayerNorm, transformers' *RMSNorm, an RMSNorm defined in the file)"
        )


def _norm_assignments(tree: ast.Module) -> list[tuple[str, str, ast.expr]]:
    """(class, attribute, value) of every ``self.<qk norm attribute> = value`` in the module."""
    found = []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for node in ast.walk(cls):
            targets: list[ast.expr]
            value: ast.expr | None
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign):
                targets, value = [node.target], node.value
            else:
                continue
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "self"
                    and target.attr in QK_NORM_ATTRIBUTES
                    and value is not None
                ):
                    found.append((cls.name, target.attr, value))
    return found


def _norm_calls(value: ast.expr, where: str) -> list[ast.Call]:
    """The norm constructor(s) of an assignment: both arms of ``A if c else B``, without Identity/None."""
    if isinstance(value, ast.IfExp):
        return _norm_calls(value.body, where) + _norm_calls(value.orelse, where)
    if isinstance(value, ast.Constant) and value.value is None:
        return []
    if isinstance(value, ast.Call) and _dotted(value.func) in _IDENTITY:
        return []
    if isinstance(value, ast.Call) and _dotted(value.func):
        return [value]
    raise RemoteCodeError(f"{where} = {ast.unparse(value)}: not a norm constructor the converter can read")


def _size(call: ast.Call, where: str) -> bool:
    """True for a per-head norm (size head_dim), False across heads; raise otherwise."""
    arg = (
        call.args[0]
        if call.args
        else next((k.value for k in call.keywords if k.arg in ("hidden_size", "normalized_shape", "dim", "size")), None)
    )
    if arg is None:
        raise RemoteCodeError(f"{where}: {ast.unparse(call)} gives no size")
    text = ast.unparse(arg).replace(" ", "")
    if text in _PER_HEAD_SIZES or text in (
        "config.hidden_size//config.num_attention_heads",
        "self.hidden_size//self.num_heads",
        "(self.head_dim,)",
    ):
        return True
    if text in _ACROSS_HEAD_SIZES:
        return False
    raise RemoteCodeError(
        f"{where}: {ast.unparse(call)}: size {ast.unparse(arg)!r} is neither head_dim nor hidden_size"
    )


def _eps(call: ast.Call, default: float | None, config: dict[str, Any], where: str) -> float:
    keyword = next((k.value for k in call.keywords if k.arg in ("eps", "epsilon")), None)
    if keyword is None and len(call.args) > 1:
        keyword = call.args[1]
    if keyword is None:
        if default is None:
            raise RemoteCodeError(
                f"{where}: {ast.unparse(call)} sets no eps and its class has no default the converter can read"
            )
        return default
    if (value := _number(keyword)) is not None:
        return value
    name = _dotted(keyword) or ""
    for prefix in ("self.config.", "config."):
        if name.startswith(prefix):
            key = name[len(prefix) :]
            if key not in config:
                raise RemoteCodeError(f"{where}: eps comes from config.{key}, which the checkpoint's config.json lacks")
            return float(config[key])
    raise RemoteCodeError(
        f"{where}: {ast.unparse(call)}: eps {ast.unparse(keyword)!r} is neither a number nor config.<key>"
    )


def read_qk_norm(source: str, config: dict[str, Any], name: str = "modeling_opensci.py") -> QKNorm:
    """The QK norm that the remote code ``source`` (text of the modelling file) declares. Parsed, never run."""
    try:
        tree = ast.parse(source, filename=name)
    except SyntaxError as error:
        raise RemoteCodeError(f"{name}: not valid Python ({error})") from error
    module = _Module(tree, name)
    assignments = _norm_assignments(tree)
    if not assignments:
        raise RemoteCodeError(
            f"{name}: no assignment to self.{{{', '.join(QK_NORM_ATTRIBUTES)}}}: "
            "the file declares no QK norm the converter can read"
        )
    declared: list[tuple[str, QKNorm]] = []
    for cls, attribute, value in assignments:
        where = f"{name}: {cls}.{attribute}"
        for call in _norm_calls(value, where):
            func = _dotted(call.func) or "?"
            kind, default_eps = module.classify(func)
            norm = QKNorm(
                kind=kind,
                eps=_eps(call, default_eps, config, where),
                per_head=_size(call, where),
                declared=ast.unparse(call),
                attributes=(attribute,),
            )
            declared.append((where, norm))
    if not declared:
        raise RemoteCodeError(f"{name}: the QK norm attributes are only ever Identity/None")
    first_where, first = declared[0]
    for where, norm in declared[1:]:
        if (norm.kind, norm.eps, norm.per_head) != (first.kind, first.eps, first.per_head):
            raise RemoteCodeError(
                f"{name}: QK norms disagree: {first_where} = {first.declared} "
                f"({first.kind}, eps {first.eps:g}) but {where} = {norm.declared} ({norm.kind}, eps {norm.eps:g})"
            )
    attributes = tuple(dict.fromkeys(norm.attributes[0] for _, norm in declared))
    return dataclasses.replace(first, attributes=attributes)


def modeling_file(directory: Path, config: dict[str, Any]) -> Path | None:
    """The modelling file that ``auto_map.AutoModelForCausalLM`` of ``config`` names, if present."""
    target = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
    if not target:
        candidates = sorted(directory.glob("modeling_*.py"))
        return candidates[0] if len(candidates) == 1 else None
    module = target.split("--")[-1].rsplit(".", 1)[0]  # "repo--modeling_opensci.OpensciForCausalLM" also occurs
    path = directory / f"{module}.py"
    return path if path.is_file() else None
