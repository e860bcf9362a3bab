"""The one place that registers hooks: record module inputs/outputs during a forward pass.

Everything here is a context manager that restores the model exactly on exit (hooks
removed, ``.training`` and ``requires_grad`` restored) even when the body raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class Recorder:
    """What one forward pass saw at each watched module.

    inputs[name]: list (one entry per call) of the module's first positional input,
    detached. outputs[name]: list of its outputs, still attached to the autograd graph,
    so that ``output_grads`` can differentiate a scalar with respect to them.
    """

    inputs: dict[str, list[Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)
    active: bool = True

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hooks record nothing inside this block (e.g. while other code runs the model)."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def clear(self) -> None:
        """Forget what the last forward recorded (call before the next forward)."""
        for store in (self.inputs, self.outputs):
            for calls in store.values():
                calls.clear()

    def single_call(self, name: str) -> bool:
        """True when module ``name`` ran exactly once in the recorded forward."""
        return len(self.outputs.get(name, ())) == 1

    def output_grads(self, scalar: Tensor, names: Iterable[str]) -> dict[str, list[Tensor]]:
        """d scalar / d output of each call of each named module (graph retained).

        Uses ``torch.autograd.grad``, so no ``.grad`` attribute is touched. An output that
        does not influence ``scalar`` gets a zero gradient.
        """
        keys = [(n, i) for n in names for i in range(len(self.outputs[n]))]
        out: dict[str, list[Tensor]] = {n: [] for n in names}
        if not keys:  # autograd.grad rejects an empty input list
            return out
        tensors = [self.outputs[n][i] for n, i in keys]
        grads = torch.autograd.grad(scalar, tensors, retain_graph=True, allow_unused=True)
        for (n, _), t, g in zip(keys, tensors, grads, strict=True):
            out[n].append(torch.zeros_like(t) if g is None else g)
        return out


@contextmanager
def capture(model: nn.Module, module_names: Iterable[str]) -> Iterator[Recorder]:
    """Record inputs and graph-attached outputs of the named modules of ``model``.

    Hooks are registered on entry and removed in ``finally``. Outputs that are not
    tensors are skipped (the module then has no entry for that call).
    """
    modules = dict(model.named_modules())
    rec = Recorder()
    handles = []

    def make_hook(name: str):
        def hook(_module, args, output):
            if rec.active and isinstance(output, Tensor) and args and isinstance(args[0], Tensor):
                # Copies: a later in-place op (ReLU(inplace=True), x += ...) would otherwise
                # rebase the recorded tensors, and the gradient would be taken after it.
                rec.inputs[name].append(args[0].detach().clone())
                rec.outputs[name].append(output)
                return output.clone()
            return None

        return hook

    try:
        for name in module_names:
            rec.inputs[name], rec.outputs[name] = [], []
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        yield rec
    finally:
        for h in handles:
            h.remove()
        rec.clear()


@contextmanager
def scoring_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode with every parameter requiring grad; both restored on exit.

    Curvature and gradients are read through ``torch.autograd.grad`` inside this block,
    so parameters' ``.grad`` stay untouched.
    """
    was_training = {m: m.training for m in model.modules()}
    requires = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in requires:
            p.requires_grad_(True)
        yield model
    finally:
        for m, flag in was_training.items():
            m.training = flag
        for p, flag in requires.items():
            p.requires_grad_(flag)
