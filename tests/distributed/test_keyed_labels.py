"""Sampled Fisher labels keyed by (seed, step, example index) (issue 15, item 13).

Every example's labels come from its own counter-based stream (``types.LabelKey``), so the
masks of a pruning run with sampled labels are the same for 1, 2 and 3 processes (gloo,
CPU) and for any score batch size; an example's labels never depend on its batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prunekit.data import load_data
from prunekit.loop import run_pruning
from prunekit.models import mlp
from prunekit.ranks import label_key
from prunekit.settings import PruneSettings
from prunekit.types import ClassificationTask, LabelKey, RegressionTask, Task

# obd on EKFAC (sampled labels by default) and on diag with 2 sampled labels per example;
# no fine-tuning, so the masks depend on scoring alone. 301 score examples: uneven shards.
RUNS = {
    "ekfac": {"criterion": "obd", "labels": "sampled"},
    "diag": {"criterion": "obd", "fisher": "diag", "labels": "sampled", "samples": 2},
}
COMMON = {
    "sparsity": 0.8,
    "steps": 3,
    "finetune_epochs": 0,
    "final_epochs": 0,
    "score_examples": 301,
    "ntk": False,
    "seed": 7,
}


def _masks_of(run: str, score_batch_size: int = 250) -> dict[str, torch.Tensor]:
    """Masks of a small pruning run (digits MLP 64-32-10 at its seeded initialisation)."""
    torch.manual_seed(0)
    model = mlp("64,32,10")
    settings = PruneSettings(**RUNS[run], **COMMON, score_batch_size=score_batch_size)
    return run_pruning(model, load_data("digits"), settings).masks


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        masks = {run: _masks_of(run, score_batch_size=64) for run in RUNS}
        if rank == 0:
            torch.save(masks, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_process() -> dict[str, dict[str, torch.Tensor]]:
    return {run: _masks_of(run) for run in RUNS}


@pytest.mark.parametrize("world", [2, 3])
def test_masks_are_identical_for_any_number_of_processes(world, one_process, tmp_path):
    out = tmp_path / "masks.pt"
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(world, init, str(out)), nprocs=world, join=True)
    many = torch.load(out, weights_only=True)
    for run, masks in one_process.items():
        assert set(many[run]) == set(masks)
        for name, keep in masks.items():
            assert torch.equal(many[run][name], keep), (
                run,
                name,
                int((many[run][name] ^ keep).sum()),
            )
        assert 0 < sum(int((~m).sum()) for m in masks.values())  # something was pruned


def test_masks_are_identical_for_any_score_batch_size(one_process):
    for run, masks in one_process.items():
        other = _masks_of(run, score_batch_size=37)
        assert all(torch.equal(other[name], keep) for name, keep in masks.items()), run


def test_the_labels_of_an_example_do_not_depend_on_its_batch():
    """Example i's labels (classification, regression, and a user task's own ``sample``
    through per-example generators) are the same in one batch, in uneven batches and in
    a rank's strided shard."""
    g = torch.Generator().manual_seed(0)
    logits, means = torch.randn(23, 5, generator=g), torch.randn(23, 3, generator=g)
    key = LabelKey(seed=11, step=2)

    class UserSampler(Task):  # only ``sample``: the per-example generator fallback
        def sample(self, outputs, generator):
            probs = torch.softmax(outputs, -1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    for task, outputs in (
        (ClassificationTask(), logits),
        (RegressionTask(), means),
        (UserSampler(), logits),
    ):
        whole = task.sample_examples(outputs, key.draws(0, 23, draw=1))
        parts, start = [], 0
        for n in (1, 9, 6, 7):
            parts.append(task.sample_examples(outputs[start : start + n], key.draws(start, n, 1)))
            start += n
        assert torch.equal(torch.cat(parts), whole), type(task).__name__
        for rank in range(3):  # rank r holds examples r, r+3, ...: offset r, stride 3
            shard = LabelKey(seed=11, step=2, offset=rank, stride=3)
            got = task.sample_examples(outputs[rank::3], shard.draws(0, len(range(rank, 23, 3)), 1))
            assert torch.equal(got, whole[rank::3]), (type(task).__name__, rank)
        other = task.sample_examples(outputs, key.draws(0, 23, draw=2))
        assert not torch.equal(other, whole)  # another draw, another stream
    assert label_key(7, 3) == LabelKey(seed=7, step=3, offset=0, stride=1)  # one process


def test_keyed_draws_follow_the_predictive_distribution():
    """Inverse-CDF classes match the probabilities (zero-probability classes never drawn);
    normals have mean 0, variance 1; steps and seeds give independent streams."""
    n = 40_000
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    drawn = LabelKey(seed=1).draws(0, n).categorical(probs.repeat(n, 1))
    freq = torch.bincount(drawn, minlength=4).double() / n
    assert freq[1] == 0
    torch.testing.assert_close(freq, probs.double(), atol=0.01, rtol=0)
    z = LabelKey(seed=1).draws(0, n).normal((2,))
    assert z.shape == (n, 2) and z.dtype == torch.float64
    assert float(z.mean().abs()) < 0.02 and abs(float(z.var()) - 1) < 0.03
    u = torch.stack(
        [LabelKey(seed=s, step=t).draws(0, n).uniform() for s in (0, 1) for t in (0, 1)]
    )
    assert float(u.min()) > 0 and float(u.max()) < 1
    corr = torch.corrcoef(u).fill_diagonal_(0).abs().max()
    assert float(corr) < 0.03
    a, b = LabelKey(seed=1).draws(0, 4).generator(2), LabelKey(seed=1).draws(2, 1).generator(0)
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=b))


def test_a_torch_generator_seeds_a_key_once():
    gen = torch.Generator().manual_seed(3)
    first, again = LabelKey.of(gen), LabelKey.of(torch.Generator().manual_seed(3))
    assert first == again and LabelKey.of(gen) != first  # the generator advanced
    assert LabelKey.of(first) is first and LabelKey.of(None) == LabelKey()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_keyed_labels_on_the_gpu_equal_the_cpu_ones():
    """Drawn on the outputs' device (no host round trip), equal to the CPU's draws, so a
    sampled-label Fisher on the GPU equals the CPU one."""
    from prunekit.criteria import fit_curvature
    from prunekit.prune.targets import find_targets

    g = torch.Generator().manual_seed(0)
    logits, means = torch.randn(64, 7, generator=g), torch.randn(64, 3, generator=g)
    key = LabelKey(seed=2, step=1)
    for task, outputs in ((ClassificationTask(), logits), (RegressionTask(), means)):
        cpu = task.sample_examples(outputs, key.draws(0, 64))
        gpu = task.sample_examples(outputs.cuda(), key.draws(0, 64))
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-6)
    torch.manual_seed(0)
    model = mlp("10,16,4")
    x = torch.randn(80, 10, generator=g)
    data = [(x, x[:, :4].argmax(1))]
    targets = find_targets(model)
    kw = {"labels": "sampled", "generator": key}
    cpu = fit_curvature("diag", model, ClassificationTask(), targets, data, **kw).diagonal()
    data_gpu = [(x.cuda(), x[:, :4].argmax(1).cuda())]
    gpu_model = mlp("10,16,4").cuda()
    gpu_model.load_state_dict(model.state_dict())
    gpu = fit_curvature("diag", gpu_model, ClassificationTask(), targets, data_gpu, **kw)
    for name, value in gpu.diagonal().items():
        torch.testing.assert_close(value.cpu(), cpu[name], rtol=1e-3, atol=1e-6)
