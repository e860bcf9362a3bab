"""User tasks (dict batches, --task) and label-free distillation (--loss distill)."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

import prunekit
from prunekit.criteria.fisher import squared_gradient_sums
from prunekit.data import bundle_from_batches
from prunekit.distill import prepare_task, teacher_outputs
from prunekit.errors import DataError, SettingError
from prunekit.prune.targets import find_targets
from prunekit.settings import PruneSettings
from prunekit.tasks import DistillationTask, as_task, check_distillable
from prunekit.types import ClassificationTask, Task


def snapshot(path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


def small_mlp(dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).to(dtype)


class DictTask:
    """A user task that is not a prunekit Task: dict batches with features and labels."""

    def forward(self, model, batch):
        weight = next(model.parameters())
        return model(batch["features"].to(weight.dtype))  # the data loader keeps float32

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs, batch["labels"])

    def sample(self, outputs, generator):
        probs = torch.softmax(outputs.detach(), -1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def dict_batches(n=60, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = (x[:, :4].argmax(1)).long()
    return [{"features": x[i : i + 20], "labels": y[i : i + 20]} for i in range(0, n, 20)]


def per_example_sq_grads(model, fn, batches) -> dict[str, torch.Tensor]:
    """float64 oracle: mean over examples of the squared per-example gradient of ``fn``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, example):
        sub = {k: v.unsqueeze(0) for k, v in example.items()}
        return fn(functional_call(model, p, (sub["features"].double(),)), sub)

    sums, n = {k: torch.zeros_like(v) for k, v in params.items()}, 0
    for b in batches:
        grads = vmap(jacrev(one), in_dims=(None, 0))(params, b)
        for k in sums:
            sums[k] += grads[k].pow(2).sum(0)
        n += len(b["labels"])
    return {k: v / n for k, v in sums.items()}


def test_user_task_with_dict_batches_gives_the_empirical_fisher_of_its_loss():
    model = small_mlp(torch.float64)
    batches = dict_batches(dtype=torch.float64)
    got = prunekit.fisher_diagonal(
        model, batches, estimator="diag", labels="empirical", task=DictTask(), examples=1000
    )
    # the API scores every example it is given (no validation split), in order; its data
    # loader keeps float features as float32
    given = [{"features": b["features"].float(), "labels": b["labels"]} for b in batches]
    want = per_example_sq_grads(model, lambda out, b: F.cross_entropy(out, b["labels"]), given)
    for name in ("0.weight", "2.weight"):
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-9, atol=1e-12)
    assert got["0.weight"].abs().sum() > 0


def test_user_task_prunes_end_to_end_through_the_api():
    model = small_mlp()
    result = prunekit.prune(
        model, dict_batches(n=200), task=DictTask(), sparsity=0.5, steps=2,
        finetune_epochs=0.5, final_epochs=0.5, fisher="diag", labels="sampled", ntk=False,
    )  # fmt: skip
    assert result.report["sparsity"]["global"] == pytest.approx(0.5, abs=1 / 72)
    assert result.report["task"]["kind"] == "custom"
    assert result.report["fisher_labels"] == "sampled"
    for name, keep in result.masks.items():
        assert torch.all(dict(model.named_parameters())[name][~keep] == 0)


def test_task_protocol_defaults_for_tuples_dicts_and_inputs_only():
    task = Task()
    x = torch.randn(3, 2)
    assert torch.equal(task.targets((x, torch.ones(3))), torch.ones(3))
    assert torch.equal(task.targets({"a": x, "labels": torch.zeros(3)}), torch.zeros(3))
    with pytest.raises(KeyError):
        task.targets(x)
    swapped = task.with_targets({"a": x, "labels": torch.zeros(3)}, torch.ones(3))
    assert torch.equal(swapped["labels"], torch.ones(3)) and swapped["a"] is x
    mask = torch.tensor([[1, 1, 0]])
    assert task.position_mask({"input_ids": mask, "attention_mask": mask}).dtype == torch.bool
    assert task.position_mask(x) is None
    assert not task.can_sample and not task.categorical and ClassificationTask().categorical


def test_as_task_refuses_objects_without_forward_and_loss():
    with pytest.raises(SettingError, match="lacks forward, loss"):
        as_task(object(), "m:f")
    with pytest.raises(SettingError, match="lacks loss"):
        as_task(type("T", (), {"forward": lambda self, m, b: m(b)})(), "m:f")
    assert as_task(DictTask()).can_sample


# ------------------------------------------------------------------ distillation


def test_distillation_losses_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    kl = DistillationTask(Task(), "kl", temperature=2.0)
    want = F.kl_div(F.log_softmax(s / 2, 1), F.log_softmax(t / 2, 1), log_target=True,
                    reduction="batchmean") * 4  # fmt: skip
    torch.testing.assert_close(kl.loss(s, (None, kl.prepare(t))), want)
    mse = DistillationTask(Task(), "mse")
    torch.testing.assert_close(mse.loss(s, (None, mse.prepare(t))), F.mse_loss(s, t))
    variance = mse.fit_variance(t * 10)  # outputs ten times larger: same relative loss
    assert variance == pytest.approx(float((t * 10).pow(2).mean()))
    torch.testing.assert_close(
        mse.loss(s * 10, (None, mse.prepare(t * 10))), F.mse_loss(s, t) / t.pow(2).mean()
    )
    cos = DistillationTask(Task(), "cosine")
    want = (1 - F.cosine_similarity(s, t, dim=1)).mean()
    torch.testing.assert_close(cos.loss(s, (None, cos.prepare(t))), want)
    assert float(kl.loss(t, (None, kl.prepare(t)))) == pytest.approx(0, abs=1e-6)


def test_distill_kl_exact_fisher_equals_the_tempered_categorical_oracle():
    model, temp = small_mlp(torch.float64), 2.0
    x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    task = DistillationTask(Task(), "kl", temperature=temp)
    batch = (x, task.prepare(model(x)))
    targets = find_targets(model)
    got, seen = squared_gradient_sums(model, task, targets, [batch], labels="exact")
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logp(p, xi):
        return torch.log_softmax(functional_call(model, p, (xi.unsqueeze(0),))[0] / temp, -1)

    jac = vmap(jacrev(logp), in_dims=(None, 0))(params, x)  # (N, C, ...) per parameter
    probs = torch.softmax(model(x) / temp, -1).detach()  # (N, C)
    for name in targets:
        j = jac[name]
        want = (probs.reshape(*probs.shape, *[1] * (j.dim() - 2)) * j.pow(2)).sum((0, 1))
        torch.testing.assert_close(got[name], want, rtol=1e-9, atol=1e-12)
    assert seen == 7


def test_distillation_at_zero_sparsity_moves_nothing():
    model = small_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = [torch.randn(40, 6, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    result = prunekit.prune(
        model, inputs, loss="distill", distill_metric="kl", sparsity=0.0, steps=1,
        weight_decay=0.0, finetune_epochs=1, final_epochs=1, ntk=False,
    )  # fmt: skip
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)
    assert result.report["metrics"]["finetuned"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert result.report["metrics"]["finetuned"]["agreement"] == 1.0


@pytest.mark.parametrize("metric", ["kl", "mse", "cosine"])
def test_distillation_keeps_outputs_close_at_low_sparsity(metric):
    model = small_mlp(seed=3)
    inputs = [torch.randn(50, 6, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    result = prunekit.prune(
        model, inputs, loss="distill", distill_metric=metric, sparsity=0.2, steps=2,
        finetune_epochs=1, final_epochs=1, ntk=False, lr=0.05,
    )  # fmt: skip
    metrics = result.report["metrics"]
    assert result.report["task"]["distill_metric"] == metric
    assert metrics["finetuned"]["cosine"] > 0.97
    assert metrics["finetuned"]["cosine"] >= metrics["pruned"]["cosine"] - 1e-3
    assert result.teacher["train"].shape == (320, 4)


def test_check_distillable_names_what_cannot_be_compared():
    with pytest.raises(DataError, match="tuple"):
        check_distillable((torch.zeros(2, 3),), "mse")
    with pytest.raises(DataError, match="int64"):
        check_distillable(torch.zeros(2, 3, dtype=torch.long), "cosine")
    with pytest.raises(DataError, match=r"logits \(N, C >= 2\)"):
        check_distillable(torch.zeros(2, 1), "kl")
    check_distillable(torch.zeros(2, 3, 5), "cosine")


def test_teacher_outputs_are_cached_by_weights_and_data(tmp_path, monkeypatch):
    import prunekit.distill as pipeline

    model = small_mlp()
    data = bundle_from_batches([torch.randn(30, 6)])
    cache = tmp_path / "teacher.safetensors"
    first = teacher_outputs(model, Task(), data, cache)
    assert cache.is_file()

    def no_compute(*args, **kwargs):
        raise AssertionError("recomputed despite a valid cache")

    monkeypatch.setattr(pipeline, "_outputs_on", no_compute)
    again = teacher_outputs(model, Task(), data, cache)
    assert torch.equal(again["train"], first["train"]) and torch.equal(again["val"], first["val"])
    monkeypatch.undo()
    with torch.no_grad():
        model[0].weight[0, 0] += 1.0
    changed = teacher_outputs(model, Task(), data, cache)
    assert not torch.equal(changed["train"], first["train"])


def test_prepare_task_without_labels_needs_distill_or_a_task():
    data = bundle_from_batches([torch.randn(20, 6)])
    with pytest.raises(DataError, match="inputs only"):
        prepare_task(small_mlp(), data, PruneSettings())
    task, bundle, teacher = prepare_task(small_mlp(), data, PruneSettings(loss="distill"))
    assert task.metric == "cosine" and bundle.kind == "distill" and teacher is not None
    with pytest.raises(SettingError, match="temperature"):
        prepare_task(small_mlp(), data, PruneSettings(loss="distill", temperature=0.0))


# ------------------------------------------------------------------ CLI bad inputs


USER_MODULE = '''
import torch
import torch.nn.functional as F
from torch import nn


def tuple_mlp():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(x), x

    return Two()


def wrong_key_task():
    class T:
        def forward(self, model, batch):
            return model(batch["tokens"])

        def loss(self, outputs, batch):
            return outputs.pow(2).mean()

    return T()


def unsupervised_task():
    class T:
        def forward(self, model, batch):
            return model(batch["features"])

        def loss(self, outputs, batch):
            return outputs.pow(2).mean()

    return T()


def vector_loss_task():
    class T:
        def forward(self, model, batch):
            return model(batch["features"])

        def loss(self, outputs, batch):
            return outputs.pow(2).mean(1)  # per example: not the batch mean

    return T()


def target_key_task():
    class T:
        def forward(self, model, batch):
            return model(batch["features"])

        def loss(self, outputs, batch):
            return F.cross_entropy(outputs, batch["target"])

        def sample(self, outputs, generator):
            return torch.multinomial(torch.softmax(outputs, -1), 1, generator=generator)[:, 0]

    return T()


def not_a_task():
    return 42


def broken_factory():
    raise RuntimeError("factory exploded")
'''


@pytest.fixture
def user_env(tmp_path, monkeypatch):
    """A working folder with a user module, an MLP checkpoint and inputs-only data."""
    from prunekit.checkpoint import ARCH_KEY
    from prunekit.prune.state import save_tensors

    (tmp_path / "pk_user_tasks.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = small_mlp()
    arch = "prunekit.models:mlp?sizes=6,12,4"
    state = {k.replace("0.", "1.", 1) if k.startswith("0.") else k.replace("2.", "3.", 1): v
             for k, v in model.state_dict().items()}  # fmt: skip
    save_tensors(tmp_path / "mlp.safetensors", state, {ARCH_KEY: arch})
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "feats.npz", features=rng.standard_normal((40, 6)).astype(np.float32))
    np.savez(tmp_path / "plain.npz", x=rng.standard_normal((40, 6)).astype(np.float32))
    np.savez(tmp_path / "labelled.npz", features=rng.standard_normal((40, 6)).astype(np.float32),
             target=rng.integers(0, 4, 40))  # fmt: skip
    torch.save(torch.nn.Linear(1, 1).state_dict(), tmp_path / "unused.pt")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "pk_no_such_module:task"], "does not import"),
        (["--task", "pk_user_tasks:missing"], "does not import"),
        (["--task", "pk_user_tasks:not_a_task"], "lacks forward, loss"),
        (["--task", "pk_user_tasks:broken_factory"], "factory exploded"),
        (["--task", "pk_user_tasks:wrong_key_task", "--data", "feats.npz"],
         "key 'tokens' is missing; the batch has keys ['features']"),
        (["--data", "plain.npz"], "needs labels but the data holds inputs only"),
        (["--data", "plain.npz", "--loss", "classification"], "needs labels"),
        (["--task", "pk_user_tasks:unsupervised_task", "--data", "feats.npz",
          "--fisher-labels", "empirical"], "Fisher labels 'empirical' need labels"),
        (["--task", "pk_user_tasks:unsupervised_task", "--data", "feats.npz",
          "--fisher-labels", "sampled"], "need a task with sample"),
        (["--data", "plain.npz", "--loss", "distill", "--distill-metric", "l2"],
         "distill metric 'l2'"),
        (["--data", "plain.npz", "--loss", "distill", "--temperature", "0"], "temperature"),
        (["--data", "plain.npz", "--loss", "distil"], "loss 'distil'"),
        (["--data", "plain.npz", "--temperature", "2"], "only apply with --loss distill"),
        (["--data", "feats.npz", "--distill-metric", "mse",
          "--task", "pk_user_tasks:unsupervised_task"], "only apply with --loss distill"),
        (["--task", "pk_user_tasks:unsupervised_task", "--loss", "regression"],
         "would replace the loss of --task"),
        (["--data", "plain.npz", "--loss", "distill", "--criterion", "lm"],
         "criterion 'lm' scores the loss gradient, which is zero"),
        (["--data", "plain.npz", "--loss", "distill", "--fisher-labels", "empirical"],
         "'empirical' under --loss distill"),
        (["--task", "pk_user_tasks:vector_loss_task", "--data", "feats.npz"],
         "must return a scalar float tensor (the batch mean), got shape (2,)"),
        (["--task", "pk_user_tasks:target_key_task", "--data", "labelled.npz",
          "--fisher-labels", "sampled"], "written to batch['labels']"),
        (["--data", "plain.npz", "--loss", "distill", "--distill-metric", "kl",
          "--fisher-labels", "exact", "--arch", "pk_user_tasks:tuple_mlp"],
         "returns one floating-point tensor, not tuple"),
    ],
)  # fmt: skip
def test_bad_task_inputs_exit_2_with_one_line_and_write_nothing(user_env, cli, args, message):
    checkpoint = "mlp.safetensors"
    if "--arch" in args:  # a state_dict for the tuple-returning model
        from pk_user_tasks import tuple_mlp

        torch.save(tuple_mlp().state_dict(), user_env / "tuple.pt")
        checkpoint = "tuple.pt"
    before = snapshot(user_env)
    code, stdout, stderr = cli("prune", checkpoint, "--data", "plain.npz", *args,
                               "--out", "run", "--quiet")  # fmt: skip
    assert code == 2, stderr
    assert message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert snapshot(user_env) == before


# ------------------------------------------------------------------ encoder end to end

ENCODER_MODULE = '''
import torch.nn.functional as F
from prunekit.models import encoder as zoo_encoder


def encoder():
    return zoo_encoder(vocab=40, dim=16, heads=2, layers=1, ffn=32, max_len=16)


class EncoderTask:
    def forward(self, model, batch):
        return model(batch["input_ids"], batch["attention_mask"])

    def loss(self, outputs, batch):
        return outputs.pow(2).mean()


def task():
    return EncoderTask()
'''


def test_encoder_distillation_cli_end_to_end(tmp_path, monkeypatch, cli):
    """The issue's command: user arch + user task + inputs-only tokens + distill + export."""
    import json

    import onnxruntime as ort

    from prunekit.prune.state import save_tensors

    (tmp_path / "pk_mymodels.py").write_text(textwrap.dedent(ENCODER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from pk_mymodels import encoder

    torch.manual_seed(0)
    dense = encoder()
    save_tensors(tmp_path / "encoder.safetensors", dense.state_dict(), {})
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 13, 120)
    mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
    np.savez(tmp_path / "tokens.npz", input_ids=rng.integers(1, 40, (120, 12)) * mask,
             attention_mask=mask)  # fmt: skip
    code, stdout, stderr = cli(
        "prune", "encoder.safetensors", "--arch", "pk_mymodels:encoder",
        "--task", "pk_mymodels:task", "--data", "tokens.npz", "--loss", "distill",
        "--criterion", "obd", "--sparsity", "0.5", "--steps", "2", "--finetune-epochs", "0.5",
        "--final-epochs", "0.5", "--export", "enc.onnx", "--out", "run", "--quiet",
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["sparsity"]["global"] == pytest.approx(0.5, abs=1e-3)
    assert report["task"] == {
        "kind": "distill", "spec": "pk_mymodels:task", "loss": "distill",
        "distill_metric": "cosine", "temperature": 1.0, "variance": 1.0, "distill_weight": 1.0,
    }  # fmt: skip
    assert set(report["estimators"].values()) == {"ekfac"}
    assert report["metrics"]["finetuned"]["cosine"] > 0.9
    assert (tmp_path / "run" / "teacher.safetensors").is_file()
    receipt = json.loads((tmp_path / "enc.onnx.json").read_text())
    assert receipt["verification"]["max_abs_diff"] <= 1e-5
    # the exported graph takes any batch and sequence length, padding included
    sess = ort.InferenceSession(str(tmp_path / "enc.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    ids = torch.randint(1, 40, (3, 9))
    att = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])
    from prunekit.checkpoint import load_model

    pruned = load_model(tmp_path / "run" / "model.safetensors", arch="pk_mymodels:encoder").model
    with torch.no_grad():
        want = pruned(ids * att, att).numpy()
    got = sess.run(None, {"input_ids": (ids * att).numpy(), "attention_mask": att.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_scoring_an_encoder_on_dict_batches_leaves_no_trace():
    from prunekit.models import encoder

    torch.manual_seed(0)
    model = encoder(vocab=30, dim=16, heads=2, layers=1, ffn=32, max_len=12).train()
    ids = torch.randint(1, 30, (24, 10))
    mask = (torch.arange(10)[None] < torch.randint(2, 11, (24, 1))).long()
    batches = [{"input_ids": ids * mask, "attention_mask": mask}]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for criterion, fisher in (("obd", "ekfac"), ("obd", "kfac"), ("obd", "diag"), ("lm", None)):
        settings = {"fisher": fisher} if fisher else {}
        scores = prunekit.score(model, batches, criterion=criterion, task=EmbeddingTask(),
                                **settings)  # fmt: skip
        assert set(scores) == {n for n, _ in model.named_parameters() if n.endswith("weight")
                               and ("attn" in n or "ffn" in n)}  # fmt: skip
        assert all(torch.isfinite(s).all() and s.dtype == torch.float32 for s in scores.values())
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                   for m in model.modules())  # fmt: skip


class EmbeddingTask:
    """Regression of the pooled embedding toward zero, with a Gaussian predictive."""

    def forward(self, model, batch):
        return model(**batch)

    def loss(self, outputs, batch):
        return 0.5 * outputs.pow(2).sum(1).mean()

    def sample(self, outputs, generator):
        return outputs.detach() + torch.randn(outputs.shape, generator=generator)


def test_a_task_reading_a_missing_position_is_named():
    from prunekit.data import check_data_fits

    data = bundle_from_batches([(torch.randn(10, 6), torch.zeros(10, dtype=torch.long))])

    class Third:
        def forward(self, model, batch):
            return model(batch[2])

        def loss(self, outputs, batch):
            return outputs.sum()

    with pytest.raises(DataError, match="forward cannot consume the batch: position out of range"):
        check_data_fits(small_mlp(), data, as_task(Third()))


class TorchEncoder(nn.Module):
    """nn.TransformerEncoder (MultiheadAttention bypasses module hooks) with masked pooling."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        h = self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).float()
        return self.head((h * m).sum(1) / m.sum(1))


def test_torch_transformer_encoder_prunes_its_attention_projections():
    torch.manual_seed(0)
    model = TorchEncoder()
    targets = find_targets(model)
    assert targets["enc.layers.0.self_attn.in_proj_weight"].kind == "other"
    assert targets["enc.layers.0.self_attn.out_proj.weight"].kind == "other"
    assert targets["enc.layers.0.linear1.weight"].kind == "linear"
    ids = torch.randint(1, 30, (48, 10))
    mask = (torch.arange(10)[None] < torch.randint(3, 11, (48, 1))).long()
    result = prunekit.prune(
        model, [{"input_ids": ids * mask, "attention_mask": mask}] * 2, loss="distill",
        sparsity=0.4, steps=2, finetune_epochs=0.5, final_epochs=0.5,
    )  # fmt: skip
    est = result.report["estimators"]
    assert est["enc.layers.0.self_attn.in_proj_weight"] == "diag"
    assert est["enc.layers.0.linear1.weight"] == "ekfac"
    assert result.report["sparsity"]["per_layer"]["enc.layers.0.self_attn.in_proj_weight"] > 0
    assert result.report["metrics"]["finetuned"]["cosine"] > 0.95


def test_teacher_cache_is_not_reused_for_other_data(tmp_path):
    model = small_mlp()
    cache = tmp_path / "teacher.safetensors"
    data_a = bundle_from_batches([torch.randn(30, 6, generator=torch.Generator().manual_seed(1))])
    data_b = bundle_from_batches([torch.randn(30, 6, generator=torch.Generator().manual_seed(2))])
    first = teacher_outputs(model, Task(), data_a, cache)
    other = teacher_outputs(model, Task(), data_b, cache)  # same name and sizes, other inputs
    assert not torch.equal(first["train"], other["train"])
    with torch.no_grad():
        torch.testing.assert_close(other["train"], model(data_b.x_train))


def test_a_ready_made_distillation_task_through_the_api():
    model = small_mlp()
    inputs = [torch.randn(40, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    result = prunekit.prune(
        model, inputs, task=DistillationTask(Task(), "mse"), sparsity=0.3, steps=1,
        finetune_epochs=0.5, final_epochs=0.5, ntk=False,
    )  # fmt: skip
    assert result.report["task"]["distill_metric"] == "mse"
    assert result.report["task"]["loss"] == "auto"  # settings as given; the task decided
    assert result.report["metrics"]["finetuned"]["cosine"] > 0.9


def test_distillation_with_labels_reports_accuracy_and_auto_picks_kl_for_logits():
    from prunekit.data import load_data

    data = load_data("synthetic?n=300&dim=6&classes=4")
    model = small_mlp()
    task, bundle, _ = prepare_task(model, data, PruneSettings(loss="distill"))
    assert task.metric == "kl" and set(bundle.y_train) == {"teacher", "labels"}
    embedder = nn.Sequential(nn.Linear(6, 5))  # 5 outputs for 4 classes: not logits
    task, _, _ = prepare_task(embedder, data, PruneSettings(loss="distill"))
    assert task.metric == "cosine"
    result = prunekit.prune(model, data, loss="distill", sparsity=0.2, steps=1, ntk=False,
                            finetune_epochs=0.5, final_epochs=0.5)  # fmt: skip
    acc = result.report["metrics"]["dense"]["accuracy"]
    assert acc is not None and 0 <= acc <= 1
    assert result.metrics[1]["cosine"] <= 1 and "cosine_after_prune" in result.metrics[1]


def test_embeddings_are_opt_in_targets_on_the_diagonal_fisher():
    from prunekit.models import encoder

    torch.manual_seed(0)
    ids = torch.randint(1, 30, (40, 8))
    mask = torch.ones(40, 8, dtype=torch.long)
    data = [{"input_ids": ids, "attention_mask": mask}]
    kwargs = dict(vocab=30, dim=16, heads=2, layers=1, ffn=32, max_len=8)
    plain = prunekit.prune(encoder(**kwargs), data, loss="distill", sparsity=0.3, steps=1,
                           finetune_epochs=0, final_epochs=0)  # fmt: skip
    assert not any("embed" in n for n in plain.masks)
    model = encoder(**kwargs)
    opted = prunekit.prune(model, data, loss="distill", sparsity=0.3, steps=1,
                           finetune_epochs=0, final_epochs=0, embeddings=True)  # fmt: skip
    embeds = [n for n in opted.masks if "embed" in n]
    assert embeds and all(opted.report["estimators"][n] == "diag" for n in embeds)


RECIPE = """
version: 1
data: synthetic?n=200&dim=6&classes=4
model:
  example: mlp-digits
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("task:\n  spec: pk_no_such_mod:task\n", "allow code named by files with --trust-code"),
        ("task:\n  distill_metric: mse\n", "only apply with task.loss: distill"),
        ("checks:\n  min_cosine: 0.9\n", "checks.min_cosine is measured only"),
        ("task:\n  loss: distill\n  distill_metric: cosine\nchecks:\n  max_accuracy_drop: 1\n",
         "checks.max_accuracy_drop needs accuracy"),
        ("task:\n  loss: distill\n  temperature: 0\n", "temperature"),
    ],
)  # fmt: skip
def test_recipe_task_section_is_validated_before_any_work(tmp_path, cli, extra, message):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + extra)
    code, _, stderr = cli("validate", path)
    assert code == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1


def test_recipe_task_spec_with_trust_code_is_imported_and_checked(tmp_path, cli):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE + "task:\n  spec: pk_no_such_mod:task\n")
    code, _, stderr = cli("validate", path, "--trust-code")
    assert code == 2 and "does not import" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 2  # the --trust-code note, then the error


def test_min_cosine_gate_reads_the_finetuned_cosine():
    from prunekit.recipe import evaluate_checks

    report = {"metrics": {"finetuned": {"cosine": 0.95}}}
    rows = evaluate_checks({"min_cosine": 0.9}, report)
    assert rows == [{"check": "min_cosine", "limit": 0.9, "value": 0.95, "passed": True}]
    assert not evaluate_checks({"min_cosine": 0.99}, report)[0]["passed"]


def test_synthetic_token_data():
    from prunekit.data import load_data

    data = load_data("synthetic?task=tokens&n=50&seq=6&vocab=9&classes=3")
    assert data.kind == "classification" and data.num_classes == 3
    ids, mask = data.x_train["input_ids"], data.x_train["attention_mask"]
    assert ids.shape == (40, 6) and ids.dtype == torch.int64 and mask.sum(1).min() >= 1
    assert torch.all(ids[mask == 0] == 0) and torch.all(ids[mask == 1] > 0)
    counts = torch.stack([((ids % 3 == c) & (mask == 1)).sum(1) for c in range(3)], 1)
    assert torch.equal(counts.argmax(1), data.y_train)
    unlabelled = load_data("synthetic?task=tokens&n=50&labels=no")
    assert unlabelled.kind == "inputs" and unlabelled.y_train is None
    for bad in ("synthetic?task=tokens&seq=1", "synthetic?task=tokens&vocab=3&classes=4",
                "synthetic?task=tokens&colour=red"):  # fmt: skip
        with pytest.raises(DataError):
            load_data(bad)


def test_sample_classes_on_the_cpu_uses_the_generator_itself():
    from prunekit.types import sample_classes

    logits = torch.tensor([[0.0, 50.0, 0.0], [50.0, 0.0, 0.0]])
    assert sample_classes(logits, torch.Generator().manual_seed(0)).tolist() == [1, 0]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(30, 4, generator=torch.Generator().manual_seed(1)), -1)
    want = torch.multinomial(probs, 1, generator=g2).squeeze(1)
    assert torch.equal(sample_classes(probs.log(), g1), want)


@pytest.mark.parametrize("metric", ["kl", "mse", "cosine"])
def test_distillation_labels_of_an_example_do_not_depend_on_its_batch(metric):
    from prunekit.tasks import DistillationTask
    from prunekit.types import ExampleDraws

    torch.manual_seed(0)
    outputs = torch.randn(12, 5)
    task = DistillationTask(ClassificationTask(), metric=metric, temperature=2.0)
    task.variance = 0.5
    whole = task.sample_examples(outputs, ExampleDraws(prefix=7, first=0, stride=1, n=12))
    halves = [
        task.sample_examples(outputs[:5], ExampleDraws(prefix=7, first=0, stride=1, n=5)),
        task.sample_examples(outputs[5:], ExampleDraws(prefix=7, first=5, stride=1, n=7)),
    ]
    assert torch.equal(whole, torch.cat(halves))
    other = task.sample_examples(outputs, ExampleDraws(prefix=8, first=0, stride=1, n=12))
    assert not torch.equal(whole, other)  # the key matters
