"""Small models that recipes and examples use: MLP and CNN classifiers."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from prunekit.errors import SettingError, choice_error

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


def _ints(value: int | str | Sequence[int], what: str) -> list[int]:
    if isinstance(value, int):
        return [value]
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = [int(v) for v in items]
    except (TypeError, ValueError) as exc:
        raise SettingError(f"{what} {value!r} must be integers like 784,300,100,10") from exc
    if not out or any(v < 1 for v in out):
        raise SettingError(f"{what} {value!r} must be positive integers")
    return out


def _activation(act: str) -> type[nn.Module]:
    if act not in ACTIVATIONS:
        raise choice_error("activation", act, ACTIVATIONS)
    return ACTIVATIONS[act]


def mlp(sizes: str | Sequence[int] = "784,300,100,10", act: str = "tanh") -> nn.Sequential:
    """Fully connected classifier: Flatten, then Linear layers of ``sizes`` with ``act`` between.

    sizes: input, hidden..., output widths (at least two). Inputs of any shape
    (N, ...) whose trailing dims multiply to sizes[0]; outputs (N, sizes[-1]) logits.
    """
    widths = _ints(sizes, "sizes")
    if len(widths) < 2:
        raise SettingError(f"sizes {sizes!r} need at least an input and an output width")
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2:
            layers.append(_activation(act)())
    return nn.Sequential(*layers)


def cnn(
    in_channels: int = 1,
    image_size: int = 28,
    channels: str | Sequence[int] = "16,32",
    hidden: int = 64,
    classes: int = 10,
    act: str = "relu",
    bn: bool | int = False,
) -> nn.Sequential:
    """Small conv classifier: [Conv3x3(pad 1), act, MaxPool2] per entry of ``channels``,
    then Flatten, Linear(hidden), act, Linear(classes).

    bn: true/1 puts a BatchNorm2d between each conv and its activation (Conv -> BN -> act ->
    pool; the conv then has no bias, BN's beta carries it). Inputs (N, in_channels,
    image_size, image_size); outputs (N, classes) logits.
    """
    widths = _ints(channels, "channels")
    act_cls = _activation(act)
    if bn not in (0, 1):  # also True/False; arch specs parse bn=1 as 1 and bn=true as True
        raise SettingError(f"bn {bn!r} must be 0/1 or true/false")
    layers: list[nn.Module] = []
    c_in, size = int(in_channels), int(image_size)
    for c_out in widths:
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn)
        norm = [nn.BatchNorm2d(c_out)] if bn else []
        layers += [conv, *norm, act_cls(), nn.MaxPool2d(2)]
        c_in, size = c_out, size // 2
    if size < 1:
        raise SettingError(f"image_size {image_size} is too small for {len(widths)} pooling stages")
    layers += [nn.Flatten(), nn.Linear(c_in * size * size, int(hidden)), act_cls()]
    layers.append(nn.Linear(int(hidden), int(classes)))
    return nn.Sequential(*layers)
