"""Training stage on the CPU: loss falls, resume is bit-identical, WSD schedule, checkpoints,
inference loading, and data parallel over gloo.

Run from the repository root: ``python -m pytest tests/test_training.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_RUN, checkpoint_tensors, make_run, read_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def full_run(data_root, tmp_path_factory):
    """One uninterrupted 0 → 40 run, shared by the tests that only read its outputs."""
    from osref.training import train_and_return_model

    run = make_run(data_root, tmp_path_factory.mktemp("runs") / "full")
    result, model = train_and_return_model(run, run["train"]["train_iters"])
    return run, result, _tensor_state(model)


def _tensor_state(model) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and "_extra_state" not in k
    }


def test_loss_falls(full_run):
    run, result, _ = full_run
    losses = [r["loss"] for r in read_jsonl(Path(run["paths"]["run_dir"]) / "logs/train_metrics.jsonl")]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    valid = read_jsonl(Path(run["paths"]["run_dir"]) / "logs/valid_metrics.jsonl")
    assert [v["iteration"] for v in valid] == [40] and np.isfinite(valid[0]["valid_loss"])
    assert result["iteration"] == 40 and result["consumed_tokens"] == 40 * 8 * 128
    assert result["kernels"]["compile_layers"] is False  # what the segment marker records


def test_lr_follows_wsd_formula(full_run):
    from osref.training import scheduled_lr

    run, _, _ = full_run
    records = read_jsonl(Path(run["paths"]["run_dir"]) / "logs/train_metrics.jsonl")
    cfg = run["train"]
    for record in records:
        t = record["iteration"] - 1
        if t < cfg["warmup_iters"]:
            expected = cfg["lr"] * t / cfg["warmup_iters"]
        elif t <= cfg["train_iters"] - cfg["cooldown_iters"]:
            expected = cfg["lr"]
        else:
            expected = cfg["lr"] * (cfg["train_iters"] - t) / cfg["cooldown_iters"]
        assert record["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), record
        assert scheduled_lr(cfg, t) == pytest.approx(expected, rel=1e-12, abs=1e-15)


METRIC_KEYS = {
    "iteration",
    "consumed_tokens",
    "loss",
    "lr",
    "grad_norm",
    "step_s",
    "tokens_per_s",
    "tflops_per_gpu",
    "mfu",
    "mem_gb",
    "elapsed_s",
    "eta_s",
    "kernels",
}


def test_metrics_records_have_throughput_and_progress_keys(full_run):
    from osref.training import _console_line

    run, _, _ = full_run
    records = read_jsonl(Path(run["paths"]["run_dir"]) / "logs/train_metrics.jsonl")
    for record in records:
        assert set(record) == METRIC_KEYS, record
        assert record["consumed_tokens"] == record["iteration"] * 8 * 128
        assert record["tokens_per_s"] > 0 and record["tflops_per_gpu"] > 0 and record["mem_gb"] > 0
        assert record["mfu"] is None  # no peak for the CPU
        assert record["kernels"] == {  # the fused kernels in effect: none by default on the CPU
            "megatron_fusions": False,
            "fused_cross_entropy": False,
            "fused_adamw": False,
            "compile_layers": False,
            "sdpa_backends": None,
        }
    assert records[-1]["eta_s"] == 0 and records[0]["eta_s"] > 0
    line = _console_line(records[-1], 40)
    for label in (
        "iteration      40/40",
        "loss",
        "lr",
        "grad norm",
        "tok/s",
        "TFLOP/s/GPU",
        "MFU n/a",
        "mem",
        "ETA 0:00:00",
    ):
        assert label in line, line


def test_mfu_peak_from_run_or_device_name(monkeypatch):
    from osref.training import peak_tflops_per_device

    assert peak_tflops_per_device(500) == 500.0
    assert peak_tflops_per_device() is None  # CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA L4", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, name=name: name)
        assert peak_tflops_per_device(None) == peak, name


def test_bench_train_runs_tiny_on_cpu():
    """Two variants side by side in one process: both FLOP counts, optimizer state, the loss
    comparison against the first variant, and the attention kernels of a profiled step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/bench_train.py"),
            "--tiny",
            "--steps",
            "3",
            "--warmup-steps",
            "1",
            "--variants",
            "plain,fused_adamw",
            "--attention",
            "sdpa",
            "--profile",
            "--json",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in rows] == ["plain", "fused_adamw"], out
    plain, fused = rows
    assert plain["kernels"]["fused_adamw"] is False and fused["kernels"]["fused_adamw"] is True
    for r in rows:
        assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["steps"] == 3 and r["attention"] == "sdpa"
        assert r["tokens_per_s"] > 0 and r["mfu"] is None and r["mfu_causal"] is None
        assert r["tflops_per_device"] > r["tflops_per_device_causal"] > 0
        assert r["optimizer_state_gb"] > 0 and r["mem_gb"] is None
        assert any("scaled_dot_product" in name for name in r["attention_kernels"]), r["attention_kernels"]
    assert plain["loss_max_rel_diff_vs_first_variant"] == 0.0
    assert fused["loss_max_rel_diff_vs_first_variant"] < 1e-6
    table = out.split("\n")
    assert any(line.startswith("plain ") for line in table) and any(line.startswith("fused_adamw ") for line in table)
    assert "6N + 12·L·s·h per token (full square) | 6N + 6·L·s·h (causal)" in out


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_megatron_scheduler_matches_closed_form(schedule):
    """The scheduler built for training gives lr(t) at every step t, both schedule styles."""
    from osref.training import build_scheduler, scheduled_lr

    cfg = {**json.loads(TINY_RUN.read_text())["train"], "schedule": schedule, "min_lr": 4e-4}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg["lr"])
    scheduler = build_scheduler(optimizer, cfg)
    for t in range(cfg["train_iters"]):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(scheduled_lr(cfg, t), rel=1e-12, abs=1e-15), t
        scheduler.step(increment=1)


def test_checkpoints_complete_and_torn_dirs_ignored(full_run):
    from osref.checkpointing import checkpoint_root, latest_complete_iteration, read_complete_marker

    run, _, _ = full_run
    root = checkpoint_root(run["paths"]["run_dir"])
    for iteration in run["train"]["checkpoint_iters"]:
        marker = read_complete_marker(root / f"iter_{iteration:07d}")
        assert marker["iteration"] == iteration
        assert marker["consumed_tokens"] == iteration * 8 * 128
        assert (root / f"iter_{iteration:07d}" / ".metadata").is_file()
    assert latest_complete_iteration(root) == 40
    (root / "iter_0000050").mkdir()  # torn save: files but no complete.json
    (root / "iter_0000050" / ".metadata").write_bytes(b"partial")
    assert latest_complete_iteration(root) == 40
    assert latest_complete_iteration(root, at_most=25) == 20
    assert latest_complete_iteration(root / "missing") is None
    shutil.rmtree(root / "iter_0000050")


@pytest.mark.slow
def test_resume_is_bit_identical(full_run, data_root, tmp_path):
    from osref.training import train

    full, _, _ = full_run
    run = make_run(data_root, tmp_path / "segmented")
    train(run, 20)
    # A torn save of a later iteration must be ignored and then replaced.
    torn = tmp_path / "segmented/checkpoints/iter_0000030"
    torn.mkdir()
    (torn / "junk").write_text("x")
    result = train(run, 40)
    assert result["resumed_from"] == 20
    assert (torn / "complete.json").is_file() and not (torn / "junk").exists()

    full_dir, seg_dir = Path(full["paths"]["run_dir"]), Path(run["paths"]["run_dir"])
    full_log = read_jsonl(full_dir / "logs/train_metrics.jsonl")
    seg_log = read_jsonl(seg_dir / "logs/train_metrics.jsonl")
    assert [r["iteration"] for r in seg_log] == list(range(1, 41))
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in seg_log] == [
        (r["loss"], r["lr"], r["grad_norm"]) for r in full_log
    ]
    full_state, seg_state = checkpoint_tensors(full_dir, 40), checkpoint_tensors(seg_dir, 40)
    assert full_state.keys() == seg_state.keys()
    assert any("optimizer" in k for k in full_state) and any("linear_qkv.weight" in k for k in full_state)
    for key in full_state:
        assert torch.equal(full_state[key], seg_state[key]), key


def test_load_model_for_inference_returns_saved_weights(full_run):
    from osref.checkpointing import load_model_for_inference

    run, _, trained = full_run
    model = load_model_for_inference(run, 40)
    assert not model.training
    loaded = _tensor_state(model)
    assert loaded.keys() == trained.keys()
    for key in trained:
        assert torch.equal(loaded[key], trained[key]), key
    tokens = torch.randint(0, 50000, (1, 16))
    with torch.no_grad():
        logits = model(tokens, torch.arange(16).unsqueeze(0), None)
    assert logits.shape == (1, 16, run["model"]["vocab_size"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_train(run: dict, name: Path, until: int, extra: list[str] = ()) -> None:
    """2 ranks over gloo through torchrun and scripts/train.py, as a training job runs; the run
    JSON goes to ``{name}.json``, the job's marker to ``{name}.done``."""
    run_json = name.with_suffix(".json")
    run_json.write_text(json.dumps(run))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={_free_port()}",
        str(REPO / "scripts/train.py"),
        "--run-json",
        str(run_json),
        "--until",
        str(until),
        "--marker",
        str(name.with_suffix(".done")),
        *extra,
    ]
    subprocess.run(cmd, env=env, check=True, timeout=300, cwd=REPO)


@pytest.mark.slow
def test_data_parallel_two_ranks_identical(data_root, tmp_path, full_run):
    run = make_run(data_root, tmp_path / "dp2")
    run["train"]["train_iters"] = 40
    run["train"]["overlap_grad_reduce"] = True  # the GPU default; gloo runs the same bucketed path
    torchrun_train(run, tmp_path / "dp2", until=10, extra=["--dump-final-weights"])
    marker = json.loads((tmp_path / "dp2.done").read_text())
    assert marker["iteration"] == 10
    assert marker["kernels"] == {
        "megatron_fusions": False,
        "fused_cross_entropy": False,
        "fused_adamw": False,
        "compile_layers": False,
        "sdpa_backends": None,
    }
    rank0 = torch.load(tmp_path / "dp2/weights_rank0.pt")
    rank1 = torch.load(tmp_path / "dp2/weights_rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # Same global batches as one rank with 2 micro-batches; only dropout masks differ.
    full_log = read_jsonl(Path(full_run[0]["paths"]["run_dir"]) / "logs/train_metrics.jsonl")
    dp_log = read_jsonl(tmp_path / "dp2/logs/train_metrics.jsonl")
    assert [r["iteration"] for r in dp_log] == list(range(1, 11))
    assert dp_log[0]["loss"] == pytest.approx(full_log[0]["loss"], rel=1e-2)
    # A different world size reads the checkpoint for inference.
    from osref.checkpointing import load_model_for_inference

    loaded = _tensor_state(load_model_for_inference(run, 10))
    assert loaded.keys() == {k for k in rank0 if "_extra_state" not in k}
    for key in loaded:
        assert torch.equal(loaded[key], rank0[key]), key


@pytest.mark.slow
def test_tensor_parallel_two_ranks_matches_one(data_root, tmp_path):
    """TP=2 over gloo, launched like a job (torchrun + scripts/train.py), trains the same model as
    TP=1: megatron initialises the full weight and splits it, so without dropout the losses agree
    to float rounding, and the TP=2 checkpoint consolidates to the TP=1 shapes."""
    from osref.checkpointing import load_model_for_inference
    from osref.training import train

    def run_for(name: str, tensor_parallel: int) -> dict:
        run = make_run(data_root, tmp_path / name)
        run["model"].update(hidden_dropout=0.0, attention_dropout=0.0)
        run["train"]["tensor_parallel"] = tensor_parallel
        return run

    single = run_for("tp1", 1)
    train(single, 10)
    run = run_for("tp2", 2)
    torchrun_train(run, tmp_path / "tp2", until=10)
    tp1_log = read_jsonl(tmp_path / "tp1/logs/train_metrics.jsonl")
    tp2_log = read_jsonl(tmp_path / "tp2/logs/train_metrics.jsonl")
    assert [r["iteration"] for r in tp2_log] == list(range(1, 11))
    for one, two in zip(tp1_log, tp2_log, strict=False):
        assert two["loss"] == pytest.approx(one["loss"], abs=1e-3), one["iteration"]
        assert two["lr"] == one["lr"]
    tp1_weights = _tensor_state(load_model_for_inference(single, 10))
    tp2_weights = _tensor_state(load_model_for_inference(run, 10))
    assert tp1_weights.keys() == tp2_weights.keys()
    for key, weight in tp1_weights.items():
        assert tp2_weights[key].shape == weight.shape, key
        assert torch.allclose(tp2_weights[key], weight, atol=1e-3), key


def test_tensorboard_scalars_mirror_the_jsonl(data_root, tmp_path):
    """With train.tensorboard the metrics also go to TensorBoard event files; a resumed job
    replaces (purges) the steps the lost job had logged after its checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from osref.training import train

    run = make_run(data_root, tmp_path / "tb")
    run["train"].update(tensorboard=True, checkpoint_iters=[4, 8])
    train(run, 8)
    shutil.rmtree(tmp_path / "tb/checkpoints/iter_0000008")  # the job died after logging 5..8
    train(run, 8)  # resumes from 4 and logs 5..8 again
    events = EventAccumulator(str(tmp_path / "tb/tensorboard"))
    events.Reload()
    records = read_jsonl(tmp_path / "tb/logs/train_metrics.jsonl")
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in losses] == list(range(1, 9))
    assert [value for _, value in losses] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert [e.step for e in events.Scalars("valid/loss")] == [8]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/mem_gb"} <= set(events.Tags()["scalars"])
