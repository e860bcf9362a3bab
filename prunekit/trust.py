"""What prunekit will execute: the trust policy for specs that name code.

A spec such as ``mymodels:encoder`` names a module that prunekit imports and a callable it
calls. Typed by the user (``--arch``, ``--data``, ``--task``, ``--set``, or a Python API
argument) it is trusted as typed. Read from a file (safetensors metadata, a recipe, resume
state) it is data: it is used only when it names prunekit's own registries, unless the user
allows code from files with ``--trust-code``. A file can therefore never make prunekit run
code that the person at the keyboard did not name or allow.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from prunekit.errors import CheckpointError

#: Factories of prunekit.models a file may name (``prunekit.models:NAME?k=v``).
BUILTIN_ARCH_FACTORIES = ("cnn", "encoder", "lstm", "mlp")
#: Data specs (before ``?``) a file may name; a path ending in .npz is data, not code.
BUILTIN_DATA = ("digits", "mnist5k", "synthetic")

_CODE_FROM_FILES: ContextVar[bool] = ContextVar("prunekit_trust_code", default=False)


class TrustError(CheckpointError):
    """A file names code outside prunekit and code from files is not allowed (exit 2)."""


@contextmanager
def trusting_code(allowed: bool = True) -> Iterator[None]:
    """Within the block, specs read from files may name any module (``--trust-code``)."""
    token = _CODE_FROM_FILES.set(bool(allowed))
    try:
        yield
    finally:
        _CODE_FROM_FILES.reset(token)


def code_from_files_allowed() -> bool:
    """True inside ``trusting_code()``: the user passed --trust-code."""
    return _CODE_FROM_FILES.get()


def is_builtin_arch(spec: str) -> bool:
    """True when ``spec`` is ``prunekit.models:<factory>[?...]`` with a zoo factory."""
    base = spec.partition("?")[0]
    module, _, factory = base.partition(":")
    return module.strip() == "prunekit.models" and factory.strip() in BUILTIN_ARCH_FACTORIES


def is_builtin_data(spec: str) -> bool:
    """True for bundled/synthetic data and .npz paths (arrays, never unpickled)."""
    base = spec.partition("?")[0].strip()
    return base in BUILTIN_DATA or (base.endswith(".npz") and ":" not in base)


_FLAGS = {"arch": "--arch", "data": "--data", "task": "--task"}


def check_file_spec(kind: str, spec: str, source: str) -> None:
    """Refuse a spec that a file names when it would run code from outside prunekit.

    kind: 'arch', 'data' or 'task'; source: where the spec was read, for the message
    (e.g. "metadata of 'm.safetensors'"). Passes silently for built-in specs or inside
    ``trusting_code()``; raises TrustError otherwise, before anything is imported.
    """
    builtin = {"arch": is_builtin_arch, "data": is_builtin_data}.get(kind, lambda _s: False)
    if builtin(spec) or code_from_files_allowed():
        return
    flag = _FLAGS.get(kind, "--" + kind)
    raise TrustError(
        f"{source} names {kind} {spec!r}, code outside prunekit that a file cannot make "
        f"prunekit run; if you trust it pass it yourself ({flag} {spec!r}) or allow code "
        "named by files with --trust-code"
    )


def check_recipe_trust(recipe: dict, overrides=(), source: str = "recipe") -> None:
    """Refuse code that a recipe file names (model.arch, data, task.spec, or the arch in its
    checkpoint's metadata) unless it is prunekit's own or code from files is allowed.

    Values set with ``--set`` were typed by the user and are trusted as typed. Reads only
    the checkpoint's safetensors header; imports nothing.
    """
    typed = {item.partition("=")[0].strip() for item in overrides}
    specs = [
        ("data", recipe["data"], "data"),
        ("arch", recipe["model"]["arch"], "model.arch"),
        ("task", recipe["task"]["spec"], "task.spec"),
    ]
    for kind, spec, key in specs:
        if spec and key not in typed:
            check_file_spec(kind, spec, f"{source} ({key})")
    checkpoint = recipe["model"]["checkpoint"]
    if checkpoint and not recipe["model"]["arch"]:
        arch = _metadata_arch(Path(checkpoint))
        if arch:
            check_file_spec("arch", arch, f"the metadata of {checkpoint!r} ({source})")


def _metadata_arch(path: Path) -> str | None:
    """The arch spec in a safetensors file's header, or None (other formats, unreadable)."""
    from safetensors import SafetensorError, safe_open

    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("prunekit.arch")
    except (SafetensorError, OSError, ValueError):
        return None  # the loader reports the unreadable file in its own words
