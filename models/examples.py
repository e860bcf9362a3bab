"""Example recipes for `prunekit example NAME`: which model to train on which bundled data.

Pure data: the pipeline builds the model from ``arch`` and trains it on ``data``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """A trainable example: arch spec, data spec and training budget.

    epochs: passes over the training split; lr: SGD learning rate (momentum 0.9).
    """

    arch: str
    data: str
    epochs: int
    lr: float
    description: str


EXAMPLES: dict[str, Example] = {
    "mlp-mnist": Example(
        "prunekit.models:mlp?sizes=784,300,100,10&act=tanh",
        "mnist5k",
        15,
        0.1,
        "the paper's 784-300-100-10 tanh MLP on 5,000 real MNIST digits",
    ),
    "mlp-digits": Example(
        "prunekit.models:mlp?sizes=64,128,64,10&act=tanh",
        "digits",
        40,
        0.05,
        "a 64-128-64-10 tanh MLP on scikit-learn's 8x8 digits (seconds)",
    ),
    "cnn-digits": Example(
        "prunekit.models:cnn?in_channels=1&image_size=8&channels=16,32&hidden=64&classes=10",
        "digits",
        30,
        0.05,
        "a two-stage CNN on scikit-learn's 8x8 digits",
    ),
    "cnn-mnist": Example(
        "prunekit.models:cnn?in_channels=1&image_size=28&channels=16,32&hidden=64&classes=10",
        "mnist5k",
        10,
        0.02,
        "a two-stage CNN on 5,000 real MNIST digits",
    ),
    "lstm-digits": Example(
        "prunekit.models:lstm?input_size=8&hidden=64&classes=10&cell=lstm&rows=8",
        "digits",
        30,
        0.5,
        "an LSTM reading scikit-learn's 8x8 digits row by row (8 steps of 8 pixels)",
    ),
    "bnlstm-digits": Example(
        "prunekit.models:lstm?input_size=8&hidden=64&classes=10&cell=bnlstm&rows=8",
        "digits",
        20,
        0.5,
        "a BN-LSTM (Cooijmans et al.) reading 8x8 digits row by row (8 steps of 8 pixels)",
    ),
    "lstm-mnist": Example(
        "prunekit.models:lstm?input_size=28&hidden=100&classes=10&cell=lstm&rows=28",
        "mnist5k",
        10,
        0.5,
        "an LSTM reading 5,000 real MNIST digits row by row (28 steps of 28 pixels)",
    ),
    "bnlstm-mnist": Example(
        "prunekit.models:lstm?input_size=28&hidden=100&classes=10&cell=bnlstm&rows=28",
        "mnist5k",
        10,
        0.5,
        "a BN-LSTM reading 5,000 real MNIST digits row by row (28 steps of 28 pixels)",
    ),
    "encoder-tokens": Example(
        "prunekit.models:encoder?vocab=64&dim=64&heads=4&layers=2&ffn=128&max_len=32&classes=4",
        "synthetic?task=tokens&n=2000&seq=24&vocab=64&classes=4",
        20,
        0.05,
        "a 2-block transformer encoder classifying padded synthetic token sequences",
    ),
}
