"""GPU throughput of upstack's sft and dpo stages next to a plain TRL script: tokens/s, MFU, peak memory.

    python3 bench/gpu.py                  # on a GPU machine: a ~0.85B Llama (random weights), bf16
    python3 bench/gpu.py --smoke          # the same code path on CPU: tiny model, 3 steps
    python3 bench/gpu.py --only '^sft/'   # a subset (regex on run names), merged into gpu.json

The model is built here (upstack's init tokenizer, a LlamaConfig of the shape asked; its vocab
rows past the tokenizer's are never looked up but cost what a real 32k vocab costs in lm_head).
Data: arith conversations of 1..2*turns-1 turns (sft) and preference pairs whose prompts open
with earlier turns (dpo), written once as jsonl and read alike by both contenders. Every run is
its own subprocess; the same callback times both (steps after --warmup, CUDA synchronized) and
counts non-padding tokens (include_num_input_tokens_seen). Matrix: sft padded vs packed (bfd,
padding-free) x Liger kernel (if importable) x activation checkpointing; dpo reference log-probs
precomputed vs in every step x activation checkpointing; each for upstack and for TRL. Then
the transformers teacher (rephrases/s) and the eval stage's batched greedy solve (problems/s).
MFU uses the formula written into the JSON and the spec-sheet dense bf16 peak of the device.
Targets: upstack within 3% of TRL; best sft MFU >= 40% on an H100; dpo precomputed >= 1.3x.
Writes bench/out/gpu.{json,png}; logs of every worker under bench/out/gpu-work/logs/.
Without a GPU only --smoke runs, and everything it writes says 'cpu smoke, not a GPU figure'.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_overhead import (
    ROOT,
    run_worker,
    trl_run,
    upstack_run,
    write_pairs,
    write_sft_rows,
)

from upstack.core.tables import markdown_table

OUT = ROOT / "bench" / "out"
WORK = OUT / "gpu-work"
SMOKE_LABEL = "cpu smoke, not a GPU figure"
GPU_LABEL = "GPU figure"

# the default: a TinyLlama-like width at 16 layers, ~0.85B parameters, fills an H100 sensibly
GPU_SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
}
SMOKE_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 768,
}
# (GPU default, smoke) for each run setting
DEFAULTS = {
    "steps": (20, 3),
    "warmup": (3, 1),
    "batch": (8, 2),
    "max_length": (2048, 256),
    "turns": (6, 2),
    "gen_requests": (256, 4),
    "gen_batch": (64, 2),
    "gen_tokens": (128, 8),
}

FLOPS_FORMULA = (
    "flops per token = 6*N + 12*L*H*Q*T (PaLM, Chowdhery et al. 2022, appendix B): "
    "N = parameters in matrix multiplies (all but the input embedding; lm_head counted), "
    "L layers, H attention heads, Q head dim, T = mean tokens per training sequence "
    "(attention spans one document, padded or packed). DPO: T over prompt+chosen and "
    "prompt+rejected; a reference forward inside the timed steps (not precomputed) adds "
    "2*N + 4*L*H*Q*T per token. Model FLOPs only: recomputation under activation "
    "checkpointing is not counted (MFU, not HFU). MFU = flops per token * tokens/s / peak."
)
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; the first
# pattern found in torch.cuda.get_device_name() wins.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM (the "H100 80GB HBM3")
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
]


# --------------------------------------------------------------------------- FLOPs


def matmul_params(shape: dict) -> int:
    """Parameters of a Llama that sit in matrix multiplies: q, k, v, o, gate, up, down, lm_head."""
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    attention = 2 * hidden * hidden + 2 * hidden * kv
    mlp = 3 * hidden * shape["intermediate_size"]
    return layers * (attention + mlp) + hidden * shape["vocab_size"]


def attention_flops(shape: dict, seq_len: float) -> float:
    """12*L*H*Q*T: the score and value matmuls, forward and backward, per token."""
    return 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq_len


def train_flops_per_token(shape: dict, seq_len: float) -> float:
    """6*N + 12*L*H*Q*T (H*Q = hidden_size)."""
    return 6 * matmul_params(shape) + attention_flops(shape, seq_len)


def reference_flops_per_token(shape: dict, seq_len: float) -> float:
    """A forward only: a third of the training FLOPs."""
    return train_flops_per_token(shape, seq_len) / 3


def peak_tflops(device_name: str) -> float | None:
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if pattern.lower() in device_name.lower():
            return tflops
    return None


# --------------------------------------------------------------------------- the matrix


def matrix(smoke: bool, liger: bool) -> list[dict]:
    """(task, config) pairs to run, each for upstack and TRL. Smoke runs every setting of every
    axis once (a diagonal), not every combination."""
    sft = [
        {"packing": packing, "liger": use_liger, "checkpointing": ckpt}
        for packing in ("padded", "bfd")
        for use_liger in ((False, True) if liger else (False,))
        for ckpt in (False, True)
    ]
    dpo = [
        {"precompute": precompute, "checkpointing": ckpt}
        for precompute in (True, False)
        for ckpt in (False, True)
    ]
    if smoke:
        sft = [
            {"packing": "padded", "liger": False, "checkpointing": False},
            {"packing": "bfd", "liger": liger, "checkpointing": True},
        ]
        dpo = [
            {"precompute": True, "checkpointing": False},
            {"precompute": False, "checkpointing": True},
        ]
    return [("sft", c) for c in sft] + [("dpo", c) for c in dpo]


def config_name(task: str, config: dict) -> str:
    on = {True: "on", False: "off"}
    if task == "sft":
        parts = [config["packing"], f"liger-{on[config['liger']]}"]
    else:
        parts = ["ref-precomputed" if config["precompute"] else "ref-inline"]
    return "/".join([task, *parts, f"ckpt-{on[config['checkpointing']]}"])


def trainer_settings(task: str, config: dict, args, cuda: bool) -> dict:
    """The TRL config fields both contenders get (upstack's runner through `trainer:`)."""
    settings = {
        "per_device_train_batch_size": args.batch,
        "learning_rate": 1e-5,
        "max_length": args.max_length,
        "max_steps": args.steps,
        "logging_steps": 10,
        "bf16": cuda,
        "activation_checkpointing": config["checkpointing"],
        "include_num_input_tokens_seen": "non_padding",
        "save_strategy": "no",
    }
    if task == "sft":
        packed = config["packing"] == "bfd"
        settings.update(packing=packed, padding_free=packed, use_liger_kernel=config["liger"])
        if packed:
            settings["packing_strategy"] = "bfd"
    else:
        settings.update(
            beta=0.1, precompute_ref_log_probs=config["precompute"], use_liger_kernel=False
        )
    return settings


# --------------------------------------------------------------------------- workers (one per subprocess)


def step_clock():
    """A TrainerCallback: time and non-padding tokens at train begin and after every step."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[int, float, int]] = []

        def mark(self, state) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen))

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = []
            self.mark(state)

        def on_step_end(self, args, state, control, **kwargs):
            self.mark(state)

        def summary(self, warmup: int) -> dict:
            first = min(warmup, len(self.marks) - 2)  # at least one timed step
            (s0, t0, k0), (s1, t1, k1) = self.marks[first], self.marks[-1]
            begin = self.marks[0]
            return {
                "steps": s1,
                "timed_steps": s1 - s0,
                "timed_seconds": t1 - t0,
                "timed_tokens": k1 - k0,
                "tokens_per_second": (k1 - k0) / (t1 - t0),
                "step_ms": 1000 * (t1 - t0) / (s1 - s0),
                "warmup_ms": 1000 * (t0 - begin[1]) / max(s0, 1),
                "loop_seconds": t1 - begin[1],
                "loop_tokens": k1 - begin[2],
            }

    return StepClock()


def train_worker(job: dict) -> dict:
    """One training run: the clock rides in transformers' default callbacks, so upstack's
    trainer and TRL's get it alike; the precompute pass of dpo is timed where TRL runs it."""
    import torch
    import transformers.trainer
    import trl

    from upstack.train.settings import flash_attention

    cuda = torch.cuda.is_available()
    clock = step_clock()
    transformers.trainer.DEFAULT_CALLBACKS.append(clock)
    precompute = {"seconds": 0.0}
    original = trl.DPOTrainer._precompute_ref_logps

    def timed(self, *a, **k):
        start = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            if cuda:
                torch.cuda.synchronize()
            precompute["seconds"] += time.perf_counter() - start

    trl.DPOTrainer._precompute_ref_logps = timed
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    task, model, data = job["task"], Path(job["model"]), Path(job["data"])
    work = Path(job["work"]) / job["contender"]
    work.mkdir(parents=True, exist_ok=True)
    if job["contender"] == "upstack":
        upstack_run(task, model, data, work, job["settings"])
    else:
        # what upstack's loader would pick, so the two differ in nothing but the code around
        model_kwargs = {"dtype": "auto"}
        if flash_attention():
            model_kwargs["attn_implementation"] = "flash_attention_2"
        trl_run(task, model, data, work, {**job["settings"], "use_cpu": not cuda}, model_kwargs)
    result = clock.summary(job["warmup"])
    result["precompute_seconds"] = precompute["seconds"]
    if cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return result


def generation_worker(job: dict) -> dict:
    """The transformers teacher on rephrase requests, then the eval stage's greedy solve; each
    rate over the batches after the first (which pays loading and warm-up)."""
    import asyncio
    import gc

    import torch

    from data_synth.cache import request_key
    from data_synth.exchange import Request, Runtime
    from data_synth.rephrase import _prompt
    from data_synth.seeds import ArithSeeds, load_problems
    from data_synth.teachers import TransformersTeacher, stream
    from upstack.stages.eval import MathEval, load_model, solve

    cuda = torch.cuda.is_available()
    model, count, batch, tokens = job["model"], job["requests"], job["batch"], job["tokens"]
    result: dict = {}

    seeds = load_problems(ArithSeeds(split="train", count=count), seed=42)
    sampling = {"temperature": 0.7, "top_p": 1.0, "max_tokens": tokens}
    requests = []
    for problem in seeds:
        messages = _prompt("rephrase_answer", question=problem.question, solution=problem.solution)
        key = request_key("transformers", model, messages, sampling, 0)
        requests.append(
            Request(key, "rephrase_answer", messages, sampling, 0, problem, problem.answer)
        )
    spec = TransformersTeacher(
        model=model,
        batch_size=batch,
        dtype="bfloat16" if cuda else "float32",
        device="cuda" if cuda else "cpu",
    )

    async def drain() -> list[float]:
        stamps = []
        async for _, reply in stream(spec, requests, Runtime(seed=0)):
            assert reply.text is not None
            stamps.append(time.perf_counter())
        return stamps

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stamps = asyncio.run(drain())
    # the first batch's replies come with the model's loading: timed from its end
    first = min(batch, len(stamps) - 1)
    timed = len(stamps) - first
    result["teacher"] = {
        "requests": len(stamps),
        "timed_requests": timed,
        "rephrases_per_second": timed / (stamps[-1] - stamps[first - 1]),
        "max_new_tokens": tokens,
        "batch_size": batch,
    }
    if cuda:
        result["teacher"]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        gc.collect()  # the teacher's model, before the eval stage loads its own
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    network, tokenizer = load_model(model)
    problems = load_problems(ArithSeeds(split="eval", count=count), seed=42)
    settings = MathEval(max_new_tokens=tokens, batch_size=batch)
    solve(network, tokenizer, problems[:batch], settings, desc="warm-up")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    records = solve(network, tokenizer, problems, settings, desc="eval")
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result["eval"] = {
        "problems": len(records),
        "problems_per_second": len(records) / seconds,
        "includes": "generation and grading (data_synth.verify), as the eval stage runs them",
        "max_new_tokens": tokens,
        "batch_size": batch,
    }
    if cuda:
        result["eval"]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


# --------------------------------------------------------------------------- orchestration


def build_model(path: Path, shape: dict, max_length: int, cuda: bool) -> dict:
    """upstack's init tokenizer and a random Llama of `shape` (bf16 on a GPU), unless `path`
    already holds one of that shape. Returns the shape as built (vocab rounded to 64)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from upstack.stages.init import Tokenizer, build_tokenizer

    stamp = path / "bench-shape.json"
    wanted = {**shape, "max_length": max_length, "dtype": "bfloat16" if cuda else "float32"}
    if stamp.exists() and json.loads(stamp.read_text())["wanted"] == wanted:
        return json.loads(stamp.read_text())["built"]
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(Tokenizer(vocab_size=shape["vocab_size"]), seed=0).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab = max(shape["vocab_size"], -(-len(tokenizer) // 64) * 64)
    config = LlamaConfig(
        **{**shape, "vocab_size": vocab},
        max_position_embeddings=max(4096, max_length),
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path, safe_serialization=True)
    built = {**shape, "vocab_size": vocab, "tokenizer_tokens": len(tokenizer)}
    built["parameters"] = sum(p.numel() for p in model.parameters())
    built["matmul_parameters"] = matmul_params(built)
    del model
    if cuda:
        torch.cuda.empty_cache()  # the workers get the whole GPU
    stamp.write_text(json.dumps({"wanted": wanted, "built": built}))
    return built


def mean_lengths(model: Path, sft: Path, dpo: Path, max_length: int) -> dict:
    """T of the FLOPs formula: mean tokens per sft conversation, per dpo prompt+completion."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)

    def length(messages: list[dict]) -> int:
        ids = tokenizer.apply_chat_template(messages, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return min(len(ids), max_length)

    rows = [json.loads(line) for line in sft.read_text().splitlines()]
    pairs = [json.loads(line) for line in dpo.read_text().splitlines()]
    return {
        "sft": statistics.mean(length(r["messages"]) for r in rows),
        "dpo": statistics.mean(
            length(p["prompt"] + p[side]) for p in pairs for side in ("chosen", "rejected")
        ),
    }


def run_one(job: dict, log: Path, cuda: bool) -> dict:
    """A worker subprocess; a failure (out of memory, say) is recorded, not fatal. On CPU
    (smoke) one thread each, as bench/train_overhead.py, and peak memory is the process's RSS."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(job)]
    try:
        run = run_worker(cmd, None if cuda else {"OMP_NUM_THREADS": "1"}, log=log)
    except SystemExit as err:
        tail = log.read_text().strip().splitlines()[-3:] if log.exists() else []
        return {"error": f"{err}; " + " | ".join(tail)}
    if not cuda:
        run["peak_memory_gib"] = run["peak_rss_mb"] / 1024
    return run


def with_mfu(run: dict, shape: dict, lengths: dict, peak: float | None) -> dict:
    if "tokens_per_second" not in run:
        return run
    task, precompute = run["task"], run["config"].get("precompute", True)
    per_token = train_flops_per_token(shape, lengths[task])
    if task == "dpo" and not precompute:
        per_token += reference_flops_per_token(shape, lengths[task])
    run["model_tflops_per_second"] = per_token * run["tokens_per_second"] / 1e12
    run["mfu"] = run["model_tflops_per_second"] / peak if peak else None
    if task == "dpo":  # the whole of it: every step and the precompute pass before them
        seconds = run["loop_seconds"] + run["precompute_seconds"]
        run["tokens_per_second_end_to_end"] = run["loop_tokens"] / seconds
    return run


def targets(runs: dict, label: str, device: str) -> list[dict]:
    """Each target beside the measured value; `met` is None where nothing was measured."""
    rate = {name: r.get("tokens_per_second") for name, r in runs.items()}
    found = []
    for name in sorted({n.rsplit("/", 1)[0] for n in runs}):
        mine, theirs = rate.get(f"{name}/upstack"), rate.get(f"{name}/trl")
        ratio = mine / theirs if mine and theirs else None
        found.append(
            {
                "target": f"{name}: upstack tokens/s >= 0.97 x TRL",
                "value": ratio,
                "met": None if ratio is None else ratio >= 0.97,
            }
        )
    mfus = [r["mfu"] for n, r in runs.items() if n.startswith("sft/") and r.get("mfu") is not None]
    best = max(mfus, default=None)
    found.append(
        {
            "target": "sft: best MFU >= 0.40 on an H100",
            "value": best,
            "met": None if best is None or "H100" not in device else best >= 0.40,
        }
    )
    for contender in ("upstack", "trl"):
        for ckpt in ("off", "on"):
            pre = rate.get(f"dpo/ref-precomputed/ckpt-{ckpt}/{contender}")
            inline = rate.get(f"dpo/ref-inline/ckpt-{ckpt}/{contender}")
            ratio = pre / inline if pre and inline else None
            found.append(
                {
                    "target": f"dpo {contender} ckpt-{ckpt}: precomputed ref tokens/s >= 1.3 x inline",
                    "value": ratio,
                    "met": None if ratio is None else ratio >= 1.3,
                }
            )
            whole = [
                (runs.get(f"dpo/ref-{ref}/ckpt-{ckpt}/{contender}") or {}).get(
                    "tokens_per_second_end_to_end"
                )
                for ref in ("precomputed", "inline")
            ]
            if all(whole):
                found.append(
                    {
                        "target": f"dpo {contender} ckpt-{ckpt}: the same, precompute pass "
                        "counted (one epoch)",
                        "value": whole[0] / whole[1],
                        "met": "info",
                    }
                )
    for t in found:
        t["label"] = label
    return found


def tables(result: dict) -> str:
    runs, label = result["runs"], result["label"]

    def cell(run: dict | None, key: str, fmt: str) -> str:
        if run is None:
            return ""
        if "error" in run:
            return "error"
        value = run.get(key)
        return "" if value is None else format(value, fmt)

    rows = []
    for name in sorted({n.rsplit("/", 1)[0] for n in runs}):
        mine, theirs = runs.get(f"{name}/upstack"), runs.get(f"{name}/trl")
        ratio = ""
        if mine and theirs and mine.get("tokens_per_second") and theirs.get("tokens_per_second"):
            ratio = f"{mine['tokens_per_second'] / theirs['tokens_per_second']:.3f}"
        rows.append(
            [
                name,
                cell(mine, "tokens_per_second", ".0f"),
                cell(theirs, "tokens_per_second", ".0f"),
                ratio,
                cell(mine, "mfu", ".3f"),
                cell(theirs, "mfu", ".3f"),
                cell(mine, "peak_memory_gib", ".2f"),
                cell(theirs, "peak_memory_gib", ".2f"),
                cell(mine, "step_ms", ".0f"),
                cell(mine, "precompute_seconds", ".1f") if name.startswith("dpo/") else "",
            ]
        )
    text = [f"**{label}**: {result['device']['name']}", ""]
    text.append(
        markdown_table(
            [
                "run",
                "upstack tok/s",
                "trl tok/s",
                "ratio (>=0.97)",
                "upstack MFU",
                "trl MFU",
                f"upstack peak GiB ({result['peak_memory']})",
                "trl peak GiB",
                "upstack ms/step",
                "upstack precompute s",
            ],
            rows,
        )
    )
    text += ["", markdown_table(["target", "value", "met", "label"], _target_rows(result))]
    generation = result.get("generation") or {}
    if "error" in generation:
        text += ["", f"generation: error: {generation['error']}"]
    elif generation:
        text += [
            "",
            markdown_table(
                ["generation", "rate", "batch", "max new tokens", "label"],
                [
                    [
                        "transformers teacher (rephrases/s)",
                        f"{generation['teacher']['rephrases_per_second']:.2f}",
                        generation["teacher"]["batch_size"],
                        generation["teacher"]["max_new_tokens"],
                        label,
                    ],
                    [
                        "eval math solve (problems/s)",
                        f"{generation['eval']['problems_per_second']:.2f}",
                        generation["eval"]["batch_size"],
                        generation["eval"]["max_new_tokens"],
                        label,
                    ],
                ],
            ),
        ]
    text += ["", result["flops"]["formula"]]
    return "\n".join(text)


def _target_rows(result: dict) -> list[list]:
    shown = {True: "yes", False: "NO", None: "n/a", "info": "info"}
    return [
        [
            t["target"],
            "" if t["value"] is None else f"{t['value']:.3f}",
            shown[t["met"]],
            t["label"],
        ]
        for t in result["targets"]
    ]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 7))
    for column, task in enumerate(("sft", "dpo")):
        names = sorted({n.rsplit("/", 1)[0] for n in runs if n.startswith(f"{task}/")})
        for row, key, unit in (
            (0, "tokens_per_second", "tokens/s (non-padding)"),
            (1, "peak_memory_gib", f"peak GiB: {result['peak_memory']}"),
        ):
            ax = axes[row][column]
            for offset, contender in ((-0.2, "upstack"), (0.2, "trl")):
                values = [(runs.get(f"{n}/{contender}") or {}).get(key) or 0 for n in names]
                bars = ax.bar([i + offset for i in range(len(names))], values, 0.4, label=contender)
                if key == "tokens_per_second":
                    mfus = [(runs.get(f"{n}/{contender}") or {}).get("mfu") for n in names]
                    ax.bar_label(bars, [f"{m:.0%}" if m else "" for m in mfus], fontsize=7)
            ax.set_xticks(range(len(names)), [n.split("/", 1)[1] for n in names], rotation=20)
            ax.tick_params(axis="x", labelsize=7)
            ax.set_ylabel(unit)
            ax.set_title(f"{task} (bar labels: MFU)" if row == 0 else task)
            ax.legend(fontsize=8)
    fig.suptitle(f"{result['label']}: {result['device']['name']}: upstack vs plain TRL")
    if result["label"] == SMOKE_LABEL:
        fig.text(0.5, 0.5, SMOKE_LABEL, fontsize=40, color="red", alpha=0.25, ha="center",
                 va="center", rotation=20)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 3 steps")
    parser.add_argument("--hidden", type=int, help="hidden_size (2048)")
    parser.add_argument("--layers", type=int, help="num_hidden_layers (16)")
    parser.add_argument("--heads", type=int, help="num_attention_heads (32)")
    parser.add_argument("--kv-heads", type=int, help="num_key_value_heads (8)")
    parser.add_argument("--intermediate", type=int, help="intermediate_size (5632)")
    parser.add_argument("--vocab", type=int, help="vocab_size (32000)")
    for key, (gpu, smoke) in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"{gpu} ({smoke} smoke)")
    parser.add_argument("--only", help="regex: run only the matching runs; merge into gpu.json")
    parser.add_argument("--no-generation", action="store_true", help="skip teacher and eval")
    parser.add_argument("--full-matrix", action="store_true", help="smoke: every combination")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, (gpu, smoke) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else gpu)
    base = SMOKE_SHAPE if args.smoke else GPU_SHAPE
    given = {
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "intermediate_size": args.intermediate,
        "vocab_size": args.vocab,
    }
    args.shape = {k: given[k] if given[k] is not None else v for k, v in base.items()}
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        worker = train_worker if job["kind"] == "train" else generation_worker
        print(json.dumps(worker(job)))
        return
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the workers inherit it: CPU only
    import importlib.metadata
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("no GPU here: run with --smoke (its figures are not GPU figures)")
    label = GPU_LABEL if cuda else SMOKE_LABEL
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or (peak_tflops(device_name) if cuda else None)
    liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    liger_note = "available" if liger else "unavailable" + ("" if cuda else " (no GPU)")

    started = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "logs").mkdir(exist_ok=True)
    model = WORK / "model"
    shape = build_model(model, args.shape, args.max_length, cuda)
    # sft: enough rows for every step packed full; dpo: one epoch, so the precompute pass
    # covers exactly the pairs trained on
    sft_data, dpo_data = WORK / "sft.jsonl", WORK / "dpo.jsonl"
    rows_per_pack = max(1, math.ceil(args.max_length / (60 * args.turns)))
    write_sft_rows(sft_data, args.steps * args.batch * rows_per_pack * 3 // 2, args.turns)
    write_pairs(dpo_data, args.steps * args.batch, args.turns)
    lengths = mean_lengths(model, sft_data, dpo_data, args.max_length)

    settings = {
        k: getattr(args, k) for k in ("steps", "warmup", "batch", "max_length", "turns")
    } | {"shape": shape, "smoke": args.smoke}
    previous = {}
    if args.only and (OUT / "gpu.json").exists():
        old = json.loads((OUT / "gpu.json").read_text())
        if old.get("settings") == settings and old["device"]["name"] == device_name:
            previous = old
    versions = {}
    for package in ("torch", "transformers", "trl", "accelerate", "datasets", "liger_kernel"):
        try:
            versions[package] = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    result = {
        "label": label,
        "device": {
            "name": device_name,
            "peak_bf16_tflops": peak,
            "peak_source": "--peak-tflops"
            if args.peak_tflops
            else "NVIDIA data sheet, dense bf16 (bench/gpu.py PEAK_BF16_TFLOPS)",
            "cuda": torch.version.cuda,
        },
        "versions": versions,
        "liger_kernel": liger_note,
        "peak_memory": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS",
        "flash_attention": importlib.util.find_spec("flash_attn") is not None,
        "flops": {
            "formula": FLOPS_FORMULA,
            "matmul_parameters": shape["matmul_parameters"],
            "mean_sequence_tokens": lengths,
            "train_flops_per_token": {
                task: train_flops_per_token(shape, lengths[task]) for task in lengths
            },
        },
        "settings": settings,
        "runs": previous.get("runs", {}),
        "generation": previous.get("generation"),
    }

    def save() -> None:
        result["targets"] = targets(result["runs"], label, device_name)
        result["elapsed_seconds"] = time.perf_counter() - started
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")

    jobs = []
    for i, (task, config) in enumerate(matrix(args.smoke and not args.full_matrix, liger)):
        order = ("upstack", "trl") if i % 2 == 0 else ("trl", "upstack")
        for contender in order:  # alternated, so drift hits both
            name = f"{config_name(task, config)}/{contender}"
            if args.only and not re.search(args.only, name):
                continue
            jobs.append((name, task, config, contender))
    for n, (name, task, config, contender) in enumerate(jobs, 1):
        job = {
            "kind": "train",
            "task": task,
            "contender": contender,
            "settings": trainer_settings(task, config, args, cuda),
            "model": str(model),
            "data": str(sft_data if task == "sft" else dpo_data),
            "work": str(WORK),
            "warmup": args.warmup,
        }
        run = run_one(job, WORK / "logs" / f"{name.replace('/', '_')}.log", cuda)
        run.update(task=task, contender=contender, config=config, label=label)
        run["settings"] = job["settings"]
        result["runs"][name] = with_mfu(run, shape, lengths, peak)
        shown = (
            f"{run['tokens_per_second']:.0f} tok/s, "
            f"MFU {'n/a' if run['mfu'] is None else format(run['mfu'], '.3f')}, "
            f"{run['peak_memory_gib']:.2f} GiB, {run['wall_seconds']:.0f} s"
            if "tokens_per_second" in run
            else run["error"][:300]
        )
        print(f"[{n}/{len(jobs)}] {name}: {shown} ({label})", file=sys.stderr, flush=True)
        save()

    if not args.no_generation and (not args.only or re.search(args.only, "generation")):
        job = {
            "kind": "generation",
            "model": str(model),
            "requests": args.gen_requests,
            "batch": args.gen_batch,
            "tokens": args.gen_tokens,
        }
        generation = run_one(job, WORK / "logs" / "generation.log", cuda)
        generation["label"] = label
        result["generation"] = generation
        save()

    save()
    plot(result, OUT / "gpu.png")
    print(tables(result))
    print(f"\nwrote {OUT / 'gpu.json'} and {OUT / 'gpu.png'} ({label})")


if __name__ == "__main__":
    main()
