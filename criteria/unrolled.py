"""Pure-tensor twins of nn.LSTM/GRU/RNN, so that torch.func can vmap per-example gradients.

The fused recurrent kernels have no vmap batching rule on CPU (mkldnn's LSTM falls back to
a per-example loop, GRU/RNN and the native LSTM path raise on in-place ops). ``UnrolledRNN``
computes the same function step by step with plain matmuls and registers the SAME
parameter names (``weight_ih_l0``, ``bias_hh_l1_reverse``, ``weight_hr_l0`` ...), so a
``functional_call`` with the original model's parameter dict works on the twin unchanged.
Eval-mode semantics only (no inter-layer dropout); PackedSequence inputs are refused.
``PlainCell`` does the same for one step of nn.LSTMCell/GRUCell/RNNCell (whose fused
kernels raise under vmap too): same parameter names (``weight_ih``, ``bias_hh`` ...).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def _cell(mode: str, gi: Tensor, h: Tensor, c: Tensor | None, w_hh, b_hh, w_hr):
    """One step; gi = x_t W_ih^T + b_ih (N, G). Returns (h_t, c_t) (c_t None unless LSTM)."""
    gh = h @ w_hh.T
    if b_hh is not None:
        gh = gh + b_hh
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h @ w_hr.T if w_hr is not None else h), c
    if mode == "GRU":
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None
    act = torch.tanh if mode == "RNN_TANH" else torch.relu
    return act(gi + gh), None


class UnrolledRNN(nn.Module):
    """Step-by-step equivalent of a given nn.LSTM/GRU/RNN (shares its Parameter objects).

    Same call signature and outputs as the original: forward(input, hx=None) -> (output,
    h_n) or (output, (h_n, c_n)); batch_first, bidirectional, num_layers, bias and LSTM
    proj_size are honoured; unbatched (2-D) inputs too.
    """

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        self.mode, self.layers = rnn.mode, rnn.num_layers
        self.dirs = 2 if rnn.bidirectional else 1
        self.batch_first, self.has_bias = rnn.batch_first, rnn.bias
        self.hidden = rnn.hidden_size
        self.out_size = getattr(rnn, "proj_size", 0) or rnn.hidden_size
        for name, p in rnn.named_parameters(recurse=False):
            self.register_parameter(name, p)

    def _weights(self, layer: int, d: int) -> tuple:
        sfx = f"_l{layer}" + ("_reverse" if d else "")
        get = lambda k: getattr(self, k + sfx, None)  # noqa: E731
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")

    def _direction(self, x: Tensor, h: Tensor, c: Tensor | None, layer: int, d: int):
        w_ih, w_hh, b_ih, b_hh, w_hr = self._weights(layer, d)
        seq = x.flip(1) if d else x
        gi = seq @ w_ih.T  # all steps at once: the input projection does not recur
        if b_ih is not None:
            gi = gi + b_ih
        outs = []
        for t in range(seq.shape[1]):
            h, c = _cell(self.mode, gi[:, t], h, c, w_hh, b_hh, w_hr)
            outs.append(h)
        out = torch.stack(outs, dim=1)
        return (out.flip(1) if d else out), h, c

    def _initial(self, x: Tensor, hx) -> tuple[Tensor, Tensor | None]:
        n, lead = x.shape[0], self.layers * self.dirs
        if self.mode == "LSTM":
            if hx is None:
                return x.new_zeros(lead, n, self.out_size), x.new_zeros(lead, n, self.hidden)
            return hx
        return (x.new_zeros(lead, n, self.out_size) if hx is None else hx), None

    def forward(self, x: Tensor, hx=None):
        if not isinstance(x, Tensor):
            raise TypeError("UnrolledRNN takes padded tensors only, not PackedSequence")
        batched = x.dim() == 3
        if not batched:  # nn.RNN's unbatched form: (T, F) and states without a batch dim
            x = x.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = tuple(s.unsqueeze(1) for s in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        if not self.batch_first:
            x = x.transpose(0, 1)
        h0, c0 = self._initial(x, hx)
        h_n, c_n = [], []
        for layer in range(self.layers):
            outs = []
            for d in range(self.dirs):
                k = layer * self.dirs + d
                out, h, c = self._direction(x, h0[k], None if c0 is None else c0[k], layer, d)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = torch.cat(outs, dim=-1)
        out = x if self.batch_first else x.transpose(0, 1)
        h_n = torch.stack(h_n)
        state = (h_n, torch.stack(c_n)) if self.mode == "LSTM" else h_n
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            state = (
                tuple(s.squeeze(1) for s in state) if isinstance(state, tuple) else state.squeeze(1)
            )
        return out, state


def _cell_mode(cell: nn.RNNCellBase) -> str:
    if isinstance(cell, nn.LSTMCell):
        return "LSTM"
    if isinstance(cell, nn.GRUCell):
        return "GRU"
    return "RNN_RELU" if getattr(cell, "nonlinearity", "tanh") == "relu" else "RNN_TANH"


class PlainCell(nn.Module):
    """One step of a given nn.LSTMCell/GRUCell/RNNCell in plain tensor ops (shares its
    Parameter objects). forward(input, hx=None) -> h, or (h, c) for an LSTM cell; unbatched
    (1-D) inputs too, as the original."""

    def __init__(self, cell: nn.RNNCellBase):
        super().__init__()
        self.mode, self.hidden = _cell_mode(cell), cell.hidden_size
        for name, p in cell.named_parameters(recurse=False):
            self.register_parameter(name, p)

    def forward(self, x: Tensor, hx=None):
        batched = x.dim() == 2
        x = x if batched else x.unsqueeze(0)
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden)
            hx = (zeros, zeros) if self.mode == "LSTM" else zeros
        elif not batched:
            hx = tuple(s.unsqueeze(0) for s in hx) if isinstance(hx, tuple) else hx.unsqueeze(0)
        h, c = hx if self.mode == "LSTM" else (hx, None)
        gi = x @ self.weight_ih.T
        if getattr(self, "bias_ih", None) is not None:
            gi = gi + self.bias_ih
        h, c = _cell(self.mode, gi, h, c, self.weight_hh, getattr(self, "bias_hh", None), None)
        out = (h, c) if self.mode == "LSTM" else h
        if not batched:
            out = tuple(s.squeeze(0) for s in out) if isinstance(out, tuple) else out.squeeze(0)
        return out


def _twin_of(module: nn.Module) -> nn.Module | None:
    if isinstance(module, nn.RNNBase):
        return UnrolledRNN(module)
    if isinstance(module, nn.RNNCellBase):
        return PlainCell(module)
    return None


def functional_twin(model: nn.Module) -> nn.Module:
    """``model`` itself if it has no nn.RNNBase or nn.RNNCellBase; else a copy with each
    one replaced by its plain twin (``UnrolledRNN``, ``PlainCell``).

    The copy has the same parameter and buffer names (for ``functional_call``) and carries
    no hooks; the original model is not modified.
    """
    if not any(isinstance(m, (nn.RNNBase, nn.RNNCellBase)) for m in model.modules()):
        return model
    twin = copy.deepcopy(model)
    for m in twin.modules():
        m._forward_hooks.clear()  # the copy must not record into the caller's hooks
        m._forward_pre_hooks.clear()
    for name, module in list(twin.named_modules()):
        plain = _twin_of(module)
        if plain is not None:
            if not name:  # the model is itself an RNN or a cell
                return plain
            parent_name, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent_name), child, plain)
    return twin
