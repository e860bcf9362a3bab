"""NTK alignment under torch.distributed (gloo, 2 CPU processes): every rank computes the
Gram blocks K_l of its share of the tensors, the all-reduced result equals one process's
and is the same on both ranks."""

from __future__ import annotations

import math
import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import prunekit.analysis.ntk as ntk
from prunekit.analysis import ntk_alignment
from prunekit.analysis.ntk import balance_tensors, tensor_costs
from prunekit.criteria.capture import capture
from prunekit.errors import SettingError
from prunekit.models import cnn, mlp

WORLD = 2
VALUES = ("alignment", "effective_rank", "trace")


def _mlp_case() -> tuple:
    """Linear layers only (factored path); weights half pruned, one bias fully pruned (NaN)."""
    torch.manual_seed(0)
    model = mlp("6,5,4,3").double()
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=gen) > 0.5 for n, p in model.named_parameters()}
    masks["3.bias"] = torch.zeros(4, dtype=torch.bool)
    return model, x, y, {"masks": masks, "capture": capture}


def _cnn_case() -> tuple:
    """Conv + Linear weights on the per-example jacrev path (no capture), one conv masked."""
    torch.manual_seed(0)
    model = cnn(1, 6, "3,4", 8, 3).double()
    x, y = torch.randn(10, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    names = ntk.default_kernel_params(model)
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(model.get_parameter(names[1]).shape, generator=gen) > 0.3
    return model, x, y, {"params": names, "masks": {names[1]: mask}}


def _cases() -> dict:
    mlp_model, mlp_x, mlp_y, mlp_kw = _mlp_case()
    cnn_model, cnn_x, cnn_y, cnn_kw = _cnn_case()
    return {
        "mlp": (mlp_model, mlp_x, mlp_y, mlp_kw),
        "mlp_dense": (mlp_model, mlp_x, mlp_y, {"capture": capture}),
        "mlp_no_per_layer": (mlp_model, mlp_x, mlp_y, {**mlp_kw, "per_layer": False}),
        "cnn": (cnn_model, cnn_x, cnn_y, cnn_kw),
        "cnn_local": (cnn_model, cnn_x, cnn_y, {**cnn_kw, "distributed": False}),
    }


def _counting_worker(rank: int, init: str, out: str) -> None:
    """One rank: every case, plus which tensors really went through the kernel builders."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    jacrev_names, captured = [], []
    layer_kernel = ntk._layer_kernel

    def counted_layer_kernel(model, frozen, name, *args):
        jacrev_names.append(name)
        return layer_kernel(model, frozen, name, *args)

    def counted_capture(model, modules):
        captured.extend(modules)
        return capture(model, modules)

    ntk._layer_kernel = counted_layer_kernel  # this spawned process only
    results = {}
    try:
        for case, (model, x, y, kw) in _cases().items():
            jacrev_names.clear()
            captured.clear()
            if "capture" in kw:
                kw = {**kw, "capture": counted_capture}
            results[case] = ntk_alignment(model, x, y, **kw)
            results[case]["jacrev"], results[case]["captured"] = list(jacrev_names), captured[:]
        model, x, y, kw = _mlp_case()
        bad = {**kw["masks"], "5.weight": torch.ones(2, 2, dtype=torch.bool)}
        try:  # rejected on every rank before any collective: no rank is left waiting
            ntk_alignment(model, x, y, masks=bad, capture=capture)
        except SettingError as err:
            results["bad_mask"] = str(err)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, out.format(rank=rank))
    # Skip the interpreter's teardown: once jacrev has loaded torch._dynamo it takes seconds,
    # and the results are on disk already. (Errors above still reach mp.spawn normally.)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist_ntk")
    out = str(tmp / "rank{rank}.pt")
    mp.spawn(_counting_worker, args=(f"file://{tmp / 'rendezvous'}", out), nprocs=WORLD)
    return [torch.load(out.format(rank=r), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict:
    return {case: ntk_alignment(m, x, y, **kw) for case, (m, x, y, kw) in _cases().items()}


def _same(a: float | None, b: float | None, tol: float) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol * max(1.0, abs(b))


@pytest.mark.parametrize("case", ["mlp", "mlp_dense", "mlp_no_per_layer", "cnn", "cnn_local"])
def test_two_ranks_equal_one_process_and_each_other(ranks, single, case):
    one = single[case]
    for result in (r[case] for r in ranks):
        for key in VALUES:
            assert _same(result[key], one[key], 1e-10), (case, key, result[key], one[key])
        assert list(result["per_layer"]) == list(one["per_layer"])
        for name, value in one["per_layer"].items():
            assert _same(result["per_layer"][name], value, 1e-10), (case, name)
    first, second = ranks[0][case], ranks[1][case]
    for key in VALUES:  # bit-identical across ranks, not merely close
        assert _same(first[key], second[key], 0.0), (case, key)
    assert first["per_layer"].keys() == second["per_layer"].keys()
    assert all(_same(v, second["per_layer"][k], 0.0) for k, v in first["per_layer"].items())
    if case == "mlp":
        assert math.isnan(one["per_layer"]["3.bias"])  # a fully pruned tensor: undefined
        assert 0.0 < one["alignment"] < 1.0


@pytest.mark.parametrize("case", ["mlp", "mlp_dense", "cnn"])
def test_each_rank_computed_only_its_share(ranks, single, case):
    everything = single[case]["blocks_computed"]
    shares = [result[case]["blocks_computed"] for result in ranks]
    assert all(share and len(share) < len(everything) for share in shares)
    assert sorted(shares[0] + shares[1]) == sorted(everything)  # disjoint and complete
    model, x, _, kw = _cases()[case]
    n_outputs = model(x[:1]).shape[1]
    costs = tensor_costs(model, everything, n_outputs, kw.get("masks"), kw.get("capture"))
    assert shares == balance_tensors(costs, WORLD)
    for share, result in zip(shares, ranks, strict=True):
        if case == "cnn":  # what really went through jacrev on that rank
            assert result[case]["jacrev"] == share and not result[case]["captured"]
        else:  # factored path: only the rank's own Linear modules were hooked
            assert sorted(result[case]["captured"]) == sorted({n.split(".")[0] for n in share})
            assert not result[case]["jacrev"]


def test_distributed_false_computes_everything_on_every_rank(ranks, single):
    for result in ranks:
        assert result["cnn_local"]["blocks_computed"] == single["cnn_local"]["blocks_computed"]
        assert result["cnn_local"]["jacrev"] == single["cnn_local"]["blocks_computed"]


def test_one_process_computes_every_block(single):
    assert single["mlp"]["blocks_computed"] == [n for n, _ in _mlp_case()[0].named_parameters()]
    assert single["cnn"]["blocks_computed"] == _cnn_case()[3]["params"]


def test_a_bad_mask_fails_every_rank_before_the_collective(ranks):
    assert all("mask of '5.weight'" in result["bad_mask"] for result in ranks)


def test_balance_is_greedy_largest_first_and_deterministic():
    costs = {"a": 3, "b": 7, "c": 3, "d": 5, "e": 1}
    # 7 -> r0; 5 -> r1; 3 (a) -> r1 (5 < 7); 3 (c) -> r0 (7 < 8); 1 -> r1 (8 < 10)
    assert balance_tensors(costs, 2) == [["b", "c"], ["a", "d", "e"]]
    assert balance_tensors(costs, 1) == [list(costs)]
    assert balance_tensors({"a": 1, "b": 1}, 3) == [["a"], ["b"], []]


def test_costs_follow_the_path_each_tensor_takes():
    model = mlp("6,5,3").double()
    names = [n for n, _ in model.named_parameters()]
    dense = tensor_costs(model, names, 3, capture=capture)
    assert dense == {"1.weight": 9 * 5 + 6, "1.bias": 9 * 5, "3.weight": 9 * 3 + 5, "3.bias": 27}
    pruned = {"1.weight": torch.rand(5, 6) > 0.5, "3.weight": torch.ones(3, 5, dtype=torch.bool)}
    masked = tensor_costs(model, names, 3, masks=pruned, capture=capture)
    assert masked["1.weight"] == dense["1.weight"] + 30  # masked formula; all-kept mask is not
    assert masked["3.weight"] == dense["3.weight"]
    assert tensor_costs(model, names, 3)["1.weight"] == 9 * 30  # jacrev: C^2 numel
