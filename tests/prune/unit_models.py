"""Tiny models for the unit-group tests (tracing and shrinking), float64, eval mode."""

from __future__ import annotations

import torch
from torch import nn

from prunekit.models import cnn, encoder, lstm, mlp


class ResBlock(nn.Module):
    """Two convs + BatchNorm with an identity skip from the INPUT: the internal channels
    (c1/b1) may go, the block's output channels (c2/b2, added to x) may not."""

    def __init__(self, channels: int = 3, inner: int = 4, classes: int = 2):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(channels, inner, 3, padding=1), nn.BatchNorm2d(inner)
        self.c2, self.b2 = nn.Conv2d(inner, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(h)) + x)
        return self.fc(x.mean((2, 3)))


class StemResBlock(ResBlock):
    """The same block behind a conv stem: the skip now carries the stem's channels, so the
    stem and c2 share their output channels as ONE group (removable together)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x):
        return super().forward(torch.relu(self.stem(x)))


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine entries (fresh ones are 0/1)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def build(name: str):
    """(model float64 eval, example inputs) of the test model ``name``."""
    torch.manual_seed(0)
    if name == "mlp":
        model, x = mlp("6,5,4,3"), torch.randn(4, 6)
    elif name == "cnn":
        model, x = cnn(image_size=8, channels="3,4", hidden=5, bn=1), torch.randn(4, 1, 8, 8)
    elif name == "res":
        model, x = ResBlock(), torch.randn(4, 3, 6, 6)
    elif name == "stem":
        model, x = StemResBlock(), torch.randn(4, 1, 6, 6)
    elif name in ("lstm", "gru"):
        model, x = lstm(hidden=5, layers=2, cell=name), torch.randn(4, 8, 8)
    elif name == "encoder":
        model = encoder(vocab=20, dim=8, heads=2, ffn=6, layers=2, classes=3, max_len=8)
        x = model.example_inputs(batch=3, seq=6, generator=torch.Generator().manual_seed(0))
    else:
        raise KeyError(name)
    model = _randomise_bn(model).double().eval()
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        x = x.double()
    return model, x


def run(model: nn.Module, x):
    return model(**x) if isinstance(x, dict) else model(x)


MODELS = ("mlp", "cnn", "res", "stem", "lstm", "gru", "encoder")
