"""--device: curvature dtype on low-precision models (CPU) and the CUDA paths (skipped without
a GPU): same masks and curvature as on the CPU, every phase on the GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.criteria import fit_curvature
from prunekit.prune.targets import find_targets
from prunekit.types import ClassificationTask

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def mlp(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)


def batches(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=g)
    y = x[:, :4].argmax(1)
    return [(x[i : i + 50].to(device, dtype), y[i : i + 50].to(device)) for i in range(0, 200, 50)]


@pytest.mark.parametrize("estimator", ["diag", "kfac", "ekfac"])
def test_bfloat16_models_accumulate_curvature_in_float32(estimator):
    model = mlp(torch.bfloat16)
    targets = find_targets(model)
    curv = fit_curvature(
        estimator, model, ClassificationTask(), targets, batches(dtype=torch.bfloat16),
        labels="sampled", generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    diag = curv.diagonal()
    assert all(d.dtype == torch.float32 for d in diag.values())
    # the float32 model's curvature is close: statistics were not rounded to bfloat16
    ref = fit_curvature(
        estimator, mlp(torch.float32), ClassificationTask(), targets, batches(),
        labels="sampled", generator=torch.Generator().manual_seed(0),
    ).diagonal()  # fmt: skip
    for name in diag:
        rel = (diag[name] - ref[name]).norm() / ref[name].norm()
        assert rel < 0.1, (name, float(rel))


@needs_cuda
@pytest.mark.parametrize("estimator", ["diag", "ekfac"])
def test_cuda_curvature_equals_cpu(estimator):
    model = mlp()
    targets = find_targets(model)
    labels = "exact"  # sampled labels come from a device generator on the GPU: other draws

    def diagonal(net, data):
        gen = torch.Generator().manual_seed(0)
        task = ClassificationTask()
        return fit_curvature(estimator, net, task, targets, data, labels=labels, generator=gen)

    cpu = diagonal(model, batches()).diagonal()
    gpu = diagonal(copy.deepcopy(model).cuda(), batches("cuda")).diagonal()
    for name in cpu:
        assert gpu[name].device.type == "cuda"
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=1e-3, atol=1e-6)


@needs_cuda
def test_cuda_sampled_labels_are_drawn_on_the_gpu_reproducibly():
    from prunekit.types import sample_classes

    logits = torch.randn(64, 5, device="cuda")
    first = sample_classes(logits, torch.Generator().manual_seed(3))
    again = sample_classes(logits, torch.Generator().manual_seed(3))
    assert first.device.type == "cuda" and torch.equal(first, again)
    assert int(first.min()) >= 0 and int(first.max()) < 5


@needs_cuda
def test_cuda_prune_matches_cpu_masks_and_stays_on_the_gpu():
    cpu_model, gpu_model = mlp(), mlp()
    data = batches()
    settings = dict(criterion="obd", fisher="diag", sparsity=0.6, steps=2, finetune_epochs=0,
                    final_epochs=0, ntk=False)  # fmt: skip
    cpu = prunekit.prune(cpu_model, data, device="cpu", **settings)
    gpu = prunekit.prune(gpu_model, data, device="cuda", **settings)
    assert all(p.device.type == "cuda" for p in gpu_model.parameters())
    for name, keep in cpu.masks.items():
        agree = (gpu.masks[name].cpu() == keep).float().mean()
        assert agree > 0.995, (name, float(agree))


@needs_cuda
def test_cuda_distillation_of_an_encoder_runs_end_to_end():
    from prunekit.models import encoder

    torch.manual_seed(0)
    model = encoder(vocab=30, dim=16, heads=2, layers=1, ffn=32, max_len=12)
    ids = torch.randint(1, 30, (40, 10))
    mask = (torch.arange(10)[None] < torch.randint(3, 11, (40, 1))).long()
    result = prunekit.prune(
        model, [{"input_ids": ids * mask, "attention_mask": mask}] * 2, loss="distill",
        sparsity=0.5, steps=2, finetune_epochs=0.5, final_epochs=0.5, device="cuda",
    )  # fmt: skip
    assert next(model.parameters()).device.type == "cuda"
    assert result.report["metrics"]["finetuned"]["cosine"] > 0.9
