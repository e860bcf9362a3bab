"""Compression recipes: strict YAML schema, --set overrides, hashing and end-of-run checks.

A recipe is data (never code): every key is declared in ``SCHEMA`` with its type and
default; an unknown key, a wrong type or an impossible value is a RecipeError naming the
key, its line and what is valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from prunekit.errors import PrunekitError
from prunekit.limits import MAX_EPOCHS, MAX_EXAMPLES, MAX_SAMPLES, MAX_SEED, MAX_SHOTS, MAX_STEPS

#: A recipe is a page of settings: refuse anything that could expand before it is parsed.
MAX_RECIPE_BYTES = 256 * 1024
MAX_YAML_DEPTH = 16
MAX_YAML_ALIASES = 32


class _Loader(yaml.SafeLoader):
    """SafeLoader reading YAML 1.2 floats: 1e-3 is a number, not the string '1e-3'."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class RecipeError(PrunekitError):
    """The recipe file or an override is invalid (exit 2)."""


@dataclass(frozen=True)
class Field:
    """One recipe key: accepted Python types, default, one-line description, and the range
    numbers must fall in: low <= value (value > low when low_open), value <= high (value < high
    when high_open); None = unbounded. ``choices`` names a registry (see ``load_recipe``);
    ``cap``: a sanity bound far above any useful value (prunekit.limits), so a typo ends in
    one line instead of a MemoryError. ``words``: strings a numeric key also accepts (e.g.
    finetune.lr: auto)."""

    types: tuple[type, ...]
    default: object
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: str | None = None
    cap: float | None = None
    words: tuple[str, ...] = ()


def _f(types, default, help_text, **limits):
    return Field(types if isinstance(types, tuple) else (types,), default, help_text, **limits)


NUM = (int, float)
OPT_STR = (str, type(None))
SCHEMA: dict[str, dict[str, Field] | Field] = {
    "version": _f(int, 1, "recipe format version (1)", low=1, high=1),
    "name": _f(OPT_STR, None, "a name for reports"),
    "seed": _f(int, 0, "seed of every random choice", low=0, cap=MAX_SEED),
    "data": _f(str, "digits", "data spec: digits, mnist5k, synthetic, FILE.npz, module:function"),
    "model": {
        "example": _f(OPT_STR, None, "train this zoo example first (e.g. mlp-digits)"),
        "checkpoint": _f(OPT_STR, None, "checkpoint path, relative to the recipe file"),
        "arch": _f(OPT_STR, None, "module:factory[?k=v] for a state_dict checkpoint"),
    },
    "task": {
        "spec": _f(OPT_STR, None, "module:factory of a user task (forward, loss)"),
        "loss": _f(str, "auto", "auto, classification, regression or distill", choices="loss"),
        "distill_metric": _f(str, "auto", "distillation metric", choices="distill_metric"),
        "temperature": _f(NUM, 1.0, "KL temperature for distillation", low=0, low_open=True),
    },
    "targets": {
        "include": _f(list, [], "glob patterns of parameter names to prune"),
        "exclude": _f(list, [], "glob patterns of parameter names never pruned"),
        "embeddings": _f(bool, False, "also prune nn.Embedding weights (diagonal Fisher)"),
    },
    "criterion": {
        "name": _f(str, "auto", "the scoring criterion", choices="criterion"),
        "fisher": _f(OPT_STR, None, "curvature estimator", choices="fisher"),
        "labels": _f(OPT_STR, None, "Fisher labels", choices="labels"),
        "samples": _f(int, 1, "labels drawn per example for sampled", low=1, cap=MAX_SAMPLES),
        "lambda": _f(NUM, 0.0, "locality penalty", low=0),
        "scope": _f(str, "global", "ranking scope", choices="scope"),
        "score_examples": _f(
            int, 1000, "training examples used to score", low=1, cap=MAX_EXAMPLES
        ),
        "score_batch_size": _f(
            int, 250, "examples per scoring batch (memory)", low=1, cap=MAX_EXAMPLES
        ),
        "refit_basis_every": _f(int, 0, "EKFAC eigenbasis refit period (0 = keep)", low=0),
        "refit_basis_below": _f(NUM, 0.5, "EKFAC basis refit at this kept fraction (0 = off)",
                                low=0.0, high=1.0, high_open=True),  # fmt: skip
        "masked_scaling": _f(bool, False, "EKFAC scaling from masked gradients (slow)"),
        "compensate": _f(bool, False, "OBS update of surviving weights (= update: summed)"),
        "update": _f(str, "auto", "OBS update of surviving weights", choices="update"),
        "shots": _f(int, 0, "curvature fits per pruning step (0 = auto)", low=0, cap=MAX_SHOTS),
        "structure": _f(str, "unstructured", "single weights or whole units", choices="structure"),
    },
    "schedule": {
        "final": _f(NUM, 0.9, "final sparsity of target weights", low=0, high=1, high_open=True),
        "steps": _f(int, 10, "pruning steps", low=1, cap=MAX_STEPS),
        "kind": _f(str, "exp", "sparsity schedule", choices="schedule"),
    },
    "finetune": {
        "optimizer": _f(str, "sgd", "fine-tuning optimizer", choices="optimizer"),
        "lr_schedule": _f(str, "constant", "rate within each phase", choices="lr_schedule"),
        "distill_weight": _f(NUM, 0.0, "weight of distillation to dense outputs", low=0, high=1),
        "lr": _f(
            (*NUM, str), "auto", "learning rate; auto = probe a few rates at the first fine-tune",
            low=0, low_open=True, words=("auto",),
        ),  # fmt: skip
        "momentum": _f(NUM, 0.9, "SGD momentum", low=0, high=1, high_open=True),
        "weight_decay": _f(NUM, 5e-4, "weight decay", low=0),
        "batch_size": _f(int, 100, "batch size", low=1, cap=MAX_EXAMPLES),
        "epochs_per_step": _f(
            NUM, 1.0, "fine-tuning epochs after each step", low=0, cap=MAX_EPOCHS
        ),
        "final_epochs": _f(NUM, 2.0, "epochs of the final fine-tune", low=0, cap=MAX_EPOCHS),
        "recalibrate_bn": _f(
            (bool, type(None)), None, "re-estimate BatchNorm statistics after each step"
        ),
    },
    "analysis": {
        "ntk": _f((bool, type(None)), None, "log NTK alignment (null = when cheap)"),
        "ntk_every": _f(str, "none", "fine-tuning iterations to log at (none, xM, N)"),
    },
    "export": {
        "enabled": _f(bool, False, "export model.onnx into the run directory"),
        "storage": _f(str, "packed", "ONNX storage mode", choices="storage"),
        "quantize": _f(
            OPT_STR, None, "null, int8, int8-dynamic/-static, int8-weights", choices="quantize"
        ),
        "max_accuracy_drop": _f(
            (*NUM, type(None)), None, "int8: max accuracy drop vs fp32 graph, points (null 1.0)",
            low=0,
        ),  # fmt: skip
    },
    "checks": {
        "min_sparsity": _f(
            (*NUM, type(None)), None, "minimum global sparsity over targets", low=0, high=1
        ),
        "max_accuracy_drop": _f((*NUM, type(None)), None, "max accuracy drop vs dense, points"),
        "max_loss_increase": _f((*NUM, type(None)), None, "max validation loss increase"),
        "min_cosine": _f(
            (*NUM, type(None)), None, "min cosine similarity to the dense outputs (distill)",
            low=-1, high=1,
        ),
        "max_export_bytes": _f((int, type(None)), None, "max ONNX file size, bytes", low=1),
        "max_export_ratio": _f(
            (*NUM, type(None)), None, "max ONNX bytes / dense fp32 bytes", low=0, low_open=True
        ),
        "export_parity": _f((bool, type(None)), None, "the export's parity check must pass"),
        "max_latency_ratio": _f(
            (*NUM, type(None)), None, "max ORT latency vs dense ORT", low=0, low_open=True
        ),
    },
}


def _type_names(types: tuple[type, ...]) -> str:
    names = {
        int: "integer",
        float: "number",
        str: "string",
        bool: "true/false",
        list: "list",
        type(None): "null",
    }
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _expected(spec: Field) -> str:
    """What a key accepts, in words: its types, and for ``words`` those strings instead."""
    if not spec.words:
        return _type_names(spec.types)
    kinds = _type_names(tuple(t for t in spec.types if t is not str))
    return f"{kinds} or {' or '.join(repr(w) for w in spec.words)}"


def _check_type(path: str, value, spec: Field, where: str) -> None:
    if spec.words and isinstance(value, str) and value in spec.words:
        return
    ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if ok and spec.words and isinstance(value, str):
        ok = False  # a string other than the words
    if not ok:
        raise RecipeError(f"{where}: {path} = {value!r} must be {_expected(spec)} ({spec.help})")
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{where}: {path} must be a list of strings (glob patterns)")
    _check_range(path, value, spec, where)


def _num(bound: float) -> str:
    return f"{bound:,}" if isinstance(bound, int) else f"{bound:g}"


def _check_range(path: str, value, spec: Field, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if spec.cap is not None and value > spec.cap:
        raise RecipeError(
            f"{where}: {path} = {value!r} is too large; it must be <= {_num(spec.cap)}"
        )
    too_low = spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low)
    too_high = spec.high is not None and (
        value >= spec.high if spec.high_open else value > spec.high
    )
    if too_low or too_high:
        if spec.low is not None and spec.high is not None:
            bounds = (
                f"in {'(' if spec.low_open else '['}{_num(spec.low)}, {_num(spec.high)}"
                f"{')' if spec.high_open else ']'}"
            )
        elif spec.low is not None:
            bounds = f"{'>' if spec.low_open else '>='} {_num(spec.low)}"
        else:
            bounds = f"{'<' if spec.high_open else '<='} {_num(spec.high)}"
        raise RecipeError(f"{where}: {path} = {value!r} is impossible; it must be {bounds}")


def _check_choices(recipe: dict, lines: dict, choices: dict, source: str) -> None:
    """Names that must come from a registry (criterion, fisher, schedule, ...)."""
    for section, fields in SCHEMA.items():
        if not isinstance(fields, dict):
            continue
        for key, spec in fields.items():
            value = recipe[section][key]
            valid = choices.get(spec.choices) if spec.choices else None
            if valid is not None and value is not None and value not in valid:
                where = f"{source}:{lines.get(f'{section}.{key}', '?')}"
                raise RecipeError(
                    f"{where}: {section}.{key} = {value!r} is not valid; valid: "
                    f"{', '.join(sorted(valid))}"
                )


def _lines(node, prefix: str = "") -> dict[str, int]:
    """Dotted key path -> 1-based line number, from a composed YAML mapping node."""
    out = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}{key_node.value}"
            out[path] = key_node.start_mark.line + 1
            out.update(_lines(value_node, path + "."))
    return out


def _validate_tree(tree: dict, lines: dict[str, int], source: str) -> dict:
    """Check keys and types against SCHEMA; return the tree with every default filled in."""
    resolved: dict = {}
    for key, value in tree.items():
        where = f"{source}:{lines.get(key, '?')}"
        if key not in SCHEMA:
            raise RecipeError(f"{where}: unknown key {key!r}; known keys: {', '.join(SCHEMA)}")
        spec = SCHEMA[key]
        if isinstance(spec, Field):
            _check_type(key, value, spec, where)
            continue
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: {key} must be a mapping of {', '.join(spec)}")
        for sub, sub_value in value.items():
            sub_where = f"{source}:{lines.get(f'{key}.{sub}', '?')}"
            if sub not in spec:
                raise RecipeError(
                    f"{sub_where}: unknown key {key}.{sub}; known keys of {key}: {', '.join(spec)}"
                )
            _check_type(f"{key}.{sub}", sub_value, spec[sub], sub_where)
    for key, spec in SCHEMA.items():
        given = tree.get(key, {} if isinstance(spec, dict) else spec.default)
        if isinstance(spec, dict):
            resolved[key] = {sub: given.get(sub, f.default) for sub, f in spec.items()}
        else:
            resolved[key] = given
    return resolved


def load_recipe(path: Path | str, overrides: list[str] = (), choices: dict | None = None) -> dict:
    """Read, apply ``--set key.sub=value`` overrides, and validate a recipe file.

    Returns the fully resolved recipe (every key present, defaults filled in), with
    ``model.checkpoint`` made absolute relative to the recipe's folder. choices: registry
    name -> valid names (criterion, fisher, labels, scope, schedule, optimizer, storage,
    quantize), checked with the key's line; the pipeline passes its registries.
    """
    path = Path(path)
    text = _read_recipe_text(path)
    try:
        _check_yaml_size(text)
        node = yaml.compose(text, Loader=_Loader)
        tree = _load_yaml(text)
    except yaml.YAMLError as exc:
        msg = " ".join(str(exc).split())
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {msg}") from exc
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a mapping of sections")
    lines = _lines(node)
    for item in overrides:
        _apply_override(tree, item)
    recipe = _validate_tree(tree, lines, str(path))
    if choices:
        _check_choices(recipe, lines, choices, str(path))
    checkpoint = recipe["model"]["checkpoint"]
    if checkpoint and not Path(checkpoint).is_absolute():
        recipe["model"]["checkpoint"] = str((path.parent / checkpoint).resolve())
    _check_model_section(recipe, str(path))
    check_export_needed(recipe, str(path))
    return recipe


def _read_recipe_text(path: Path) -> str:
    """The recipe's text: an existing file of at most MAX_RECIPE_BYTES, valid UTF-8."""
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist or is not a file")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"recipe {str(path)!r} is {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}"
        )
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"recipe {str(path)!r} is not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x})"
        ) from exc


def _check_yaml_size(text: str) -> None:
    """Refuse deep nesting and many aliases from the event stream, before anything expands.

    Composing or walking a document whose aliases nest ("billion laughs") costs memory and
    time exponential in its few hundred bytes; its events are linear in the text.
    """
    depth = aliases = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nesting deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name)")


def _apply_override(tree: dict, item: str) -> None:
    key, eq, raw = item.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        raise RecipeError(f"--set {item!r} must look like section.key=value")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    spec = SCHEMA.get(parts[0])
    if spec is None or (isinstance(spec, dict) and (len(parts) != 2 or parts[1] not in spec)):
        known = [
            k if isinstance(v, Field) else f"{k}.{s}"
            for k, v in SCHEMA.items()
            for s in ([None] if isinstance(v, Field) else v)
        ]
        raise RecipeError(f"--set {key!r}: unknown key; known keys: {', '.join(known)}")
    if isinstance(spec, Field):
        _check_type(key, value, spec, "--set")
        tree[parts[0]] = value
        return
    _check_type(key, value, spec[parts[1]], "--set")
    section = tree.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise RecipeError(f"--set {key!r}: section {parts[0]!r} is not a mapping")
    section[parts[1]] = value


def _check_model_section(recipe: dict, source: str) -> None:
    model = recipe["model"]
    if bool(model["example"]) == bool(model["checkpoint"]):
        raise RecipeError(
            f"{source}: model needs exactly one of model.example (a zoo example to train) or "
            "model.checkpoint (a file, with model.arch for a state_dict)"
        )


def recipe_hash(recipe: dict) -> str:
    """sha256 of the resolved recipe's canonical JSON (what resume compares)."""
    blob = json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved recipes."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


EXPORT_CHECKS = ("max_export_bytes", "max_export_ratio", "export_parity", "max_latency_ratio")


def check_export_needed(recipe: dict, source: str = "recipe") -> None:
    """Export gates need ``export.enabled: true``; RecipeError naming the gate otherwise."""
    needing = [k for k in EXPORT_CHECKS if recipe["checks"][k] is not None]
    if needing and not recipe["export"]["enabled"]:
        raise RecipeError(
            f"{source}: checks {needing} need export.enabled: true (they measure the ONNX file)"
        )


def _latency_ratio(receipt: dict) -> float:
    if "latency_ratio_batch64" in receipt.get("units", {}):  # vs the unshrunk dense model
        return receipt["units"]["latency_ratio_batch64"]
    lat = receipt["latency"]
    mode = lat.get(f"onnxruntime_{receipt['storage']}", lat["onnxruntime_dense"])
    return mode["batch64"]["p50_ms"] / lat["onnxruntime_dense"]["batch64"]["p50_ms"]


def _measured(name: str, report: dict, receipt: dict | None):
    metrics = report["metrics"]
    if name == "min_sparsity":
        return report["sparsity"]["global"]
    if name == "max_accuracy_drop":
        dense, tuned = metrics["dense"]["accuracy"], metrics["finetuned"]["accuracy"]
        return None if dense is None else 100.0 * (dense - tuned)
    if name == "max_loss_increase":
        return metrics["finetuned"]["loss"] - metrics["dense"]["loss"]
    if name == "min_cosine":
        return metrics["finetuned"].get("cosine")
    if receipt is None:
        return None
    if name == "max_export_bytes":
        return receipt["bytes"]["file"]
    if name == "max_export_ratio":
        return receipt["bytes"]["ratio"]
    if name == "export_parity":
        v = receipt["verification"]
        return v["max_abs_diff"] <= v["tolerance"]
    return _latency_ratio(receipt)


def evaluate_checks(checks: dict, report: dict, receipt: dict | None = None) -> list[dict]:
    """Each configured gate as {check, limit, value, passed}; unset gates are skipped.

    min_sparsity and min_cosine pass when value >= limit; export_parity when the parity
    check held (if required); every max_* gate when value <= limit. A value that cannot be
    measured fails.
    """
    rows = []
    for name, limit in checks.items():
        if limit is None or (name == "export_parity" and limit is False):
            continue
        value = _measured(name, report, receipt)
        if value is None:
            passed = False
        elif name == "min_sparsity":  # exact to one weight, as the pruner rounds
            params = report["params"]
            passed = params["zeros"] >= round(limit * params["prunable"])
        elif name == "export_parity":
            passed = bool(value)
        elif name == "min_cosine":
            passed = value >= limit
        else:
            passed = value <= limit
        rows.append({"check": name, "limit": limit, "value": value, "passed": passed})
    return rows
