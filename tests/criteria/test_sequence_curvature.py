"""Curvature of Linear layers applied to padded sequences (N, T, D): float64 oracles.

The model embeds token ids, applies Linear layers per token (one on (N, T, D), one on
(N, T, 2, D/2)), mixes tokens attention-free (a mean over the sequence) and pools before a
Linear head. Padded positions carry non-zero activations (their ids are real tokens), so a
curvature estimate that forgot the position mask would differ. ``leak=True`` averages over
padding too (a model that does not mask its pooling): the library then drops padded
positions' rows of every sequence Linear, whose exact meaning is the oracle below with
that layer's outputs at padded positions detached.

Oracles use torch.func only: per-example parameter gradients (vmap(jacrev) over examples,
each example evaluated alone with its own padding), per-position output gradients from
zero deltas added to each Linear's output, layer inputs from a recorded forward.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from prunekit.criteria import fit_diag, fit_ekfac, fit_kfac, squared_gradient_sums
from prunekit.prune.targets import find_targets
from prunekit.types import ClassificationTask, LabelKey, RegressionTask

VOCAB, DIM, CLASSES, T = 7, 4, 3, 5
SEQ_LAYERS = ("proj", "mix")  # Linear layers applied to sequences (padding applies)
LAYERS = (*SEQ_LAYERS, "head")  # the factored ones
CLOSE = {"rtol": 1e-10, "atol": 1e-13}


class SeqNet(nn.Module):
    """embed -> tanh(proj) per token -> + mean context -> tanh(mix) per half-token -> pool
    -> head. ``leak``: context and pooling average padded positions too; ``twice``: proj
    runs twice (a module called several times: its positions are all calls' positions)."""

    def __init__(self, outputs=CLASSES, leak=False, twice=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.leak, self.twice = leak, twice
        self.embed = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.mix = nn.Linear(DIM // 2, DIM // 2, bias=False)
        self.head = nn.Linear(DIM, outputs)
        self.double()

    def _mean(self, h: Tensor, m: Tensor) -> Tensor:
        if self.leak:
            return h.mean(1)
        return (h * m).sum(1) / m.sum(1)

    def forward(self, input_ids, attention_mask, deltas=None, detach=(), record=None):
        """deltas: name -> tensor added to that layer's output (oracle output gradients);
        detach: layers whose outputs at padded positions are detached; record: a dict that
        receives every layer's input."""
        keep = attention_mask.bool()
        m = attention_mask.to(torch.float64)[..., None]

        def lin(name: str, x: Tensor) -> Tensor:
            if record is not None:
                record[name] = x
            y = getattr(self, name)(x)
            if name in detach:  # this layer's padded outputs pass no gradient
                real = keep.reshape(*keep.shape, *([1] * (y.dim() - 2)))
                y = torch.where(real, y, y.detach())
            return y if deltas is None or name not in deltas else y + deltas[name]

        h = torch.tanh(lin("proj", lin("embed", input_ids)))  # (N, T, D)
        if self.twice:
            h = torch.tanh(lin("proj", h))
        ctx = self._mean(h, m)[:, None]
        z = torch.tanh(lin("mix", (h + ctx).unflatten(-1, (2, DIM // 2))).flatten(2))
        return lin("head", self._mean(z, m))


class SeqClassification(ClassificationTask):
    """Dict inputs passed as keyword arguments; position mask from ``attention_mask``."""

    def forward(self, model, batch):
        return model(**batch[0])


class SeqRegression(RegressionTask):
    def forward(self, model, batch):
        return model(**batch[0])


class NoMask(SeqClassification):
    """The same task with the position mask forgotten (so the tests can fail)."""

    def position_mask(self, batch):
        return None


def make_batch(n: int = 4, regression: bool = False, seed: int = 1):
    """Padded token batch: lengths 5, 3, 1, 4 (one left-padded); padding holds real ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    lengths = [5, 3, 1, 4, 2, 5][:n]
    mask = torch.zeros(n, T, dtype=torch.long)
    for i, k in enumerate(lengths):
        if i == 1:
            mask[i, T - k :] = 1  # left padding: the mask, not a prefix, decides
        else:
            mask[i, :k] = 1
    if regression:
        y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, CLASSES, (n,), generator=g)
    return {"input_ids": ids, "attention_mask": mask}, y


def _terms(task, out: Tensor, y, labels: str) -> Tensor:
    """Per-example label terms of one example's outputs (1, C): squared grads sum to F."""
    if labels == "exact":
        logp = torch.log_softmax(out[0], -1)
        return -logp * logp.detach().exp().sqrt()
    return task.nll(out, y[None]).reshape(1)


def _labels_for(task, model, batch, labels: str, seed: int):
    """The labels the library uses: data labels, or the draws keyed by a fresh generator's
    seed (``LabelKey.of``), example i from its own stream."""
    if labels != "sampled":
        return batch[1]
    with torch.no_grad():
        outputs = task.forward(model, batch)
    key = LabelKey.of(torch.Generator().manual_seed(seed))
    return task.sample_examples(outputs, key.draws(0, outputs.shape[0]))


def per_example(model, task, batch, labels: str, detach=(), seed: int = 0):
    """(param grads name -> (N, terms, *shape), output grads name -> (N, terms, *out))."""
    inputs, _ = batch
    y = _labels_for(task, model, batch, labels, seed)
    params = {k: p.detach() for k, p in model.named_parameters()}
    record: dict[str, Tensor] = {}
    with torch.no_grad():
        functional_call(model, params, (), {**inputs, "record": record})
        outs = {k: model.get_submodule(k)(record[k]) for k in LAYERS}
    deltas = {k: torch.zeros_like(o[0]) for k, o in outs.items()}

    def terms(p, d, ids, mask, yi):
        kw = {"deltas": {k: v[None] for k, v in d.items()}, "detach": detach}
        out = functional_call(model, p, (ids[None], mask[None]), kw)
        return _terms(task, out, yi, labels)

    jac = vmap(jacrev(terms, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0))
    return jac(params, deltas, inputs["input_ids"], inputs["attention_mask"], y)


def layer_inputs(model, batch) -> dict[str, Tensor]:
    record: dict[str, Tensor] = {}
    with torch.no_grad():
        model(**batch[0], record=record)
    return record


def real_positions(name: str, x: Tensor, mask: Tensor) -> Tensor:
    """(N, L) 0/1: which of a layer's positions are real tokens (all for the head)."""
    if name not in SEQ_LAYERS:
        return torch.ones(x.shape[0], 1, dtype=torch.float64)
    inner = x.shape[2:-1].numel()
    return mask.to(torch.float64).repeat_interleave(inner, dim=1)


def factor_oracle(model, task, batch, labels: str, name: str, seed: int = 0):
    """(A, G) of ``name`` from definitions: A = (1/N) sum_n sum_{t real} a a^T (ones column
    last); G = (1/N) sum_n (1/T_n) sum_terms sum_{t real} g g^T, T_n = real positions."""
    x = layer_inputs(model, batch)[name]
    n = x.shape[0]
    a = x.reshape(n, -1, x.shape[-1])
    if model.get_submodule(name).bias is not None:
        a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)
    w = real_positions(name, x, batch[0]["attention_mask"])
    _, dgrads = per_example(model, task, batch, labels, seed=seed)
    g = dgrads[name]
    g = g.reshape(n, g.shape[1], -1, g.shape[-1])  # (N, terms, L, o)
    big_a = torch.einsum("nl,nli,nlj->ij", w, a, a) / n
    big_g = torch.einsum("nl,nslo,nslp->op", w / w.sum(1, keepdim=True), g, g) / n
    return big_a, big_g


def layer_grads(model, task, batch, labels: str, seed: int = 0) -> dict[str, Tensor]:
    """Per-example, per-term gradients of every parameter; for each layer applied to the
    sequence (embedding included), with that layer's own padded outputs detached: what the
    library's masked statistics mean, also for leaky models."""
    out = {}
    for name in (*SEQ_LAYERS, "embed"):
        grads, _ = per_example(model, task, batch, labels, detach=(name,), seed=seed)
        out.update({k: v for k, v in grads.items() if k.startswith(name + ".")})
    grads, _ = per_example(model, task, batch, labels, seed=seed)
    return {**grads, **out}


def block(model, grads: dict[str, Tensor], name: str) -> Tensor:
    """[W | b] per example and term: (N, terms, o, i')."""
    w = grads[f"{name}.weight"]
    if model.get_submodule(name).bias is None:
        return w
    return torch.cat([w, grads[f"{name}.bias"][..., None]], -1)


TASKS = {"classification": SeqClassification(), "regression": SeqRegression()}


def _setup(kind: str, leak: bool):
    model = SeqNet(outputs=2 if kind == "regression" else CLASSES, leak=leak)
    return model, TASKS[kind], make_batch(regression=kind == "regression")


CASES = [
    ("classification", "exact", False),
    ("classification", "exact", True),
    ("classification", "sampled", False),
    ("classification", "empirical", True),
    ("regression", "sampled", True),
    ("regression", "empirical", False),
]


@pytest.mark.parametrize(("kind", "labels", "leak"), CASES)
def test_kfac_factors_sum_real_positions_only(kind, labels, leak):
    model, task, batch = _setup(kind, leak)
    targets = find_targets(model)
    gen = torch.Generator().manual_seed(0)
    kfac = fit_kfac(model, task, targets, [batch], labels=labels, generator=gen)
    for name in LAYERS:
        a, g = factor_oracle(model, task, batch, labels, name)
        torch.testing.assert_close(kfac.A[f"{name}.weight"][0], a, **CLOSE)
        torch.testing.assert_close(kfac.G[f"{name}.weight"][0], g, **CLOSE)
    if kind == "classification":  # the mask matters: padded activations are non-zero
        gen = torch.Generator().manual_seed(0)
        plain = fit_kfac(model, NoMask(), targets, [batch], labels=labels, generator=gen)
        for name in SEQ_LAYERS:
            assert not torch.allclose(plain.A[f"{name}.weight"], kfac.A[f"{name}.weight"])
        torch.testing.assert_close(plain.A["head.weight"], kfac.A["head.weight"], **CLOSE)


@pytest.mark.parametrize(("kind", "labels", "leak"), CASES)
def test_ekfac_scaling_projects_masked_per_example_gradients(kind, labels, leak):
    model, task, batch = _setup(kind, leak)
    gen = torch.Generator().manual_seed(0)
    ekfac = fit_ekfac(model, task, find_targets(model), [batch], labels=labels, generator=gen)
    grads = layer_grads(model, task, batch, labels)
    diag = ekfac.diagonal()
    for name in LAYERS:
        t = f"{name}.weight"
        u_g, u_a = ekfac.basis.u_g[t][0], ekfac.basis.u_a[t][0]
        v = block(model, grads, name)  # (N, terms, o, i')
        scaling = (u_g.T @ v @ u_a).pow(2).sum(1).mean(0)
        torch.testing.assert_close(ekfac.scaling[t][0], scaling, **CLOSE)
        want = u_g.pow(2) @ scaling @ u_a.pow(2).T
        torch.testing.assert_close(diag[t], want[:, : grads[t].shape[-1]], **CLOSE)
        a, g = factor_oracle(model, task, batch, labels, name)  # the basis is the masked one
        lam_a, lam_g = ekfac.basis.lambda_a[t][0], ekfac.basis.lambda_g[t][0]
        torch.testing.assert_close(u_a.T @ a @ u_a, torch.diag(lam_a), **CLOSE)
        torch.testing.assert_close(u_g.T @ g @ u_g, torch.diag(lam_g), **CLOSE)
    if kind == "classification" and leak:
        gen = torch.Generator().manual_seed(0)
        plain = fit_ekfac(model, NoMask(), find_targets(model), [batch], labels=labels,
                          generator=gen)  # fmt: skip
        for name in SEQ_LAYERS:
            t = f"{name}.weight"
            assert not torch.allclose(plain.scaling[t], ekfac.scaling[t])


@pytest.mark.parametrize(("kind", "labels", "leak"), CASES)
def test_diag_fisher_is_the_mean_squared_masked_gradient(kind, labels, leak):
    model, task, batch = _setup(kind, leak)
    targets = find_targets(model, embeddings=True)
    gen = torch.Generator().manual_seed(0)
    diag = fit_diag(model, task, targets, [batch], labels=labels, generator=gen)
    grads = layer_grads(model, task, batch, labels)
    assert set(diag.values) == set(targets)
    for t in targets:
        torch.testing.assert_close(diag.values[t], grads[t].pow(2).sum(1).mean(0), **CLOSE)
    if leak:  # padding reaches the outputs: forgetting the mask changes the diagonal
        gen = torch.Generator().manual_seed(0)
        no_mask = SeqClassification if kind == "classification" else SeqRegression
        plain_task = type("Plain", (no_mask,), {"position_mask": lambda self, b: None})()
        plain = fit_diag(model, plain_task, targets, [batch], labels=labels, generator=gen)
        for name in SEQ_LAYERS:
            assert not torch.allclose(plain.values[f"{name}.weight"], diag.values[f"{name}.weight"])


@pytest.mark.parametrize("leak", [False, True])
def test_diag_of_a_linear_called_twice_sums_both_calls_real_positions(leak):
    model, task, batch = SeqNet(leak=leak, twice=True), SeqClassification(), make_batch()
    targets = find_targets(model)
    diag = fit_diag(model, task, targets, [batch], labels="empirical")
    grads = layer_grads(model, task, batch, "empirical")
    for t in targets:
        torch.testing.assert_close(diag.values[t], grads[t].pow(2).sum(1).mean(0), **CLOSE)


def test_oracle_masked_gradients_are_the_true_ones_when_the_model_masks():
    # Sanity of the oracle: without leaks, padded outputs get zero gradient anyway.
    model, task, batch = _setup("classification", leak=False)
    plain, _ = per_example(model, task, batch, "exact")
    masked = layer_grads(model, task, batch, "exact")
    for k in plain:
        torch.testing.assert_close(masked[k], plain[k], **CLOSE)


def _single_examples(batch, trim: bool):
    """Batches of one example each; ``trim`` cuts each to its own real tokens."""
    inputs, y = batch
    out = []
    for i in range(y.shape[0]):
        ids, mask = inputs["input_ids"][i : i + 1], inputs["attention_mask"][i : i + 1]
        if trim:
            keep = mask[0].bool()
            ids, mask = ids[:, keep], mask[:, keep]
        out.append(({"input_ids": ids, "attention_mask": mask}, y[i : i + 1]))
    return out


@pytest.mark.parametrize("trim", [False, True])
@pytest.mark.parametrize("estimator", ["diag", "kfac", "ekfac"])
def test_a_batch_of_n_equals_n_batches_of_one(estimator, trim):
    model, task, batch = _setup("classification", leak=False)
    targets = find_targets(model, embeddings=True)
    fit = {"diag": fit_diag, "kfac": fit_kfac, "ekfac": fit_ekfac}[estimator]
    whole = fit(model, task, targets, [batch], labels="exact").diagonal()
    single = fit(model, task, targets, _single_examples(batch, trim), labels="exact").diagonal()
    for t in targets:
        torch.testing.assert_close(single[t], whole[t], **CLOSE)


def test_embedding_targets_use_the_diag_estimator_and_norms_are_never_targets():
    model = SeqNet()
    model.norm = nn.LayerNorm(DIM).double()  # unused in forward; must never be a target
    targets = find_targets(model, embeddings=True)
    assert targets["embed.weight"].kind == "embedding"
    assert not any(n.startswith("norm") or n.endswith("bias") for n in targets)
    task, batch = SeqClassification(), make_batch()
    for fit in (fit_kfac, fit_ekfac):
        curv = fit(model, task, targets, [batch], labels="exact")
        assert curv.estimators()["embed.weight"] == "diag"
        assert curv.estimators()["proj.weight"] in ("kfac", "ekfac")
        grads, _ = per_example(model, task, batch, "exact")
        want = grads["embed.weight"].pow(2).sum(1).mean(0)
        torch.testing.assert_close(curv.diagonal()["embed.weight"], want, **CLOSE)


def test_embedding_hook_path_equals_the_per_example_path(monkeypatch):
    # The hooked Embedding rows (grouped per example and token) against torch.func.
    import prunekit.criteria.fisher as fisher

    model, task, batch = _setup("classification", leak=False)
    targets = {"embed.weight": find_targets(model, embeddings=True)["embed.weight"]}
    model.embed.padding_idx = 0  # autograd gives the padding row no gradient
    hooked, _ = squared_gradient_sums(model, task, targets, [batch], "exact")
    monkeypatch.setattr(fisher, "embedding_hookable", lambda m: False)
    looped, _ = squared_gradient_sums(model, task, targets, [batch], "exact")
    torch.testing.assert_close(hooked["embed.weight"], looped["embed.weight"], **CLOSE)
    assert hooked["embed.weight"][0].abs().max() == 0
    assert hooked["embed.weight"][1:].abs().max() > 0


@pytest.mark.parametrize("cache_bytes", [0, 10**9])
def test_ekfac_second_pass_route_masks_like_the_row_cache(cache_bytes):
    # cache_bytes=0: S comes from fit_scaling's own pass (not the RowCache of the factor pass)
    model, task, batch = _setup("classification", leak=True)
    targets = find_targets(model)
    keep = {"proj.weight": torch.rand(DIM, DIM, generator=torch.Generator().manual_seed(3)) > 0.3}
    fits = [
        fit_ekfac(model, task, targets, [batch], labels="exact", masks=keep, cache_bytes=c)
        for c in (cache_bytes, 10**9)
    ]
    for t in LAYERS:
        torch.testing.assert_close(fits[0].scaling[f"{t}.weight"], fits[1].scaling[f"{t}.weight"])


class Flattened(SeqNet):
    """proj runs on (N*T, D): its first dimension is not the batch."""

    def forward(self, input_ids, attention_mask):
        m = attention_mask.to(torch.float64)[..., None]
        e = self.embed(input_ids)
        h = torch.tanh(self.proj(e.flatten(0, 1))).unflatten(0, e.shape[:2])
        return self.head((h * m).sum(1) / m.sum(1))


def test_a_linear_fed_tokens_as_rows_takes_the_exact_per_example_path():
    model, task, batch = Flattened(), SeqClassification(), make_batch()
    targets = {k: v for k, v in find_targets(model).items() if k != "mix.weight"}
    diag = fit_diag(model, task, targets, [batch], labels="exact")
    params = {k: p.detach() for k, p in model.named_parameters()}

    def terms(p, ids, mask):
        return _terms(task, functional_call(model, p, (ids[None], mask[None])), None, "exact")

    inputs = batch[0]
    grads = vmap(jacrev(terms), in_dims=(None, 0, 0))(
        params, inputs["input_ids"], inputs["attention_mask"]
    )
    for t in targets:
        torch.testing.assert_close(diag.values[t], grads[t].pow(2).sum(1).mean(0), **CLOSE)


class Tied(SeqNet):
    """The head's weight is the embedding's (vocabulary-sized outputs, tied weights)."""

    def __init__(self):
        super().__init__(outputs=VOCAB)
        self.head.weight = self.embed.weight


def test_a_tied_weight_gets_the_gradient_of_all_its_uses():
    model, task, batch = Tied(), SeqClassification(), make_batch()
    batch = (batch[0], batch[1] % VOCAB)
    targets = find_targets(model, embeddings=True)
    assert "embed.weight" in targets and "head.weight" not in targets
    diag = fit_diag(model, task, targets, [batch], labels="empirical")
    grads, _ = per_example(model, task, batch, "empirical")
    want = grads["embed.weight"].pow(2).sum(1).mean(0)
    torch.testing.assert_close(diag.values["embed.weight"], want, **CLOSE)


class FunctionalProjection(nn.Module):
    """Reads ``proj.weight`` itself (as nn.MultiheadAttention does with out_proj): the
    Linear module ``proj`` never runs, so its hooks never fire."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, CLASSES)
        self.double()

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(nn.functional.linear(self.embed(input_ids), self.proj.weight))
        m = attention_mask.to(h.dtype)[..., None]
        return self.head((h * m).sum(1) / m.sum(1))


def test_a_factored_module_that_never_runs_is_refused_not_zeroed():
    from prunekit.errors import ModelError

    model, task, batch = FunctionalProjection(), SeqClassification(), make_batch()
    targets = find_targets(model)
    assert targets["proj.weight"].kind == "linear"
    with pytest.raises(ModelError, match=r"proj.*--fisher diag"):
        fit_kfac(model, task, targets, [batch], labels="exact")
    diag = fit_diag(model, task, targets, [batch], labels="exact")  # exact path: non-zero
    assert diag.values["proj.weight"].abs().max() > 0
