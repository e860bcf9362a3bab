"""Recurrent classifiers: plain LSTM/GRU, BN-LSTM (Cooijmans et al.) and BN-RNN (Laurent et al.).

Conventions: sequences are batch-first (N, T, F). Image inputs (N, 1, H, W) are read row by
row (T = H steps of F = W features), so the bundled ``digits`` (8 steps of 8 pixels) and
``mnist5k`` (28 steps of 28) feed these models unchanged. Gate order everywhere is nn.LSTM's
(i, f, g, o). The recurrent matrices of the custom cells are named ``weight_ih`` (4H, F) and
``weight_hh`` (4H, H) and opted in as pruning targets of kind 'recurrent' through
``prunable_parameters()`` and ``is_recurrent`` (see prune/targets.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from prunekit.errors import SettingError, choice_error

CELLS = ("lstm", "gru", "bnlstm", "bnrnn")


class SeqBatchNorm(nn.Module):
    """Batch normalisation with statistics PER TIME STEP and affine parameters shared over time.

    features: width F of the normalised input (N, F); max_steps: T_max, the number of steps
    with their own population statistics (steps t >= T_max reuse step T_max - 1 at
    inference); gamma: initial scale (0.1 as in Cooijmans et al.: unit variance saturates
    tanh); shift: learn a β (initialised to 0) or not. momentum None = cumulative average
    (used by BN recalibration), as in nn.BatchNorm.

    Training: the minibatch mean/variance of step t normalise step t, and update the running
    statistics of step t (steps beyond T_max update nothing). Eval: running statistics of
    min(t, T_max - 1). Buffers: running_mean/running_var (T_max, F), num_batches_tracked (T_max,).
    """

    def __init__(
        self,
        features: int,
        max_steps: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        gamma: float = 0.1,
        shift: bool = True,
    ):
        super().__init__()
        if max_steps < 1:
            raise SettingError(f"max_steps {max_steps!r} must be >= 1 (the longest sequence)")
        self.features, self.max_steps, self.eps, self.momentum = features, max_steps, eps, momentum
        self.weight = nn.Parameter(torch.full((features,), float(gamma)))
        self.bias = nn.Parameter(torch.zeros(features)) if shift else None
        self.register_buffer("running_mean", torch.zeros(max_steps, features))
        self.register_buffer("running_var", torch.ones(max_steps, features))
        self.register_buffer("num_batches_tracked", torch.zeros(max_steps, dtype=torch.long))

    def reset_running_stats(self) -> None:
        """Population statistics back to mean 0, variance 1, no batches seen (every step)."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    @torch.no_grad()
    def _update(self, t: int, mean: Tensor, var: Tensor, n: int) -> None:
        self.num_batches_tracked[t] += 1
        if self.momentum is None:  # cumulative average over the batches seen at this step
            factor = 1.0 / float(self.num_batches_tracked[t])
        else:
            factor = float(self.momentum)
        unbiased = var * (n / (n - 1)) if n > 1 else var  # nn.BatchNorm's convention
        self.running_mean[t].lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var[t].lerp_(unbiased.to(self.running_var.dtype), factor)

    def forward(self, x: Tensor, t: int) -> Tensor:
        """Normalise x (N, F), the activations of time step ``t`` (0-based)."""
        if self.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            if t < self.max_steps:
                self._update(t, mean.detach(), var.detach(), x.shape[0])
        else:
            step = min(t, self.max_steps - 1)  # clamp: stationary regime beyond T_max
            mean, var = self.running_mean[step], self.running_var[step]
        y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.features}, max_steps={self.max_steps}, eps={self.eps}"


def _lstm_update(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """(σ(o~), new cell c_t) from gates (N, 4H) in order i, f, g, o and c_{t-1} (N, H)."""
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o), c


def _init_lstm_weights(weight_ih: Tensor, weight_hh: Tensor, bias: Tensor | None) -> None:
    """Orthogonal blocks per gate (well-conditioned through time), forget-gate bias 1."""
    with torch.no_grad():
        for w in (weight_ih, weight_hh):
            for block in w.chunk(4, dim=0):
                nn.init.orthogonal_(block)
        if bias is not None:
            bias.zero_()
            bias.chunk(4)[1].fill_(1.0)  # remember by default early in training


class BNLSTMCell(nn.Module):
    """One BN-LSTM step (Cooijmans et al. 2016, methods.md section 4.1)::

        [i~, f~, g~, o~] = BN_h(W_hh h_{t-1}; γ_h) + BN_x(W_ih x_t; γ_x) + b
        c_t = σ(f~) ∘ c_{t-1} + σ(i~) ∘ tanh(g~)
        h_t = σ(o~) ∘ tanh(BN_c(c_t; γ_c, β_c))

    BN_h and BN_x have no β (the single bias b carries it); all γ start at ``gamma``; every
    BN keeps statistics per time step up to ``max_steps`` (see SeqBatchNorm). The cell
    update itself is not normalised. Parameters: weight_ih (4H, F), weight_hh (4H, H),
    bias (4H,) — the two matrices are pruning targets of kind 'recurrent'.
    """

    is_recurrent = True

    def __init__(self, input_size: int, hidden_size: int, max_steps: int, gamma: float = 0.1):
        super().__init__()
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        h4 = 4 * self.hidden_size
        self.weight_ih = nn.Parameter(torch.empty(h4, self.input_size))
        self.weight_hh = nn.Parameter(torch.empty(h4, self.hidden_size))
        self.bias = nn.Parameter(torch.zeros(h4))
        self.bn_ih = SeqBatchNorm(h4, max_steps, gamma=gamma, shift=False)
        self.bn_hh = SeqBatchNorm(h4, max_steps, gamma=gamma, shift=False)
        self.bn_c = SeqBatchNorm(self.hidden_size, max_steps, gamma=gamma, shift=True)
        _init_lstm_weights(self.weight_ih, self.weight_hh, self.bias)

    def prunable_parameters(self) -> tuple[str, ...]:
        """Local names of the pruning targets: the input and recurrent matrices."""
        return ("weight_ih", "weight_hh")

    def step(self, xw: Tensor, h: Tensor, c: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """One step from the projected input xw = x_t W_ih^T (N, 4H); returns (h_t, c_t)."""
        gates = self.bn_hh(h @ self.weight_hh.T, t) + self.bn_ih(xw, t) + self.bias
        out_gate, c = _lstm_update(gates, c)
        return out_gate * torch.tanh(self.bn_c(c, t)), c

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor], t: int) -> tuple[Tensor, Tensor]:
        """x_t (N, F), (h_{t-1}, c_{t-1}) each (N, H), step index t -> (h_t, c_t)."""
        return self.step(x @ self.weight_ih.T, state[0], state[1], t)


class BNLSTM(nn.Module):
    """A BN-LSTM layer over batch-first sequences, unrolled in Python (one cell step per t).

    forward(x (N, T, F), state=None) -> (outputs (N, T, H), (h_T, c_T) each (N, H)); the
    initial state is zeros. max_steps: T_max for the per-step population statistics.
    """

    def __init__(self, input_size: int, hidden_size: int, max_steps: int, gamma: float = 0.1):
        super().__init__()
        self.cell = BNLSTMCell(input_size, hidden_size, max_steps, gamma)
        self.hidden_size = int(hidden_size)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None):
        # The input projection is the same matrix at every step: one GEMM for all of them.
        xw = x @ self.cell.weight_ih.T
        if state is None:
            # zeros_like keeps the batch size symbolic in traced (ONNX) graphs
            h = torch.zeros_like(xw[:, 0, : self.hidden_size])
            c = torch.zeros_like(h)
        else:
            h, c = state
        outs = []
        for t in range(x.shape[1]):
            h, c = self.cell.step(xw[:, t], h, c, t)
            outs.append(h)
        return torch.stack(outs, dim=1), (h, c)


class BNRNN(nn.Module):
    """Sequence-wise batch-normalised LSTM layer (Laurent et al. 2016, methods.md section 5)::

        u = BN(W_ih x)  over all (batch, time) frames        (nn.BatchNorm1d over (N, 4H, T))
        [i~, f~, g~, o~] = u_t + W_hh h_{t-1}
        c_t = σ(f~) ∘ c_{t-1} + σ(i~) ∘ tanh(g~) ;  h_t = σ(o~) ∘ tanh(c_t)

    Only the input-to-hidden term is normalised; BN's β is the bias (no separate b; the
    forget part of β starts at 1). forward(x (N, T, F)) -> (outputs (N, T, H), (h_T, c_T)).
    """

    is_recurrent = True

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = int(hidden_size)
        h4 = 4 * self.hidden_size
        self.weight_ih = nn.Parameter(torch.empty(h4, int(input_size)))
        self.weight_hh = nn.Parameter(torch.empty(h4, self.hidden_size))
        self.norm = nn.BatchNorm1d(h4)
        _init_lstm_weights(self.weight_ih, self.weight_hh, self.norm.bias)

    def prunable_parameters(self) -> tuple[str, ...]:
        """Local names of the pruning targets: the input and recurrent matrices."""
        return ("weight_ih", "weight_hh")

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None):
        # BatchNorm1d on (N, C, L) pools statistics over batch AND time: sequence-wise BN.
        u = self.norm((x @ self.weight_ih.T).transpose(1, 2)).transpose(1, 2)
        if state is None:
            h = torch.zeros_like(u[:, 0, : self.hidden_size])
            c = torch.zeros_like(h)
        else:
            h, c = state
        outs = []
        for t in range(x.shape[1]):
            out_gate, c = _lstm_update(u[:, t] + h @ self.weight_hh.T, c)
            h = out_gate * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, dim=1), (h, c)


class SequenceClassifier(nn.Module):
    """Recurrent layer, then a Linear head on the last step's hidden state.

    Inputs (N, T, F), or images (N, 1, H, W) read row by row as (N, H, W). Outputs (N, C)
    logits. ``rnn`` returns (outputs (N, T, H), state), as batch-first nn.LSTM/GRU do.
    """

    def __init__(self, rnn: nn.Module, hidden: int, classes: int):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(int(hidden), int(classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() > 3:  # (N, 1, H, W) -> (N, H, W): rows are time steps
            x = x.flatten(1, -2)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def lstm(
    input_size: int = 8,
    hidden: int = 64,
    classes: int = 10,
    cell: str = "lstm",
    rows: int = 8,
    layers: int = 1,
    gamma: float = 0.1,
) -> SequenceClassifier:
    """Sequence classifier factory (arch spec ``prunekit.models:lstm?...``).

    input_size: features per step (image width); hidden: H; classes: C; cell: one of
    CELLS ('lstm'/'gru': nn.LSTM/nn.GRU, batch_first, exportable as ONNX LSTM/GRU ops;
    'bnlstm': BNLSTM; 'bnrnn': sequence-wise BNRNN); rows: T_max, the longest training
    sequence (image height), for BN-LSTM's per-step statistics; layers: stacked layers
    (nn.LSTM/GRU only); gamma: initial BN scale of the BN-LSTM.
    """
    if cell not in CELLS:
        raise choice_error("recurrent cell", cell, CELLS)
    sizes = {"input_size": input_size, "hidden": hidden, "classes": classes, "rows": rows}
    for key, value in {**sizes, "layers": layers}.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SettingError(f"{key} {value!r} must be a positive integer")
    if layers != 1 and cell in ("bnlstm", "bnrnn"):
        raise SettingError(f"layers {layers} > 1 works with cell lstm or gru, not {cell!r}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise SettingError(f"gamma {gamma!r} must be a positive number (the paper uses 0.1)")
    if cell == "lstm":
        rnn: nn.Module = nn.LSTM(input_size, hidden, num_layers=layers, batch_first=True)
    elif cell == "gru":
        rnn = nn.GRU(input_size, hidden, num_layers=layers, batch_first=True)
    elif cell == "bnlstm":
        rnn = BNLSTM(input_size, hidden, max_steps=rows, gamma=float(gamma))
    else:
        rnn = BNRNN(input_size, hidden)
    return SequenceClassifier(rnn, hidden, classes)
