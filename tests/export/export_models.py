"""Tiny models and masks shared by the export tests (imported by name: no conftest imports)."""

from __future__ import annotations

import torch
from torch import nn


class LSTMClassifier(nn.Module):
    """nn.LSTM over (N, T, F) sequences, classified from the last step."""

    def __init__(self, features: int = 6, hidden: int = 16, classes: int = 3):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def random_masks(model: nn.Module, sparsity: float, seed: int = 0) -> dict:
    """Bool masks (True = keep) over every weight matrix/kernel, ~``sparsity`` pruned."""
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=gen) >= sparsity
        for n, p in model.named_parameters()
        if "weight" in n and p.dim() >= 2
    }


def make_mlp(sizes=(20, 32, 16, 4), act=nn.Tanh) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def make_cnn() -> nn.Sequential:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5),
    )  # fmt: skip
    with torch.no_grad():  # non-trivial running statistics so folding is really tested
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.2, 0.2)
    return net.eval()


MODELS = {
    "mlp": (lambda: make_mlp(), (20,)),
    "cnn": (make_cnn, (1, 6, 6)),
    "lstm": (lambda: LSTMClassifier(), (5, 6)),
}
