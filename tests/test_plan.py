"""upstack plan: the memory model against what torch holds on CPU, component by component; a
stage that cannot fit refused before the run; `target_layers: auto` sized by hand-checked
arithmetic; the solar plan in README.md as the command prints it."""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import replace

import pytest
from conftest import ROOT, build_tiny_model, recipe_from_stages, run_cli

from upstack.core.recipe import load_recipe
from upstack.core.runner import context
from upstack.models.memory import (
    Architecture,
    Batch,
    Precision,
    Strategy,
    Trained,
    memory,
    parameters,
    train_flops_per_token,
)
from upstack.models.shapes import read_shape

TOLERANCE = 0.15  # the issue's: each component within 15% of what was measured

# --------------------------------------------------------------------------- measured on CPU

# A 3.3M-parameter Llama (GQA: 4 heads, 2 for keys and values): activations outweigh the
# gradients at 4 rows of 128 tokens, so the step's peak is the one activations make.
ARCHITECTURE = {
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
TRAINER = {
    "max_steps": 2,
    "per_device_train_batch_size": 4,
    "max_length": 128,
    "learning_rate": 1e-4,
    "logging_steps": 1,
    "save_steps": 1000,
}


class Allocations:
    """Storages torch allocates while active (a dispatch mode on every op's outputs, each freed
    storage subtracted when it dies), and the peak of their sum: what torch's allocator would
    report as allocated over the step. Storages alive before (weights, optimizer state) are not
    counted."""

    def __init__(self, existing):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if hasattr(t, "untyped_storage"):
                        outer.add(t.untyped_storage())
                return out

        self.mode, self.current, self.peak = Mode(), 0, 0
        self.seen = {s.data_ptr() for s in existing}

    def add(self, storage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if key in self.seen or not size:
            return
        self.seen.add(key)
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self.free, key, size)

    def free(self, key, size) -> None:
        self.seen.discard(key)
        self.current -= size


def storages_bytes(tensors) -> int:
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(unique.values())


def measure_step(trainer) -> dict:
    """Train two steps; during the second (optimizer state allocated, no gradient left over),
    what the weights, gradients, optimizer state and the forward+backward's new allocations
    (activations and the loss's transients) take, and the micro-batch's shape."""
    import torch
    from transformers import TrainerCallback

    found: dict = {}
    model = trainer.model

    def shape_of_batch(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if torch.is_grad_enabled() and ids is not None and "tracker" in found:
            found["batch"] = tuple(ids.shape)

    def held_after_forward(module, args, kwargs, output):
        if torch.is_grad_enabled() and "tracker" in found and "forward" not in found:
            found["forward"] = found["tracker"].current

    hook = model.register_forward_pre_hook(shape_of_batch, with_kwargs=True)
    after = model.register_forward_hook(held_after_forward, with_kwargs=True)

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step != 1:
                return
            params = list(model.parameters())
            states = [
                t
                for s in trainer.optimizer.state.values()
                for t in s.values()
                if torch.is_tensor(t)
            ]
            found["weights"] = storages_bytes(params)
            found["tracker"] = Allocations([t.untyped_storage() for t in params + states])
            found["tracker"].mode.__enter__()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if "tracker" in found and "activations" not in found:
                found["activations"] = found["tracker"].peak
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                found["gradients"] = storages_bytes(grads)

        def on_step_end(self, args, state, control, **kwargs):
            if "tracker" in found and "optimizer" not in found:
                found["tracker"].mode.__exit__(None, None, None)
                found["optimizer"] = storages_bytes(
                    t
                    for s in trainer.optimizer.state.values()
                    for t in s.values()
                    if torch.is_tensor(t) and t.dim() > 0
                )

    trainer.add_callback(Measure())
    try:
        trainer.train()
    finally:
        hook.remove()
        after.remove()
    return found


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """The model's own run of each contender (cpt full, LoRA and a layer subset; dpo with its
    reference precomputed; sft on padded conversations), measured."""
    import torch

    from upstack.stages import cpt, dpo, sft
    from upstack.train.settings import trainer_settings
    from upstack.train.spec import Adapter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("measured")
    model = build_tiny_model(directory, **ARCHITECTURE)
    text = [{"arith": {"problems": 64}}]
    stages = {
        "cpt_full": {"kind": "cpt", "model": str(model), "datasets": text, "trainer": TRAINER},
        "cpt_lora": {
            "kind": "cpt",
            "model": str(model),
            "datasets": text,
            "trainer": TRAINER,
            "adapter": {"r": 8, "alpha": 16},  # dropout 0.05, the default
        },
        "cpt_layers": {
            "kind": "cpt",
            "model": str(model),
            "datasets": text,
            "trainer": TRAINER,
            "train_layers": [2, 3],
        },
        "dpo_full": {
            "kind": "dpo",
            "model": str(model),
            "datasets": [{"generated": {"task": "listops", "problems": 16}}],
            "trainer": {**TRAINER, "per_device_train_batch_size": 2, "beta": 0.1},
        },
        "sft_full": {
            "kind": "sft",
            "model": str(model),
            "datasets": [{"arith": {"problems": 32}}],
            "trainer": TRAINER,
        },
        # PEER branches (upscale method peer) in two layers, only they train: the tables' weights,
        # gradients and moments, the queries kept, one piece recomputed, the tables' dense gradients
        "up_peer": {
            "kind": "upscale",
            "model": str(model),
            "method": "peer",
            "layers": [1, 2],
            **{"experts": 1024, "heads": 4, "top_k": 8, "key_dim": 32},
        },
        "cpt_peer": {
            "kind": "cpt",
            "model": "up_peer",
            "datasets": text,
            "trainer": TRAINER,
            "train_layers": "peer",
        },
    }
    (directory / "plan").mkdir()  # the model's own fixture recipe owns directory/runs
    path = recipe_from_stages(directory / "plan", stages)
    done = run_cli("run", str(path), "up_peer")  # the PEER model cpt_peer trains
    assert done.returncode == 0, done.stderr
    recipe = load_recipe(path)
    modules = {"cpt": cpt, "dpo": dpo, "sft": sft}
    shape = read_shape(model, sizes=True)
    peer_shape = read_shape(directory / "plan" / "runs" / "up_peer", sizes=True)
    results = {}
    try:
        for name, spec in recipe.stages.items():
            if spec.kind not in modules:
                continue
            ctx = context(recipe, name, "", work=directory / "work" / name)
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            module = modules[spec.kind]
            trainer = module.build_trainer(spec, ctx)
            found = measure_step(trainer)
            settings = trainer_settings(spec, module.stage_defaults)
            results[name] = (spec, ctx, settings, found)
    finally:
        torch.set_num_threads(threads)
    assert isinstance(recipe.stages["cpt_lora"].adapter, Adapter)
    return {name: peer_shape if name == "cpt_peer" else shape for name in results}, results


def modelled(shape, spec, ctx, settings, found) -> dict:
    """The memory model's count for what was measured: this machine's settings (CPU: fp32, no
    checkpointing), the micro-batch's real shape (the plan's is the worst case, max_length)."""
    from upstack.train.plan import memory_of, setup

    planned = setup(spec, settings, shape, ctx, device="cpu")
    rows, length = found["batch"]
    planned.batch = replace(planned.batch, rows=rows, length=length)
    counted = memory_of(planned, Strategy("single", 1))
    out = {name: c.bytes for name, c in counted.components().items()}
    # what the forward leaves for backward: every layer's activations, the final norm's, and the
    # hidden states the LM head keeps (b x h per token)
    parts = counted.parts
    b = planned.precision.activation_bytes
    out["forward"] = parts["layers"] + parts["final_norm"] + parts["mask"]
    out["forward"] += planned.batch.tokens * b * planned.arch.hidden
    return out


@pytest.mark.parametrize(
    "name", ["cpt_full", "cpt_lora", "cpt_layers", "dpo_full", "sft_full", "cpt_peer"]
)
def test_memory_model_matches_what_torch_holds_on_cpu(measured, name):
    shapes, results = measured
    spec, ctx, settings, found = results[name]
    counted = modelled(shapes[name], spec, ctx, settings, found)
    rows = []
    for component in ("weights", "gradients", "optimizer", "activations", "forward"):
        ratio = counted[component] / found[component]
        rows.append(
            f"{component}: modelled {counted[component] / 2**20:.2f} MiB, measured "
            f"{found[component] / 2**20:.2f} MiB, ratio {ratio:.3f}"
        )
    print(f"\n{name} (batch {found['batch']})\n" + "\n".join(rows))
    for component in ("weights", "gradients", "optimizer", "activations", "forward"):
        ratio = counted[component] / found[component]
        assert abs(ratio - 1) <= TOLERANCE, f"{found['batch']}\n" + "\n".join(rows)


# --------------------------------------------------------------------------- refused before the run


def test_a_stage_that_cannot_fit_is_refused_before_the_run(tmp_path, tiny_model):
    """64 rows of 4096 tokens on the 1.9M-parameter model: activations of about 15 GiB, more than
    a 4 GB GPU and less than an 80 GB one. The GPUs are the recipe's `launch.gpus` (a CPU
    machine has none of its own to check against); the refusal names the stage, the need and
    what is available, before anything is written; --no-fit-check runs it anyway."""
    stages = {
        "cpt": {
            "model": str(tiny_model),
            "datasets": [{"arith": {"problems": 16}}],
            "trainer": {"per_device_train_batch_size": 64, "max_length": 4096, "max_steps": 1},
        }
    }
    recipe = recipe_from_stages(tmp_path, stages)
    small = run_cli("run", str(recipe), "--dry-run", "--set", "launch.gpus=1x4GB")
    assert small.returncode == 2, small.stderr
    line = small.stderr.strip()
    assert len(line.splitlines()) == 1
    need = float(re.search(r"needs ([\d.]+) GiB per GPU", line).group(1))
    assert 4 < need < 80
    assert (
        "stages.cpt: needs" in line
        and "more than the 4 GiB of each GPU" in line
        and "--no-fit-check" in line
    )
    assert not (tmp_path / "runs").exists()  # nothing written
    large = run_cli("run", str(recipe), "--dry-run", "--set", "launch.gpus=1x80GB")
    assert large.returncode == 0 and "would run [1/1] cpt" in large.stdout, large.stderr
    anyway = run_cli(
        "run", str(recipe), "--dry-run", "--no-fit-check", "--set", "launch.gpus=1x4GB"
    )
    assert anyway.returncode == 0, anyway.stderr
    # the plan's --json says the same for tools
    planned = run_cli("plan", str(recipe), "--gpus", "1x4GB", "--json")
    stage = json.loads(planned.stdout)["stages"][0]
    assert stage["fits"] is False and stage["memory_per_gpu_gb"] == pytest.approx(need, abs=0.05)


# --------------------------------------------------------------------------- the depth from the GPUs

# A 32-layer model, hidden 1024, intermediate 4096, 8 heads (no GQA), vocab 32000, bf16, grown by
# DUS with `target_layers: auto` and continued on one GPU: 1 row of 2048 tokens, 2 micro-batches
# per step, activation checkpointing (upstack's GPU default), no flash-attn (sdpa with a mask).
SOURCE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def by_hand(s: int) -> int:
    """Bytes per GPU for cpt of the s-layer DUS model, counted by hand:
    parameters P = 16,779,264 s (4h^2 + 3hi + 2h per layer) + 65,537,024 (2Vh + h);
    bf16 weights on one device, AdamW's moments in bf16: weights 2P, gradients 2P (held: two
    micro-batches per step), optimizer 4P: 8P = 134,234,112 s + 524,296,192.
    Activations of 2048 tokens (b = 2): each layer's checkpointed input 2048 x 2h = 4,194,304 s;
    the layer recomputed in backward 2048 x (16h + 8h + 8i) = 117,440,512 (norms 8h + 4 x 2h,
    q + repeated k, v + output 4 x 2h, MLP 4 x 2i); sdpa's mask once 2048^2 x 2 = 8,388,608; the
    final norm 2048 x 8h = 16,777,216; TRL's LM head 2048 x 6h + a 2048 x 32768 x 2 tile + a
    4Vh fp32 gradient = 12,582,912 + 134,217,728 + 131,072,000: 4,194,304 s + 420,478,976.
    Buffers: 1 GiB of CUDA context. Total 138,428,416 s + 2,018,516,992."""
    return 138_428_416 * s + 2_018_516_992


@pytest.mark.parametrize(("gpu", "depth"), [("8GB", 46), ("10GB", 62)])
def test_target_layers_auto_picks_the_largest_depth_that_fits(tmp_path, gpu, depth):
    # 8 GiB: (8 x 2^30 - 2,018,516,992) / 138,428,416 = 47.5 -> 46, the largest even count
    # 10 GiB: (10 x 2^30 - 2,018,516,992) / 138,428,416 = 62.98 -> 62; 64 (= 2n) does not fit
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(SOURCE))
    stages = {
        "upscale": {"model": str(source), "target_layers": "auto"},
        "cpt": {
            "model": "upscale",
            "datasets": [{"arith": {"problems": 16}}],
            "trainer": {
                "per_device_train_batch_size": 1,
                "gradient_accumulation_steps": 2,
                "max_length": 2048,
                "max_steps": 10,
            },
        },
    }
    path = recipe_from_stages(tmp_path, stages)
    recipe = load_recipe(path, [f"launch.gpus=1x{gpu}"])
    memory_gib = float(gpu.removesuffix("GB"))
    assert by_hand(depth) <= memory_gib * 2**30 < by_hand(depth + 2)
    spec = recipe.stages["upscale"]
    assert (spec.target_layers, spec.drop_layers) == (depth, None)  # as if written
    search = recipe.settled["upscale"]
    assert search["target_layers"] == depth and search["source_layers"] == 32
    assert search["need_gb"] == pytest.approx(by_hand(depth) / 2**30, abs=1e-3)
    bound = search["bound_by"]
    assert bound["target_layers"] == depth + 2
    assert bound["memory_per_gpu_gb"] == pytest.approx(by_hand(depth + 2) / 2**30, abs=1e-3)
    assert bound["largest"] == "optimizer"  # 4P: the component that grows fastest with depth
    # the plan says so, and the hash is the one `target_layers: <depth>` written out gives
    written = load_recipe(path, [f"stages.upscale.target_layers={depth}"])
    from upstack.core.hashing import stage_hashes

    assert stage_hashes(recipe) == stage_hashes(written)
    shown = run_cli("plan", str(path), "--gpus", f"1x{gpu}", "--fit")
    assert shown.returncode == 0, shown.stderr
    assert f"target_layers auto -> {depth}: the deepest DUS model" in shown.stdout


def test_target_layers_auto_needs_the_gpus(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(SOURCE))
    stages = {
        "upscale": {"model": str(source), "target_layers": "auto"},
        "cpt": {"model": "upscale", "datasets": [{"arith": {"problems": 16}}]},
    }
    result = run_cli("status", str(recipe_from_stages(tmp_path, stages)))
    assert result.returncode == 2
    assert "stages.upscale.target_layers: auto sizes the model for the GPUs" in result.stderr
    assert "launch.gpus" in result.stderr


# --------------------------------------------------------------------------- README


def test_readme_shows_the_solar_plan_as_the_command_prints_it():
    """README's "Plan before you rent" block is this command's output, number for number."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- solar plan -->\n```\n\$ (upstack plan [^\n]*)\n(.*?)```", text, re.S)
    command, shown = block.group(1), block.group(2)
    result = run_cli(*command.split()[1:], cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == shown


# --------------------------------------------------------------------------- arithmetic


SOLAR = {**SOURCE, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 48}
SOLAR.update(num_attention_heads=32, num_key_value_heads=8)


def test_solar_under_zero3_is_the_standard_count():
    """10.7B parameters counted from the shape; AdamW in mixed precision under ZeRO-3 over 8
    GPUs: 16 bytes per parameter (2 weights + 2 gradients + 12 fp32 master and moments) / 8."""
    arch = Architecture.from_shape(SOLAR)
    assert arch.total_params == 10_731_524_096 == 48 * 218_112_000 + 2 * 32000 * 4096 + 4096
    trained = Trained.everything(arch)
    batch = Batch(rows=4, length=4096, masked=True, checkpointing=True, accumulation=8)
    counted = memory(arch, trained, batch, Precision(), Strategy("zero3", 8))
    state = counted.weights.bytes + counted.gradients.bytes + counted.optimizer.bytes
    assert state == 16 * arch.total_params / 8
    assert counted.gradients_held  # DeepSpeed's buffers: the plain sum
    assert counted.total == state + counted.activations.bytes + counted.buffers.bytes
    # the same model elsewhere: DDP keeps everything on every GPU (torch's AdamW in bf16: 8
    # bytes) and a bucket copy of the gradients; FSDP2 shards 16 bytes (fp32 trainable
    # weights); offloading the optimizer moves it to the host
    ddp = memory(arch, trained, batch, Precision(), Strategy("ddp", 8))
    assert ddp.weights.bytes + ddp.gradients.bytes + ddp.optimizer.bytes == 8 * arch.total_params
    fsdp = memory(arch, trained, batch, Precision(), Strategy("fsdp", 8))
    assert fsdp.weights.bytes + fsdp.gradients.bytes + fsdp.optimizer.bytes == state
    offload = memory(arch, trained, batch, Precision(), Strategy("zero3", 8, True))
    assert offload.optimizer.bytes == 0 and offload.host == counted.optimizer.bytes
    # LoRA r=16 on every Linear of every layer: r(in + out) each, in fp32
    lora = parameters(arch, replace(trained, adapter="lora", embeddings=False, lm_head=False))
    per_layer = 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 2 * (4096 + 14336) + 18432)
    assert lora.trainable == lora.adapter == 48 * per_layer
    # full training's FLOPs are bench/gpu.py's PaLM count
    assert (
        train_flops_per_token(arch, trained, 4096)
        == 6 * arch.matmul_params() + 12 * 48 * 4096 * 4096
    )


def test_gpus_and_launches_are_read_as_written():
    from upstack.core.hardware import Machine, launch_strategy, parse_gpus
    from upstack.core.recipe import Launch

    h100 = parse_gpus("8xH100-80GB")
    assert (h100.count, h100.memory_gib, h100.tflops) == (8, 80, 989.4)
    assert parse_gpus("8", "40GB").memory_gib == 40 and parse_gpus("H200").count == 1
    assert parse_gpus("2x24GB").tflops is None
    with pytest.raises(ValueError, match="unknown GPU"):
        parse_gpus("8xV100-32GB")
    configs = ROOT / "recipes" / "accelerate"
    for name, expected in (("ddp", "ddp"), ("zero3", "zero3"), ("fsdp", "fsdp")):
        launch = Launch(accelerate_config=str(configs / f"{name}.yaml"))
        assert launch_strategy(launch, 8).name == expected
    assert launch_strategy(Launch(), 8).name == "single"
    assert isinstance(Machine(h100, launch_strategy(Launch())), Machine)
