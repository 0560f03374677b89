"""PEER (Parameter Efficient Expert Retrieval, He 2024, "Mixture of A Million Experts") beside the
FFN of a decoder's layers: the model classes of a grown model's own model type.

This file stands alone (torch and transformers only): upscale's `peer` method copies it beside
the weights, and config.json's `auto_map` names its classes, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads the model where
upstack is not installed; upstack registers the same classes with transformers' Auto classes and
loads it without remote code.

A PEER layer holds N experts, each one neuron e_i(x) = act(u_i . x) v_i, with u and v two N x d
tables. A token's query (h heads, each of key_dim) is split in two halves, each scored against
sqrt(N) sub-keys; the top k of each half give k^2 candidate experts (i, j) with score
s_i + s'_j, of which the top k are taken: the exact top k over all N experts, at a cost of
O((sqrt(N) + k^2) key_dim) per head instead of O(N key_dim). Their scores (softmax or relu over
the k) weight the k neurons; h heads share one pool, so a token passes through h k neurons.
The branch reads what the layer's FFN reads and adds to its output; with v = 0 at insertion the
grown model computes exactly what the base computed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

try:  # transformers 5: initialisers that leave weights loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers
    from torch.nn import init

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
# A forward runs over pieces of the tokens, each small enough that its gathered rows of u (tokens
# x h k x d) take at most this many bytes: peak memory is bounded by it, whatever N and however
# many tokens a batch has. (v's rows are never gathered: embedding_bag sums them weighted.)
CHUNK_BYTES = 64 * 2**20


class PEER(nn.Module):
    """One PEER layer: product-key retrieval of `top_k` of `experts` single-neuron experts per
    head. `settings` is config.json's `peer` block (experts, heads, top_k, key_dim, query_norm,
    activation, score)."""

    def __init__(self, hidden_size: int, settings: dict):
        super().__init__()
        self.experts = int(settings["experts"])
        self.keys_per_half = math.isqrt(self.experts)  # sqrt(N) sub-keys per half
        self.heads = int(settings["heads"])
        self.top_k = int(settings["top_k"])
        self.key_dim = int(settings["key_dim"])
        self.activation = settings.get("activation", "gelu")
        self.score = settings.get("score", "softmax")
        # tokens per piece; default: as many as CHUNK_BYTES allows
        self.chunk_tokens = settings.get("chunk_tokens")
        self.query = nn.Linear(hidden_size, self.heads * self.key_dim, bias=False)
        # batch norm of the queries (the paper's): spreads them, so more experts are retrieved
        self.query_norm = (
            nn.BatchNorm1d(self.heads * self.key_dim) if settings.get("query_norm", True) else None
        )
        self.sub_keys = nn.Parameter(torch.empty(2, self.keys_per_half, self.key_dim // 2))
        self.down = nn.Parameter(torch.empty(self.experts, hidden_size))  # u_i
        self.up = nn.Parameter(torch.empty(self.experts, hidden_size))  # v_i: 0 at insertion
        # set by a trainer to count retrievals: called with (module, expert indices)
        self.on_retrieval = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation at insertion: u_i . x and the key scores of unit scale for inputs of
        unit scale, v = 0 (the branch adds nothing until v trains)."""
        hidden = self.down.shape[1]
        init.normal_(self.query.weight, std=hidden**-0.5)
        init.normal_(self.sub_keys, std=(self.key_dim // 2) ** -0.5)
        init.normal_(self.down, std=hidden**-0.5)
        init.zeros_(self.up)
        if self.query_norm is not None:
            init.ones_(self.query_norm.weight)
            init.zeros_(self.query_norm.bias)
            init.zeros_(self.query_norm.running_mean)
            init.ones_(self.query_norm.running_var)
            init.zeros_(self.query_norm.num_batches_tracked)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        queries = self._normed(self.query(x))  # the norm sees every token, not a piece
        per_token = self.heads * self.top_k * x.shape[1] * self.down.element_size()
        chunk = int(self.chunk_tokens or max(1, CHUNK_BYTES // per_token))
        pieces = []
        for start in range(0, x.shape[0], chunk):
            args = (x[start : start + chunk], queries[start : start + chunk])
            if self.training and torch.is_grad_enabled():
                # keep no piece's gathered rows for the backward pass: recompute them there
                out, experts = checkpoint(self._experts, *args, use_reentrant=False)
            else:
                out, experts = self._experts(*args)
            if self.on_retrieval is not None:  # here, not in the recomputed forward: once a token
                self.on_retrieval(self, experts)
            pieces.append(out)
        return torch.cat(pieces).view(shape)

    def _normed(self, queries: torch.Tensor) -> torch.Tensor:
        norm = self.query_norm
        if norm is None:
            return queries
        # batch statistics need two tokens; one (a training batch of one token) uses the running ones
        batch = self.training and queries.shape[0] > 1
        return F.batch_norm(
            queries,
            norm.running_mean,
            norm.running_var,
            norm.weight,
            norm.bias,
            training=batch,
            momentum=norm.momentum,
            eps=norm.eps,
        )

    def retrieve(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, expert indices), each tokens x heads x top_k: product-key top-k."""
        tokens = queries.shape[0]
        halves = queries.view(tokens, self.heads, 2, self.key_dim // 2)
        scores = torch.einsum("thpd,pkd->thpk", halves, self.sub_keys)  # t, h, 2, sqrt(N)
        best, index = scores.topk(self.top_k, dim=-1)  # t, h, 2, k
        sums = best[:, :, 0, :, None] + best[:, :, 1, None, :]  # t, h, k, k
        experts = index[:, :, 0, :, None] * self.keys_per_half + index[:, :, 1, None, :]
        top, position = sums.flatten(2).topk(self.top_k, dim=-1)  # t, h, k
        return top, experts.flatten(2).gather(-1, position)

    def _experts(self, x: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the branch's output, the experts retrieved) for a piece of the tokens."""
        scores, experts = self.retrieve(queries)
        weights = scores.softmax(dim=-1) if self.score == "softmax" else F.relu(scores)
        tokens = x.shape[0]
        flat = experts.view(tokens, -1)  # t, h k
        down = F.embedding(flat, self.down)  # t, h k, d: the retrieved rows only
        neurons = ACTIVATIONS[self.activation](torch.bmm(down, x.unsqueeze(-1)).squeeze(-1))
        weighted = neurons * weights.view(tokens, -1).to(neurons.dtype)
        # sum_j weighted_j v_(expert j), without gathering v's rows
        out = F.embedding_bag(flat, self.up, per_sample_weights=weighted, mode="sum")
        return out, experts


class _WithPeer:
    """Mixed into a family's FFN class: its output plus the PEER branch's, on the same input."""

    def __init__(self, config):
        super().__init__(config)
        self.peer = PEER(config.hidden_size, config.peer)

    def forward(self, hidden_states, *args, **kwargs):
        return super().forward(hidden_states, *args, **kwargs) + self.peer(hidden_states)


_FFN_CLASSES: dict[type, type] = {}


def _ffn_with_peer(ffn_class: type) -> type:
    if ffn_class not in _FFN_CLASSES:
        name = f"{ffn_class.__name__}WithPeer"
        _FFN_CLASSES[ffn_class] = type(name, (_WithPeer, ffn_class), {"__module__": __name__})
    return _FFN_CLASSES[ffn_class]


class _PeerModel:
    """Mixed into a family's causal LM: the layers config.json's `peer.layers` names get a PEER
    branch beside their FFN (`model.layers.<i>.mlp.peer.*`); every other tensor is named as in
    the base, so its checkpoint's tensors load as they are."""

    _auto_class = "AutoModelForCausalLM"  # save_pretrained writes this file and auto_map

    def __init__(self, config):
        super().__init__(config)
        for index in config.peer["layers"]:
            layer = self.model.layers[index]
            layer.mlp = _ffn_with_peer(type(layer.mlp))(config)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, PEER):
            module.reset_parameters()
        else:
            super()._init_weights(module)


def _family(config_class: type, model_class: type) -> tuple[type, type]:
    """The config and causal LM classes of PEER on one family: model_type `peer_<family's>`."""
    prefix = f"Peer{config_class.__name__.removesuffix('Config')}"
    config = type(
        f"{prefix}Config",
        (config_class,),
        {
            "model_type": f"peer_{config_class.model_type}",
            "_auto_class": "AutoConfig",
            "__module__": __name__,
        },
    )
    model = type(
        f"Peer{model_class.__name__}",
        (_PeerModel, model_class),
        {"config_class": config, "__module__": __name__},
    )
    return config, model


PeerLlamaConfig, PeerLlamaForCausalLM = _family(LlamaConfig, LlamaForCausalLM)
PeerMistralConfig, PeerMistralForCausalLM = _family(MistralConfig, MistralForCausalLM)
PeerQwen2Config, PeerQwen2ForCausalLM = _family(Qwen2Config, Qwen2ForCausalLM)
PeerQwen3Config, PeerQwen3ForCausalLM = _family(Qwen3Config, Qwen3ForCausalLM)
PeerGemma2Config, PeerGemma2ForCausalLM = _family(Gemma2Config, Gemma2ForCausalLM)
PeerGemma3TextConfig, PeerGemma3ForCausalLM = _family(Gemma3TextConfig, Gemma3ForCausalLM)
PeerPhi3Config, PeerPhi3ForCausalLM = _family(Phi3Config, Phi3ForCausalLM)
PeerOlmo2Config, PeerOlmo2ForCausalLM = _family(Olmo2Config, Olmo2ForCausalLM)
PeerGraniteConfig, PeerGraniteForCausalLM = _family(GraniteConfig, GraniteForCausalLM)

# the base's model_type -> (config class, causal LM class) of PEER on it
FAMILIES: dict[str, tuple[type, type]] = {
    base.model_type: (config, model)
    for base, config, model in (
        (LlamaConfig, PeerLlamaConfig, PeerLlamaForCausalLM),
        (MistralConfig, PeerMistralConfig, PeerMistralForCausalLM),
        (Qwen2Config, PeerQwen2Config, PeerQwen2ForCausalLM),
        (Qwen3Config, PeerQwen3Config, PeerQwen3ForCausalLM),
        (Gemma2Config, PeerGemma2Config, PeerGemma2ForCausalLM),
        (Gemma3TextConfig, PeerGemma3TextConfig, PeerGemma3ForCausalLM),
        (Phi3Config, PeerPhi3Config, PeerPhi3ForCausalLM),
        (Olmo2Config, PeerOlmo2Config, PeerOlmo2ForCausalLM),
        (GraniteConfig, PeerGraniteConfig, PeerGraniteForCausalLM),
    )
}
