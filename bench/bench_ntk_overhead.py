"""What the NTK alignment log costs a run: `prunekit prune ... --ntk` vs `--no-ntk` vs the
default (no flag), the same run otherwise, timed end to end (wall clock of the command, plots
included) and inside the loop (report.json `seconds`).

Cases: the `make demo` run (mlp-mnist, 784-300-100-10 tanh on mnist5k, OBD 90% in 10 steps,
1 fine-tuning epoch per step) and a 64-300-100-10 tanh MLP on digits, 10 steps. Each command
runs ``--repeat`` times, interleaved; the table keeps the fastest of each. An analysis on by
default may cost at most 15% of a run (issue 15): the default column must stay within 1.15x.
Usage: python bench/bench_ntk_overhead.py [--repeat N] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import markdown_table, update_section  # bench/ is sys.path[0] when run

PRUNEKIT = str(Path(sys.executable).with_name("prunekit"))
MODES = {"--ntk": ["--ntk"], "--no-ntk": ["--no-ntk"], "default": []}
PRUNE = ["--criterion", "obd", "--sparsity", "0.9", "--steps", "10", "--quiet", "--overwrite"]
DIGITS_ARCH = "prunekit.models:mlp?sizes=64,300,100,10&act=tanh"


def _digits_mlp(path: Path) -> None:
    """The 64-300-100-10 MLP, trained (SGD, cosine, 40 epochs) and saved with its arch."""
    import torch

    from prunekit.checkpoint import ARCH_KEY, build_model
    from prunekit.data import load_data
    from prunekit.finetune import FinetuneSettings, finetune
    from prunekit.prune.state import save_tensors
    from prunekit.types import ClassificationTask

    torch.manual_seed(0)
    data = load_data("digits", seed=0)
    model = build_model(DIGITS_ARCH)
    phase = FinetuneSettings(epochs=40, lr=0.05, lr_schedule="cosine")
    finetune(model, ClassificationTask(), data.train_batches(100, torch.Generator()), phase)
    save_tensors(path, model.state_dict(), {ARCH_KEY: DIGITS_ARCH, "prunekit.data": "digits"})


def _timed(args: list[str], out: Path) -> tuple[float, float]:
    """(wall seconds of the command, report.json seconds) of one prune run."""
    start = time.perf_counter()
    subprocess.run([PRUNEKIT, "prune", *args, "--out", str(out)], check=True)
    wall = time.perf_counter() - start
    return wall, json.loads((out / "report.json").read_text())["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ntk_overhead_"))
    demo, digits = work / "mlp-mnist.safetensors", work / "mlp300-digits.safetensors"
    if not demo.exists():
        subprocess.run([PRUNEKIT, "example", "mlp-mnist", "--out", str(demo), "--quiet"],
                       check=True)  # fmt: skip
    if not digits.exists():
        _digits_mlp(digits)
    cases = {
        "demo: mlp-mnist on mnist5k, 10 steps, 1 epoch/step": [str(demo), "--data", "mnist5k",
                                                              "--finetune-epochs", "1"],
        "64-300-100-10 MLP on digits, 10 steps": [str(digits), "--data", "digits"],
    }  # fmt: skip
    rows = []
    for case, base in cases.items():
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeat):
            for mode, flags in MODES.items():
                t = _timed([*base, *PRUNE, *flags], work / f"run{mode}")
                best[mode] = min(best.get(mode, t), t)
        off_wall, off_loop = best["--no-ntk"]
        for mode in MODES:
            wall, loop = best[mode]
            rows.append([case, mode, f"{wall:.1f}", f"{wall / off_wall:.2f}x",
                         f"{loop:.1f}", f"{loop / off_loop:.2f}x"])  # fmt: skip
        print(case, best, flush=True)
    body = (
        "Each run is `prunekit prune MODEL --criterion obd --sparsity 0.9 --steps 10` with the "
        "flag shown; wall = the whole command (load, loop, report, plots), loop = report.json "
        f"`seconds`; fastest of {args.repeat} interleaved runs, ratios against `--no-ntk` in "
        "this one run. The default is now off (an analysis on by default may cost at most 15% "
        "of a run); before this change the default was `--ntk` for both models.\n\n"
        + markdown_table(
            ["case", "NTK flag", "wall s", "wall vs --no-ntk", "loop s", "loop vs --no-ntk"],
            rows,
        )
    )
    cmd = f"python bench/bench_ntk_overhead.py --repeat {args.repeat}"
    update_section("ntk_overhead", "NTK log overhead (the --ntk default)", cmd, body)


if __name__ == "__main__":
    main()
