"""sft (and the shared training machinery): training, loss masks, adapters, guards, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, recipe_from_stages
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from upstack.core.context import StageContext
from upstack.core.errors import UserError
from upstack.core.recipe import load_recipe
from upstack.core.runner import run
from upstack.stages import sft

FAST = {
    "per_device_train_batch_size": 8,
    "learning_rate": 3e-3,
    "max_length": 128,
    "logging_steps": 1,
}
CHAT = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "Ana has 3 apples and buys 2."},
    {"role": "assistant", "content": "3 + 2 = 5. \\boxed{5}"},
    {"role": "user", "content": "And then eats one?"},
    {"role": "assistant", "content": "5 - 1 = 4. \\boxed{4}"},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sft(model, steps=12, **settings):
    return {
        "model": str(model),
        "datasets": [{"arith": {"problems": 96}}],
        "trainer": {**FAST, "max_steps": steps},
        **settings,
    }


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _first_last(curve, n=3):
    losses = [loss for _, loss in curve]
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


def _generates(path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.use_cache is True
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Ben has 4 pens."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_sft_trains_and_saves_a_plain_checkpoint(tmp_path, tiny_model):
    recipe = load_recipe(recipe_from_stages(tmp_path, {"sft": _sft(tiny_model)}))
    run(recipe, ["sft"])
    out = tmp_path / "runs" / "sft"
    metrics = json.loads((out / "upstack.json").read_text())["metrics"]
    assert metrics["steps"] == 12 and metrics["resumed_from_step"] == 0
    mask = metrics["loss_mask"]  # the answers, not the questions: a share of each example
    assert mask["mask"] == "assistant turns" and mask["examples_counted"] > 0
    assert 0 < mask["loss_tokens_per_example"] < mask["tokens_per_example"]
    first, last = _first_last(metrics["loss_curve"])
    assert last < first - 0.3, metrics["loss_curve"]
    before, after = _weights(tiny_model), _weights(out)
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before if "layers" in k)
    _generates(out)
    assert (out / "loss.png").stat().st_size > 1000
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # no pickles
    assert not (tmp_path / "runs" / ".upstack" / "work" / "sft" / "checkpoints").exists()


def _ctx(tmp_path, recipe, name):
    return StageContext(
        recipe=recipe,
        name=name,
        out_dir=tmp_path / "out",
        work_dir=tmp_path / "work",
        config_hash="test",
    )


@pytest.mark.parametrize("template", ["marks", "plain", "chatml"])
def test_sft_loss_covers_exactly_the_assistant_tokens(tmp_path, tiny_model, template):
    """Every assistant turn is trained, and nothing else: with the template's {% generation %}
    marks, with a template that has none (zephyr's, SmolLM2's: the turns are found by
    rendering), and with a template named in the recipe."""
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    settings = _sft(tiny_model, datasets=[{"path": str(data)}])
    if template == "plain":
        # given as a file, relative to the recipe: the other way `chat_template:` takes one
        (tmp_path / "plain.jinja").write_text(
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        )
        settings["chat_template"] = "plain.jinja"
    elif template == "chatml":
        settings["chat_template"] = "chatml"
    recipe = load_recipe(recipe_from_stages(tmp_path, {"sft": settings}))
    trainer = sft.build_trainer(recipe.stages["sft"], _ctx(tmp_path, recipe, "sft"))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    decode = trainer.processing_class.decode
    first, second = "3 + 2 = 5. \\boxed{5}<|im_end|>", "5 - 1 = 4. \\boxed{4}<|im_end|>"
    # without marks, a turn is all the template renders for it: its newline too
    expected = f"{first}\n{second}\n" if template == "plain" else first + second
    assert decode(ids[labels != -100]) == expected
    assert "Ana has" in decode(ids)  # the prompt is there, just not in the loss


def test_sft_without_a_chat_template_fails_before_training(tmp_path, tiny_model):
    bare = tmp_path / "bare"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.save_pretrained(bare)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    recipe = load_recipe(recipe_from_stages(tmp_path, {"sft": _sft(bare)}))
    with pytest.raises(
        UserError, match=r"stages.sft: model .*bare has no chat template; set `chat_template:`"
    ):
        run(recipe, ["sft"])
    assert not (tmp_path / "runs" / "sft").exists()


def test_lora_output_equals_base_plus_merged_adapter(tmp_path, tiny_model):
    from peft import PeftModel

    adapter = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
    recipe = load_recipe(
        recipe_from_stages(tmp_path, {"sft": _sft(tiny_model, steps=8, adapter=adapter)})
    )
    run(recipe, ["sft"])
    out = tmp_path / "runs" / "sft"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    ids = torch.tensor([[5, 60, 61, 62, 100, 200, 300, 7]])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        peft = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        torch.testing.assert_close(merged(ids).logits, peft(ids).logits, atol=1e-4, rtol=0)
    assert (merged(ids).logits - base_logits).abs().max() > 1e-3  # the adapter learned something
    assert not any("lora" in k for k in _weights(out))


@pytest.mark.parametrize("kind", ["qlora", "lora-8bit"])
def test_quantized_lora_trains_on_cpu_and_saves_full_weights(tmp_path, tiny_model, kind):
    adapter = {"type": kind, "r": 8, "alpha": 16, "dropout": 0.0}
    recipe = load_recipe(
        recipe_from_stages(tmp_path, {"sft": _sft(tiny_model, steps=10, adapter=adapter)})
    )
    run(recipe, ["sft"])
    out = tmp_path / "runs" / "sft"
    metrics = json.loads((out / "upstack.json").read_text())["metrics"]
    first, last = _first_last(metrics["loss_curve"])
    assert last < first, metrics["loss_curve"]
    weights = _weights(out)
    assert all(w.dtype == torch.float32 for w in weights.values())  # merged into full precision
    assert not torch.equal(
        weights["model.layers.0.self_attn.q_proj.weight"],
        _weights(tiny_model)["model.layers.0.self_attn.q_proj.weight"],
    )
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    _generates(out)


def test_nan_loss_stops_with_the_step(tmp_path, tiny_model):
    settings = _sft(tiny_model, steps=30)
    settings["trainer"].update(learning_rate=1e4, max_grad_norm=0.0)
    recipe = load_recipe(recipe_from_stages(tmp_path, {"sft": settings}))
    with pytest.raises(
        UserError, match=r"stages.sft: training (loss|grad_norm) is (nan|inf) at step \d+"
    ):
        run(recipe, ["sft"])
    assert not (tmp_path / "runs" / "sft").exists()


@pytest.mark.slow
def test_killed_sft_resumes_from_its_last_complete_checkpoint(tmp_path, tiny_model):
    steps = 24
    settings = _sft(tiny_model, steps=steps)
    settings["trainer"].update(save_steps=4, save_total_limit=3)
    path = recipe_from_stages(tmp_path, {"sft": settings})
    checkpoints = tmp_path / "runs" / ".upstack" / "work" / "sft" / "checkpoints"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "upstack", "run", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (checkpoints / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # a real crash: no handler runs
    proc.wait()
    complete = max(
        int(p.parent.name.split("-")[1])
        for p in checkpoints.glob("checkpoint-*/trainer_state.json")
    )
    assert complete < steps and not (tmp_path / "runs" / "sft").exists()
    # A save cut off by the crash: weights written, trainer_state.json never was.
    half = checkpoints / f"checkpoint-{complete + 4}"
    half.mkdir(exist_ok=True)
    (half / "model.safetensors").write_bytes(b"partial")
    (half / "trainer_state.json").unlink(missing_ok=True)

    run(load_recipe(path), ["sft"])
    metrics = json.loads((tmp_path / "runs" / "sft" / "upstack.json").read_text())["metrics"]
    assert metrics["resumed_from_step"] == complete and metrics["steps"] == steps
    resumed = dict(map(tuple, metrics["loss_curve"]))
    # the history from before the kill came back with the state
    assert sorted(resumed) == list(range(1, steps + 1))

    # Same data order and optimizer state: the steps after the resume match an uninterrupted run.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    run(load_recipe(recipe_from_stages(fresh, {"sft": settings})), ["sft"])
    reference = dict(
        map(
            tuple,
            json.loads((fresh / "runs" / "sft" / "upstack.json").read_text())["metrics"][
                "loss_curve"
            ],
        )
    )
    for step in range(complete + 1, steps + 1):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-4), step


def test_sigterm_saves_a_checkpoint_and_the_rerun_ends_where_an_uninterrupted_run_does(
    tmp_path, tiny_model
):
    """What Slurm sends before preemption: the stage saves a checkpoint at the end of the step,
    stops within the grace period and is marked interrupted; the rerun resumes from there and
    ends with the weights of a run that was never stopped (save_steps never came)."""
    steps = 40
    settings = _sft(tiny_model, steps=steps)
    settings["trainer"].update(save_steps=500)
    path = recipe_from_stages(tmp_path, {"sft": settings})
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
    }
    with (tmp_path / "stderr.log").open("w") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "upstack", "run", str(path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        seen = 0
        for line in proc.stdout:  # the trainer logs every step: stop once a few have run
            seen += "'loss'" in line
            if seen == 3:
                proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                break
        proc.stdout.read()
        proc.wait(120)
    assert proc.returncode == 130 and time.monotonic() - sent < 60
    last = (tmp_path / "stderr.log").read_text().strip().splitlines()[-1]
    assert "stages.sft: stopped on SIGTERM at step" in last, last
    stopped = int(last.split("at step ")[1].split(",")[0])
    assert 3 <= stopped < steps
    checkpoints = tmp_path / "runs" / ".upstack" / "work" / "sft" / "checkpoints"
    assert (checkpoints / f"checkpoint-{stopped}" / "trainer_state.json").is_file()
    recipe = load_recipe(path)
    from upstack.core.runner import states

    assert states(recipe)["sft"] == "interrupted" and not (tmp_path / "runs" / "sft").exists()

    run(recipe, ["sft"])
    metrics = json.loads((tmp_path / "runs" / "sft" / "upstack.json").read_text())["metrics"]
    assert metrics["resumed_from_step"] == stopped and metrics["steps"] == steps

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    run(load_recipe(recipe_from_stages(fresh, {"sft": settings})), ["sft"])
    resumed, uninterrupted = _weights(tmp_path / "runs" / "sft"), _weights(fresh / "runs" / "sft")
    # the same data order, optimizer and RNG state: the same weights, up to float summation
    # order (the existing resume test's 1e-4 on losses; weights agree far closer)
    worst = max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed)
    assert worst < 1e-5, worst


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_is_resumed(
    tmp_path, tiny_model, monkeypatch, capsys
):
    """A truncated optimizer.pt in the newest checkpoint (a disk that filled mid-save) must not
    make every rerun fail the same way: the checkpoint before it is resumed from."""
    import shutil

    steps = 12
    settings = _sft(tiny_model, steps=steps)
    settings["trainer"].update(save_steps=4, save_total_limit=3)
    path = recipe_from_stages(tmp_path, {"sft": settings})
    recipe = load_recipe(path)
    checkpoints = recipe.run_dir.work("sft") / "checkpoints"
    # a run that kept its checkpoints (as one killed after its last save leaves them)
    with monkeypatch.context() as patch:
        patch.setattr("upstack.train.save.shutil.rmtree", lambda *a, **k: None)
        run(recipe, ["sft"])
    shutil.rmtree(tmp_path / "runs" / "sft")
    optimizer = checkpoints / "checkpoint-12" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    capsys.readouterr()

    run(load_recipe(path), ["sft"])
    said = capsys.readouterr().err
    assert "skipping checkpoint-12: optimizer.pt is cut short or damaged" in said
    assert "set aside as checkpoint-12.damaged" in said
    metrics = json.loads((tmp_path / "runs" / "sft" / "upstack.json").read_text())["metrics"]
    assert metrics["resumed_from_step"] == 8 and metrics["steps"] == steps
