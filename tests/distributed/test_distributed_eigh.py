"""Eigendecompositions of KFAC factors spread over ranks (gloo, CPU, 2 processes): each rank
decomposes its share, broadcasts it, and every rank ends with the one-process basis."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import prunekit.criteria.eigh as eigh_mod
from prunekit.criteria.eigh import assign_by_cost, eigh_cost
from prunekit.criteria.ekfac import eigenbasis
from prunekit.criteria.kfac import KFAC, Layer
from prunekit.models import mlp
from prunekit.prune.targets import find_targets
from prunekit.types import ClassificationTask

# (out, in, groups) of the fake layers: distinct sizes, so a size names its factor.
SHAPES = [(6, 9, 1), (4, 7, 1), (16, 5, 2), (2, 3, 1)]


def test_assign_by_cost_is_a_greedy_largest_first_balance():
    costs = {"a": 8.0, "b": 5.0, "c": 4.0, "d": 3.0, "e": 1.0}
    # a -> 0 (8); b -> 1 (5); c -> 1 (9); d -> 0 (11); e -> 1 (10)
    assert assign_by_cost(costs, 2) == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}
    assert list(assign_by_cost(costs, 2)) == list(costs)  # keeps the caller's key order
    assert set(assign_by_cost(costs, 1).values()) == {0}
    assert sorted(assign_by_cost(costs, 8).values()) == [0, 1, 2, 3, 4]  # one job per rank
    # equal costs go in key order, load ties to the lowest rank: same answer on every rank
    assert assign_by_cost({"y": 1.0, "x": 1.0, "z": 1.0}, 2) == {"y": 1, "x": 0, "z": 0}
    assert assign_by_cost({}, 3) == {}
    with pytest.raises(ValueError, match="world size"):
        assign_by_cost(costs, 0)
    with pytest.raises(ValueError, match="finite"):
        assign_by_cost({"a": float("nan")}, 2)


def test_eigh_cost_is_batch_times_n_cubed():
    assert eigh_cost(torch.zeros(3, 4, 4)) == 3 * 64
    assert eigh_cost(torch.zeros(5, 5)) == 125


def _fake_kfac() -> KFAC:
    """Random PSD factors for the layers of SHAPES (float64)."""
    g = torch.Generator().manual_seed(0)
    layers, a, gg = {}, {}, {}
    for i, (out, inp, groups) in enumerate(SHAPES):
        t = f"l{i}.weight"
        layers[t] = Layer(t, f"l{i}", None, (out, inp * groups), groups)
        for store, n in ((a, inp), (gg, out // groups)):
            m = torch.randn(groups, n, n + 2, generator=g, dtype=torch.float64)
            store[t] = m @ m.mT
    return KFAC(layers, a, gg, None, "exact", 10)


def _ekfac_on_shard(rank: int, world: int) -> dict:
    """A real fit on this rank's shard (all-reduced factors): the basis it gives."""
    from prunekit.criteria import fit_ekfac

    torch.manual_seed(0)
    model = mlp("6,5,3").double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    batches = [(x[rank::world], y[rank::world])]
    ekfac = fit_ekfac(model, ClassificationTask(), find_targets(model), batches, labels="exact")
    return {**ekfac.basis.u_a, **{f"G:{k}": v for k, v in ekfac.basis.u_g.items()}}


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # as the parent test process (conftest): same LAPACK path
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    sizes: list[int] = []
    plain = eigh_mod.symmetric_eigh

    def counting(m):
        sizes.append(int(m.shape[-1]))
        return plain(m)

    eigh_mod.symmetric_eigh = counting  # this spawned process only
    try:
        basis = eigenbasis(_fake_kfac())
        computed = list(sizes)
        kfe = _fake_kfac().kfe()
        result = {
            "u_a": basis.u_a,
            "u_g": basis.u_g,
            "lambda_a": basis.lambda_a,
            "lambda_g": basis.lambda_g,
            "kfe": {
                t: torch.cat([u_g.flatten(), u_a.flatten()]) for t, (u_g, _, u_a) in kfe.items()
            },
            "computed": torch.tensor(computed),
            "ekfac": _ekfac_on_shard(rank, world),
        }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        eigh_mod.symmetric_eigh = plain
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("eigh")
    init = f"file://{out / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_every_rank_gets_the_one_process_basis_bit_for_bit(ranks):
    one = eigenbasis(_fake_kfac())
    for result in ranks:
        for field in ("u_a", "u_g", "lambda_a", "lambda_g"):
            want = getattr(one, field)
            assert set(result[field]) == set(want)
            for t in want:
                assert torch.equal(result[field][t], want[t]), (field, t)


def test_kfac_kfe_is_spread_the_same_way(ranks):
    one = _fake_kfac().kfe()
    for result in ranks:
        for t, (u_g, _, u_a) in one.items():
            assert torch.equal(result["kfe"][t], torch.cat([u_g.flatten(), u_a.flatten()]))


def test_the_work_was_split_by_cost(ranks):
    kfac = _fake_kfac()
    jobs = {f"A:{t}": kfac.A[t] for t in kfac.layers} | {f"G:{t}": kfac.G[t] for t in kfac.layers}
    owners = assign_by_cost({k: eigh_cost(m) for k, m in jobs.items()}, 2)
    everything = sorted(int(m.shape[-1]) for m in jobs.values())
    assert len(set(everything)) == len(everything)  # sizes name the jobs
    done = [sorted(r["computed"].tolist()) for r in ranks]
    for rank in range(2):
        want = sorted(int(jobs[k].shape[-1]) for k, r in owners.items() if r == rank)
        assert done[rank] == want
        assert 0 < len(done[rank]) < len(everything)  # a strict, non-empty share
    assert sorted(done[0] + done[1]) == everything  # each factor decomposed exactly once


def test_a_sharded_fit_gives_identical_bases_on_both_ranks(ranks):
    zero, one = ranks[0]["ekfac"], ranks[1]["ekfac"]
    assert set(zero) == set(one) and len(zero) == 4
    assert all(torch.equal(zero[k], one[k]) for k in zero)
