"""bench/gpu.py's arithmetic, checked without a GPU: the FLOPs formula, the peaks, the matrix."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matmul_params_count_a_real_llama(gpu):
    """N of 6N: every parameter of the default ~0.85B Llama but the input embedding and norms."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = gpu.GPU_SHAPE
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    counted = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.dim() == 2 and "embed_tokens" not in name
    )
    assert gpu.matmul_params(shape) == counted == 786_956_288


def test_palm_formula_on_the_default_shape(gpu):
    shape, seq = gpu.GPU_SHAPE, 512
    n = 786_956_288
    assert gpu.train_flops_per_token(shape, seq) == 6 * n + 12 * 16 * 32 * 64 * seq
    assert gpu.reference_flops_per_token(shape, seq) == pytest.approx(2 * n + 4 * 16 * 2048 * seq)
    assert "6*N + 12*L*H*Q*T" in gpu.FLOPS_FORMULA


def test_mfu_of_a_run(gpu):
    shape, lengths = gpu.GPU_SHAPE, {"sft": 512.0, "dpo": 256.0}
    sft = {"task": "sft", "config": {}, "tokens_per_second": 1e5}
    gpu.with_mfu(sft, shape, lengths, 989.4)
    assert sft["mfu"] == pytest.approx(gpu.train_flops_per_token(shape, 512) * 1e5 / 989.4e12)
    inline = {"task": "dpo", "config": {"precompute": False}, "tokens_per_second": 1e5}
    inline.update(loop_seconds=1.0, precompute_seconds=0.0, loop_tokens=10)
    gpu.with_mfu(inline, shape, lengths, None)
    assert inline["mfu"] is None  # no known peak: no MFU, never a made-up one
    per_token = gpu.train_flops_per_token(shape, 256) * 4 / 3  # policy + reference forward
    assert inline["model_tflops_per_second"] == pytest.approx(per_token * 1e5 / 1e12)


def test_peaks_by_device_name(gpu):
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA H200") == 989.4
    assert gpu.peak_tflops("some cpu") is None


def test_smoke_matrix_runs_every_setting_once(gpu):
    args = gpu.parse_args(["--smoke"])
    assert (args.steps, args.shape["num_hidden_layers"]) == (3, 2)
    full = gpu.matrix(smoke=False, liger=True)
    smoke = gpu.matrix(smoke=True, liger=False)
    assert len(full) == 8 + 4
    names = [gpu.config_name(task, config) for task, config in full]
    assert len(set(names)) == len(names)
    for task, key in (("sft", "packing"), ("sft", "checkpointing"), ("dpo", "precompute")):
        values = {c[key] for t, c in full if t == task}
        assert {c[key] for t, c in smoke if t == task} == values
