"""Finding unit groups: which parameters a removable unit owns, proven from the model's graph.

``find_unit_groups(model, example_inputs)`` returns the ``UnitGroup``s of structured
pruning (prune/groups.py); ``trace_units`` also returns the units it left out and why.

Safety rule: a unit is offered only if every place that reads it is a consumer whose input
columns are group members ('in'), so the pruned (zeroed or shrunk) network equals the
original with that unit's value zeroed where its consumers read it. Anything else that reads
a candidate unit either excludes it with a recorded reason (a model output, a residual
addition with channels that cannot be removed, a norm across channels) or, when the pattern
is not understood (an unknown op or module, a reshape that mixes channels, data-dependent
indexing, a shared module), is refused with one SettingError line naming the layer.

How: prunekit's TokenEncoder (heads, FFN units) and SequenceClassifier over nn.LSTM/GRU
(hidden units) have module-aware rules, keyed by their class; any other model is traced
with torch.fx, its shapes propagated on ``example_inputs`` (eval mode, no grad, no side
effects), and every tensor's channel axis followed as segments of candidate units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from prunekit.errors import SettingError
from prunekit.prune.groups import Member, UnitGroup
from prunekit.prune.trace_fx import ELEMENTWISE_MODULES, OUTPUT, fx_groups


@dataclass(frozen=True)
class UnitTrace:
    """What tracing found: ``groups`` (prunable), ``excluded`` (producing layer -> why its
    units are never removed, e.g. 'output units of the model')."""

    groups: tuple[UnitGroup, ...]
    excluded: dict[str, str] = field(default_factory=dict)


def find_unit_groups(model: nn.Module, example_inputs, targets=None) -> list[UnitGroup]:
    """The unit groups of ``model`` that may be removed (see ``trace_units``)."""
    return list(trace_units(model, example_inputs, targets).groups)


def trace_units(model: nn.Module, example_inputs, targets=None) -> UnitTrace:
    """Unit groups of ``model`` proven removable, and the layers left out with the reason.

    example_inputs: one batch as the model takes it (a tensor, a tuple of positional
    tensors, or a dict of keyword tensors); only its shapes matter (fx path). targets: None
    (every Linear/Conv/recurrent layer may lose units) or the pruning targets (a mapping or
    iterable of parameter names): a group is kept only if each of its producing weights is
    one. Group names are the producing module paths ('+'-joined when a residual addition
    ties several producers); kinds 'neuron' (Linear), 'channel' (Conv), 'hidden'
    (LSTM/GRU), 'head', 'ffn' (encoder). SettingError, one line naming the layer, for a
    pattern that cannot be proven safe. The model is left as it was (modes, buffers).
    """
    rule = _MODULE_RULES.get(_class_name(model))
    if rule is not None:
        groups, excluded = rule(model)
    else:
        groups, excluded = fx_groups(model, example_inputs)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if targets is not None:
        names, kept = set(targets), []
        for g in groups:
            # the producing weights (matrices/kernels; norms and biases are never targets)
            producers = {m.param for m in g.members if m.role == "out" and len(shapes[m.param]) > 1}
            if producers <= names:
                kept.append(g)
            else:
                excluded[g.name] = "its producing weight is not a pruning target"
        groups = kept
    for g in groups:
        g.check(shapes)
    return UnitTrace(tuple(groups), excluded)


def _class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


# ---------------------------------------------------------------- module-aware rules


def _recurrent_groups(model: nn.Module) -> tuple[list[UnitGroup], dict[str, str]]:
    """SequenceClassifier: rnn (nn.LSTM/nn.GRU) -> head on the last step's hidden state.

    One group per layer: gate rows of weight_ih/weight_hh/biases (blocks of 4 or 3 gates,
    stride H), weight_hh's columns (the unit read back at the next step) and the next
    layer's weight_ih columns, or the head's columns. A removed unit's gates are all zero,
    so its cell and hidden state stay exactly 0 from the zero initial state.
    """
    rnn, head = model.rnn, model.head
    if type(rnn) not in (nn.LSTM, nn.GRU):
        raise SettingError(
            f"layer 'rnn' ({type(rnn).__name__}): structured pruning of hidden units supports "
            "nn.LSTM and nn.GRU (arch cell=lstm or cell=gru), not this cell"
        )
    if rnn.bidirectional or getattr(rnn, "proj_size", 0) or not rnn.batch_first:
        raise SettingError(
            "layer 'rnn': hidden units of a bidirectional, projected or time-first "
            "LSTM/GRU are not supported by structured pruning"
        )
    if type(head) is not nn.Linear:
        raise SettingError(f"layer 'head' ({type(head).__name__}) must be an nn.Linear")
    gates, hidden = (4 if type(rnn) is nn.LSTM else 3), rnn.hidden_size
    groups = []
    for layer in range(rnn.num_layers):
        rows = dict(dim=0, blocks=gates, stride=hidden)
        members = [Member(f"rnn.weight_ih_l{layer}", **rows),
                   Member(f"rnn.weight_hh_l{layer}", **rows),
                   Member(f"rnn.weight_hh_l{layer}", dim=1, role="in")]  # fmt: skip
        if rnn.bias:
            members += [Member(f"rnn.bias_ih_l{layer}", **rows),
                        Member(f"rnn.bias_hh_l{layer}", **rows)]  # fmt: skip
        last = layer == rnn.num_layers - 1
        reader = "head.weight" if last else f"rnn.weight_ih_l{layer + 1}"
        members.append(Member(reader, dim=1, role="in"))
        groups.append(UnitGroup(f"rnn.l{layer}", "hidden", hidden, tuple(members)))
    return groups, {"head": OUTPUT}


def _encoder_groups(model: nn.Module) -> tuple[list[UnitGroup], dict[str, str]]:
    """TokenEncoder: per block, attention heads (q/k/v rows and biases in blocks of
    head_dim, o's columns) and FFN hidden units (fc1 row and bias, fc2 column). The
    residual stream (width dim, read by LayerNorms) and the head's logits stay."""
    groups, excluded = [], {"residual stream": "read by LayerNorm across channels"}
    for i, block in enumerate(model.blocks):
        attn, ffn, where = block.attn, block.ffn, f"blocks.{i}"
        if _class_name(attn) != "prunekit.models.encoder.SelfAttention":
            raise SettingError(f"layer '{where}.attn' ({type(attn).__name__}) is not prunekit's "
                               "SelfAttention; its heads cannot be proven removable")  # fmt: skip
        head_dim = attn.q.out_features // attn.heads
        rows = dict(dim=0, width=head_dim)
        members = [
            Member(f"{where}.attn.{proj}.{p}", **rows)
            for proj in "qkv"
            for p in ("weight", "bias")
            if p == "weight" or getattr(attn, proj).bias is not None
        ]
        members.append(Member(f"{where}.attn.o.weight", dim=1, role="in", width=head_dim))
        groups.append(UnitGroup(f"{where}.attn:heads", "head", attn.heads, tuple(members)))
        kinds = [type(m) for m in ffn]
        if (
            len(kinds) != 4
            or kinds[0] is not nn.Linear
            or kinds[3] is not nn.Linear
            or not all(issubclass(k, ELEMENTWISE_MODULES) for k in kinds[1:3])
        ):
            raise SettingError(f"layer '{where}.ffn' is not Linear -> activation -> dropout -> "
                               "Linear; its hidden units cannot be proven removable")  # fmt: skip
        names = [n for n, _ in ffn.named_children()]
        fc1, fc2 = f"{where}.ffn.{names[0]}", f"{where}.ffn.{names[3]}"
        members = [Member(f"{fc1}.weight", 0)]
        if ffn[0].bias is not None:
            members.append(Member(f"{fc1}.bias", 0))
        members.append(Member(f"{fc2}.weight", 1, role="in"))
        groups.append(UnitGroup(fc1, "ffn", ffn[0].out_features, tuple(members)))
    if model.head is not None:
        excluded["head"] = OUTPUT
    return groups, excluded


_MODULE_RULES = {
    "prunekit.models.recurrent.SequenceClassifier": _recurrent_groups,
    "prunekit.models.encoder.TokenEncoder": _encoder_groups,
}
