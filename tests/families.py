"""The model families users bring, as tiny random checkpoints: one place for their configs.

Every family is hidden 64, two heads of 32, four layers and a vocabulary the project's tiny
tokenizer fits (its BPE, trained here, never downloaded), built from transformers' own config
class, so what a stage does with it is what it would do with the real model of that family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VOCAB = 448  # the tiny tokenizer's ~400 tokens, rounded up to a multiple of 64 as init does
HIDDEN = 64
LAYERS = 4
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": 128,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
}
WINDOW = 8  # a sliding window shorter than the test prompts, so losing it changes the logits


@dataclass(frozen=True)
class Family:
    """A family: how to build its config (the tokenizer's special ids given) and its class."""

    name: str
    config: Callable[[dict], Any]  # special token ids -> a transformers config
    model_class: str  # the transformers class the checkpoint is saved as


def _llama(ids: dict, **extra) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**COMMON, **ids, **extra)


def _mistral(ids: dict) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**COMMON, **ids, head_dim=32, sliding_window=WINDOW)


def _qwen2(ids: dict) -> Any:
    from transformers import Qwen2Config

    # Qwen2.5's small models: q/k/v biases, tied embeddings
    return Qwen2Config(**COMMON, **ids, tie_word_embeddings=True)


def _qwen3(ids: dict) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**COMMON, **ids, head_dim=32, tie_word_embeddings=True)


def _gemma2(ids: dict) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(**COMMON, **ids, head_dim=32, sliding_window=WINDOW)


def _gemma3_text(ids: dict) -> Any:
    from transformers import Gemma3TextConfig

    # layer_types: sliding, sliding, sliding, full (sliding_window_pattern 4)
    return Gemma3TextConfig(
        **COMMON, **ids, head_dim=32, sliding_window=WINDOW, sliding_window_pattern=4
    )


def _gemma3(ids: dict) -> Any:
    """Gemma 3 4B and up: the text model inside a multimodal wrapper (SigLIP vision tower)."""
    from transformers import Gemma3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    return Gemma3Config(
        text_config=_gemma3_text(ids).to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,
        image_token_index=VOCAB - 1,
        boi_token_index=VOCAB - 2,
        eoi_token_index=VOCAB - 3,
        **ids,
    )


def _phi3(ids: dict, **extra) -> Any:
    from transformers import Phi3Config

    return Phi3Config(**COMMON, **ids, **extra)


def _olmo2(ids: dict) -> Any:
    from transformers import Olmo2Config

    return Olmo2Config(**COMMON, **ids)


def _granite(ids: dict) -> Any:
    from transformers import GraniteConfig

    # Granite's multipliers, away from 1 so a stage that dropped them would change the logits
    return GraniteConfig(
        **COMMON,
        **ids,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.1,
        logits_scaling=4.0,
    )


def _mixtral(ids: dict) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(**COMMON, **ids, head_dim=32, num_local_experts=4)


def _qwen3_moe(ids: dict) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **COMMON,
        **ids,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=True,
    )


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", _llama, "LlamaForCausalLM"),
        # SmolLM2 is a Llama with tied embeddings
        Family("smollm", lambda ids: _llama(ids, tie_word_embeddings=True), "LlamaForCausalLM"),
        Family("mistral", _mistral, "MistralForCausalLM"),
        Family("qwen2", _qwen2, "Qwen2ForCausalLM"),
        Family("qwen3", _qwen3, "Qwen3ForCausalLM"),
        Family("gemma2", _gemma2, "Gemma2ForCausalLM"),
        Family("gemma3_text", _gemma3_text, "Gemma3ForCausalLM"),
        Family("gemma3", _gemma3, "Gemma3ForConditionalGeneration"),
        Family("phi3", _phi3, "Phi3ForCausalLM"),
        # Phi-4-mini: a Phi-3 with tied embeddings and a partial rotary embedding
        Family(
            "phi4_mini",
            lambda ids: _phi3(ids, tie_word_embeddings=True, partial_rotary_factor=0.75),
            "Phi3ForCausalLM",
        ),
        Family("olmo2", _olmo2, "Olmo2ForCausalLM"),
        Family("granite", _granite, "GraniteForCausalLM"),
        Family("mixtral", _mixtral, "MixtralForCausalLM"),
        Family("qwen3_moe", _qwen3_moe, "Qwen3MoeForCausalLM"),
    )
}


def build_tokenizer(out_dir: Path) -> Path:
    """The project's tiny tokenizer (init's byte-level BPE and ChatML template), saved once."""
    from upstack.stages.init import Tokenizer, build_tokenizer

    tokenizer = build_tokenizer(Tokenizer(corpus_problems=100, vocab_size=400), seed=0)
    assert len(tokenizer) <= VOCAB
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_family(name: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny random checkpoint of family `name`, with the tiny tokenizer beside it."""
    import shutil

    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    family = FAMILIES[name]
    config = family.config(ids)
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(config)
    # random init leaves some norms at exactly 1 and biases at 0: move every tensor a little,
    # so a stage that dropped or confused one would show in the logits
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    model.save_pretrained(out_dir)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, out_dir / file.name)
    return out_dir


# --------------------------------------------------------------------------- what each stage does

# the stage kinds that touch a model, as the matrix runs them (lora: sft with a default adapter)
STAGES = ("dus", "moe", "peer", "cpt", "sft", "lora", "dpo", "merge", "eval")
# mergekit-moe upcycles these into a mixture whose copies compute what the base computes
MOE_BASES = {"llama": "Mixtral", "smollm": "Mixtral", "mistral": "Mixtral", "qwen3": "Qwen3-MoE"}
MIXTURES = ("mixtral", "qwen3_moe")


@dataclass(frozen=True)
class Refusal:
    """A stage refused before anything runs: at `when` (load or preflight), one line on `key`."""

    when: str
    key: str
    message: str  # in the error line
    why: str  # the README table's tag, explained in REASONS


REASONS = {
    "wrapper": "a multimodal wrapper (text model in `text_config`, beside a vision tower): "
    "refused at load (upscale, merge) or preflight (cpt, sft, dpo); bring its text model "
    "(`Gemma3ForCausalLM`), which every stage takes",
    "tied head": "`tie_word_embeddings` where mergekit's definition of the architecture "
    "requires an `lm_head.weight` of its own (Phi-3): refused at load; untie the head first",
    "no moe output": "mergekit-moe upcycles Llama and Mistral (into Mixtral) and Qwen3 (into "
    "Qwen3-MoE) only (its Qwen2-MoE output adds a shared expert, so copies would not compute "
    "what the base computes): refused at load",
    "already moe": "the model is a mixture already: refused at load",
    "no branch": "upstack's PEER classes extend the dense FFN of Llama, Mistral, Qwen2, Qwen3, "
    "Gemma 2, Gemma 3 text, Phi-3, OLMo 2 and Granite; a mixture's experts take no branch: "
    "refused at load",
    "dropout": "LoRA with the default `dropout: 0.05`: peft adapts the fused experts and "
    "routers as parameters, which take no dropout; refused at preflight, `adapter: {dropout: 0}` "
    "works",
}
WRAPPER = "multimodal wrapper (its language model's settings are in text_config)"


def expected(family: str, stage: str) -> Refusal | None:
    """What `stage` does with a model of `family`: None when it works, else its refusal."""
    if family == "gemma3" and stage != "eval":
        when = "load" if stage in ("dus", "moe", "peer", "merge") else "preflight"
        key = "models.0.model" if stage == "merge" else "model"
        return Refusal(when, key, WRAPPER, "wrapper")
    if family == "phi4_mini" and stage in ("dus", "moe", "merge"):
        key = "models.0.model" if stage == "merge" else "model"
        message = "Phi3ForCausalLM with tie_word_embeddings: mergekit's definition of it requires"
        return Refusal("load", key, message, "tied head")
    if stage == "moe" and family not in MOE_BASES:
        message = "method moe upcycles a Llama or Mistral (into a Mixtral) or a Qwen3"
        return Refusal(
            "load", "model", message, "already moe" if family in MIXTURES else "no moe output"
        )
    if stage == "peer" and family in MIXTURES:
        message = "whose FFN upstack's PEER model classes do not extend"
        return Refusal("load", "model", message, "no branch")
    if stage == "lora" and family in MIXTURES:
        message = "0.05 does not work on a mixture of experts: peft adapts its experts"
        return Refusal("preflight", "adapter.dropout", message, "dropout")
    return None


def readme_table() -> str:
    """The family x stage table README.md shows, from `expected`, and what each refusal means."""
    header = ["family", *STAGES]
    rows = []
    for name, family in FAMILIES.items():
        cells = []
        for stage in STAGES:
            refusal = expected(name, stage)
            if refusal is not None:
                cells.append(f"refused ({refusal.why})")
            elif stage == "moe":
                cells.append(f"works: {MOE_BASES[name]}")
            else:
                cells.append("works")
        rows.append([f"{name} `{family.model_class}`", *cells])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", *(f"- *{tag}*: {text}" for tag, text in REASONS.items())]
    return "\n".join(lines)
