"""PEER models (upscale's `peer` method) as the other stages see them: which model types are PEER
models, which families take a PEER branch, the registration of their classes with transformers'
Auto classes (so upstack loads them without trust_remote_code), and why a stage cannot take one.

The classes themselves are upstack.models.modeling_peer, a file that imports nothing of upstack
and is copied beside every PEER checkpoint. This module reads no torch until `register` is called.
"""

from __future__ import annotations

import math
from pathlib import Path

# The file beside a PEER checkpoint that config.json's auto_map names.
CODE_FILE = "modeling_peer.py"
CODE = Path(__file__).with_name(CODE_FILE)

# A base's model_type -> the config and causal LM classes of PEER on it, as modeling_peer.FAMILIES defines it (kept here
# as names so a recipe loads without importing torch; a test checks the two agree). The PEER
# model's model_type is the base's with `peer_` before it.
FAMILIES = {
    "llama": ("PeerLlamaConfig", "PeerLlamaForCausalLM"),
    "mistral": ("PeerMistralConfig", "PeerMistralForCausalLM"),
    "qwen2": ("PeerQwen2Config", "PeerQwen2ForCausalLM"),
    "qwen3": ("PeerQwen3Config", "PeerQwen3ForCausalLM"),
    "gemma2": ("PeerGemma2Config", "PeerGemma2ForCausalLM"),
    "gemma3_text": ("PeerGemma3TextConfig", "PeerGemma3ForCausalLM"),
    "phi3": ("PeerPhi3Config", "PeerPhi3ForCausalLM"),
    "olmo2": ("PeerOlmo2Config", "PeerOlmo2ForCausalLM"),
    "granite": ("PeerGraniteConfig", "PeerGraniteForCausalLM"),
}
PREFIX = "peer_"


def model_type(base_type: str) -> str:
    return PREFIX + base_type


def is_peer(config: dict | None) -> bool:
    """Whether a config.json (or a planned shape) is a PEER model's."""
    kind = (config or {}).get("model_type") or ""
    return kind.startswith(PREFIX) and kind.removeprefix(PREFIX) in FAMILIES


def refused(config: dict | None, why: str, text: str) -> str | None:
    """A stage that cannot take the PEER model `text` names: the line that says so, or None for
    another model."""
    if not is_peer(config):
        return None
    name = (config.get("architectures") or [config["model_type"]])[0]
    return f"{text} is a PEER model ({name}, upscale method peer): {why}"


# why each kind of stage refuses one
NO_MERGEKIT = (
    "mergekit has no definition of its PEER layers, so it cannot merge or grow it; merge or grow "
    "the base first, then add PEER"
)
NO_VLLM = (
    "vLLM has no PEER model class; use the transformers teacher (kind: transformers), which "
    "loads it"
)


def expert_count_problem(experts: int) -> str | None:
    root = math.isqrt(experts) if experts >= 0 else 0
    if experts < 4 or root * root != experts:
        near = max(2, round(math.sqrt(max(experts, 4))))
        return (
            f"must be a perfect square of at least 4 (N = n^2: two sets of n sub-keys), got "
            f"{experts}; e.g. {near * near} ({near}^2)"
        )
    return None


def active_parameters(hidden: int, settings: dict) -> int:
    """What one token passes through in one PEER layer, in multiply-adds (so 6x this is its
    training FLOPs, as 6 N counts a dense layer): the query network (d h key_dim), the scores of
    both halves' sqrt(N) sub-keys for every head (h sqrt(N) key_dim) and the h k retrieved
    neurons, each a row of u and of v (2 d h k). The k^2 candidate sums and the top-k choices
    (O(h k^2) comparisons) are left out, as norms are from the dense count."""
    heads, key_dim = settings["heads"], settings["key_dim"]
    query = hidden * heads * key_dim
    keys = heads * math.isqrt(settings["experts"]) * key_dim
    neurons = 2 * hidden * heads * settings["top_k"]
    return query + keys + neurons


_REGISTERED = False


def register() -> None:
    """Make transformers' AutoConfig and AutoModelForCausalLM know every PEER model type, so a
    PEER checkpoint loads without running the code beside it. Idempotent; cheap after the first
    call (the classes import transformers' model files, ~0.1 s once transformers is loaded)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from upstack.models import modeling_peer

    for config_class, model_class in modeling_peer.FAMILIES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    _REGISTERED = True
