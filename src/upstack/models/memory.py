"""What a training step holds in GPU memory, component by component, and the FLOPs it does:
pure arithmetic on a model's planned shape (upstack.models.shapes) and a stage's settings.
Nothing is loaded and torch is not imported, so a plan for a 10.7B model takes milliseconds.

Per GPU, in bytes (P = parameters, T = tokens of one micro-batch, N = GPUs the state is sharded
over, h hidden size, i intermediate size, kv key/value width, V vocabulary, L layers, b the bytes
of an activation: 2 under bf16/fp16, 4 in fp32):

  weights      every parameter in its dtype (bf16 2, fp32 4; QLoRA's NF4 base ~0.52, int8 ~1),
               trainable ones as the strategy keeps them (FSDP2 upcasts them to fp32); / N
               under ZeRO-3 and FSDP2; 0 on the GPU when parameters are offloaded
  gradients    one per trainable parameter, in its dtype; / N under ZeRO-2/3 and FSDP2
  optimizer    AdamW's two moments per trainable parameter, in its dtype (torch keeps them so:
               8 bytes for fp32, 4 for bf16) plus, under DeepSpeed with bf16/fp16, the fp32
               master copy (4 + 8 = 12: the ZeRO paper's K = 12); / N under ZeRO-1/2/3 and
               FSDP2; 0 on the GPU when offloaded
  activations  what the backward pass needs, held from the forward (`activation_bytes`)
  buffers      what the strategy allocates besides (DDP's gradient buckets, gathered shards
               under ZeRO-3/FSDP2) and, on a GPU, CUDA_RESERVE_GIB outside torch's allocator

The total is their sum, except where the gradients never meet the activations: with one
micro-batch per step (gradient_accumulation_steps 1) and torch's own optimizer state (single
device, DDP, FSDP2), the gradients of the last step were freed before the forward, and backward
frees activations as it makes gradients, so the peak holds the larger of the two. Under
DeepSpeed, or with accumulation, they are held together: the plain sum (the standard count:
16 bytes per parameter under ZeRO-3 plus activations).

tests/test_plan.py checks each component against what torch holds for real models on CPU
(within 15%); bench/out/gpu.json's H200 peaks are compared in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

GIB = 2**30
CUDA_RESERVE_GIB = (
    1.0  # upstack.core.hardware's (the models layer keeps its own copy of the number)
)
# TRL's chunked LM head (DPO): tokens and vocabulary columns of one logits tile
TILE_TOKENS, TILE_VOCAB = 4096, 32768
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# upstack.models.modeling_peer's: a PEER layer runs over pieces of the tokens whose gathered rows
# of u take at most this many bytes
PEER_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Branch:
    """A PEER branch (upscale method peer) beside the FFN of `layers`: config.json's `peer` block."""

    layers: tuple[int, ...]
    experts: int
    heads: int
    top_k: int
    key_dim: int
    query_norm: bool = True

    @classmethod
    def of(cls, block: dict | None) -> Branch | None:
        if not block:
            return None
        return cls(
            layers=tuple(block["layers"]),
            experts=block["experts"],
            heads=block["heads"],
            top_k=block["top_k"],
            key_dim=block["key_dim"],
            query_norm=bool(block.get("query_norm", True)),
        )

    def params(self, hidden: int) -> int:
        """One layer's: the query network (d x h key_dim), the two halves' sqrt(N) sub-keys of
        key_dim/2, the u and v tables (2 N d) and the query norm's weight and bias."""
        root = math.isqrt(self.experts)
        query = hidden * self.heads * self.key_dim
        norm = 2 * self.heads * self.key_dim if self.query_norm else 0
        return query + root * self.key_dim + 2 * self.experts * hidden + norm

    def active(self, hidden: int) -> int:
        """Multiply-adds a token goes through in one PEER layer (upstack.models.peer's count)."""
        return (
            hidden * self.heads * self.key_dim
            + self.heads * math.isqrt(self.experts) * self.key_dim
            + 2 * hidden * self.heads * self.top_k
        )


@dataclass(frozen=True)
class Architecture:
    """A decoder-only transformer of the Llama family (Mistral, Qwen, Gemma: the same blocks;
    biases are not counted, < 0.1% of any of them)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    experts: int = 0  # per layer, 0 for a dense model
    top_k: int = 0
    peer: Branch | None = None  # a PEER model's branches

    @classmethod
    def from_shape(cls, shape: dict | None) -> Architecture | None:
        """From a planned shape (config.json keys); None when a size is not known."""
        if not shape:
            return None
        need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        vocab = shape.get("vocab_size") or shape.get("max_vocab_size")  # init's, before it runs
        if any(shape.get(key) is None for key in need) or vocab is None:
            return None
        heads = shape["num_attention_heads"]
        experts = shape.get("num_local_experts") or shape.get("num_experts") or 0
        return cls(
            hidden=shape["hidden_size"],
            intermediate=shape.get("moe_intermediate_size") or shape["intermediate_size"],
            layers=shape["num_hidden_layers"],
            heads=heads,
            kv_heads=shape.get("num_key_value_heads") or heads,
            head_dim=shape.get("head_dim") or shape["hidden_size"] // heads,
            vocab=vocab,
            tied=bool(shape.get("tie_word_embeddings")),
            experts=experts,
            top_k=(shape.get("num_experts_per_tok") or 2) if experts else 0,
            peer=Branch.of(shape.get("peer")),
        )

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim  # H*Q

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each Linear of a layer (one expert's for gate/up/down)."""
        h, i, a, kv = self.hidden, self.intermediate, self.attention_width, self.kv_width
        return {
            "q_proj": (h, a),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (a, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def attention_params(self) -> int:
        return sum(i * o for name, (i, o) in self.linears().items() if name in LINEARS[:4])

    @property
    def mlp_params(self) -> int:
        one = 3 * self.hidden * self.intermediate
        return one * self.experts + self.hidden * self.experts if self.experts else one

    @property
    def layer_params(self) -> int:
        """attention + MLP (every expert and the router) + two RMSNorm weights."""
        return self.attention_params + self.mlp_params + 2 * self.hidden

    def branch_params(self, index: int) -> int:
        """Layer `index`'s PEER branch, 0 where it has none."""
        peer = self.peer
        return peer.params(self.hidden) if peer and index in peer.layers else 0

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        return (
            self.layers * self.layer_params
            + sum(self.branch_params(j) for j in range(self.layers))
            + self.embedding_params
            + self.head_params
            + self.hidden  # the final norm
        )

    def matmul_params(self) -> int:
        """N of the FLOPs count: parameters in matrix multiplies a token goes through (every layer's
        attention and its active experts, and the head, tied or not; not the input embedding)."""
        active = 3 * self.hidden * self.intermediate * (self.top_k or 1)
        router = self.hidden * self.experts
        branches = len(self.peer.layers) * self.peer.active(self.hidden) if self.peer else 0
        return (
            self.layers * (self.attention_params + active + router)
            + branches
            + self.vocab * self.hidden
        )


@dataclass(frozen=True)
class Trained:
    """What of the model trains (upstack.train.trainable resolves the same from the settings)."""

    layers: tuple[int, ...]
    embeddings: bool = True
    lm_head: bool = True
    final_norm: bool = True
    within: str | None = None  # only this module of each trained layer ("mlp": experts,
    # "mlp.peer": a PEER branch)
    adapter: Literal["lora", "qlora", "lora-8bit"] | None = None
    rank: int = 16
    targets: tuple[str, ...] | Literal["all-linear"] = "all-linear"
    dropout: float = 0.0

    @classmethod
    def everything(cls, arch: Architecture) -> Trained:
        return cls(layers=tuple(range(arch.layers)))


@dataclass(frozen=True)
class Parameters:
    total: int  # the model's own, as its checkpoint holds them
    trainable: int  # what requires a gradient: trained parameters, adapters and modules_to_save
    frozen: int  # the rest of the model
    quantized: int = 0  # of `frozen`: base Linear weights held in 4 or 8 bits (QLoRA, lora-8bit)
    adapter: int = 0  # of `trainable`: LoRA's A and B (fp32: peft upcasts adapters)


def parameters(arch: Architecture, trained: Trained) -> Parameters:
    """Exact counts: the planned shape's parameters; what trains (`train_layers`, embeddings, head,
    final norm; `within` a layer's MLP); LoRA's r*(in + out) per adapted Linear of the trained
    layers (every expert's under a mixture), modules_to_save as trained copies."""
    total = arch.total_params
    layer = arch.mlp_params if trained.within == "mlp" else arch.layer_params
    if trained.within == "mlp.peer":
        layer = 0  # the branch only
    if trained.adapter is None:
        trainable = sum(layer + arch.branch_params(j) for j in trained.layers)
        trainable += arch.embedding_params if trained.embeddings else 0
        if trained.lm_head and not arch.tied:
            trainable += arch.head_params
        trainable += arch.hidden if trained.final_norm else 0
        return Parameters(total, trainable, total - trainable)
    targets = LINEARS if trained.targets == "all-linear" else trained.targets
    adapter = 0
    for name, (fan_in, fan_out) in arch.linears().items():
        if name not in targets or (trained.within == "mlp" and name in LINEARS[:4]):
            continue
        copies = arch.experts if arch.experts and name in LINEARS[4:] else 1
        adapter += copies * trained.rank * (fan_in + fan_out)
    adapter *= len(trained.layers)
    saved = (arch.embedding_params if trained.embeddings else 0) + (
        arch.head_params if trained.lm_head and not arch.tied else 0
    )
    quantized = 0
    if trained.adapter in ("qlora", "lora-8bit"):
        quantized = arch.layers * (
            arch.attention_params + arch.mlp_params - arch.hidden * arch.experts
        )
    return Parameters(total, adapter + saved, total, quantized, adapter)


@dataclass(frozen=True)
class Precision:
    """weight_bytes: the dtype the weights load in (2 bf16/fp16, 4 fp32); mixed: bf16 or fp16
    compute (the trainer's bf16/fp16); device: cuda or cpu."""

    weight_bytes: int = 2
    mixed: bool = True
    device: Literal["cuda", "cpu"] = "cuda"

    @property
    def activation_bytes(self) -> int:
        return 2 if self.mixed or self.weight_bytes == 2 else 4


@dataclass(frozen=True)
class Batch:
    """One micro-batch: `rows` sequences of `length` tokens (DPO: chosen and rejected, 2 rows per
    pair; a padding-free batch: one row of every sequence back to back).

    masked: an attention mask reaches sdpa (padded rows, or packed documents masked apart, as
    TRL packs them without flash-attn), so transformers repeats the key/value heads to every head
    and sdpa keeps the mask; flash-attn needs neither. liger: Liger's RMSNorm and SwiGLU kernels
    (use_liger_kernel; TRL applies no fused cross-entropy of Liger's, it has its own LM head)."""

    rows: int
    length: int
    masked: bool = False
    checkpointing: bool = False
    liger: bool = False
    accumulation: int = 1

    @property
    def tokens(self) -> int:
        return self.rows * self.length


def layer_activation_bytes(
    arch: Architecture, batch: Batch, precision: Precision, trained: Trained | None, index: int
) -> int:
    """Bytes decoder layer `index` keeps for backward per token (autograd keeps an op's input
    only where a gradient needs it: a frozen Linear keeps none of its input):
      norms      2 x 4h: each RMSNorm's input in fp32 (a copy under bf16), for its own backward;
                 + bh its normalized product where its weight trains; + bh its output where a
                 Linear reading it trains (q/k/v, gate/up: shared); Liger's RMSNorm keeps its
                 input in the activation dtype instead: 2 x bh
      attention  b(2a + 2kv): q, k, v after RoPE and sdpa's output, which o_proj reads as a view
                 (a = heads x head_dim); with an attention mask, b x 4a: transformers repeats k
                 and v to every head; and the mask, which sdpa keeps per layer in the
                 activation dtype (`mask` of activation_bytes)
      MLP        3bi: gate (for silu), silu(gate) and up (for their product); + bi down_proj's
                 input where it trains (Liger's SwiGLU recomputes silu: 2bi + that); a mixture:
                 top_k experts' worth, and 4E of router logits
      LoRA       per adapted Linear, rb (A's output) and, with dropout, the dropped-out copy A
                 reads and what dropout keeps to undo it: 2b x its input on CPU (a float mask),
                 (b + 1) on a GPU (a bool mask)
    """
    b = precision.activation_bytes
    h, i, a, kv = arch.hidden, arch.intermediate, arch.attention_width, arch.kv_width
    whole = trained is None or (
        trained.adapter is None and index in trained.layers and trained.within is None
    )
    peer_only = trained is not None and trained.within == "mlp.peer"
    mlp_trains = whole or (
        trained is not None
        and trained.adapter is None
        and index in trained.layers
        and not peer_only
    )
    adapted: set[str] = set()
    if trained is not None and trained.adapter is not None and index in trained.layers:
        targets = LINEARS if trained.targets == "all-linear" else trained.targets
        adapted = {name for name in LINEARS if name in targets}
        if trained.within == "mlp":
            adapted -= set(LINEARS[:4])

    def reads(*names: str) -> bool:
        """A LoRA A reads this Linear's input itself (no dropout copy between)."""
        return any(n in adapted for n in names) and not trained.dropout

    k = arch.top_k or 1
    norms = 2 * b * h if batch.liger else 2 * 4 * h
    norms += 2 * b * h if whole and not batch.liger else 0  # the products, for the weights
    norms += b * h if whole or reads("q_proj", "k_proj", "v_proj") else 0
    norms += b * h if mlp_trains or reads("gate_proj", "up_proj") else 0
    attention = 4 * b * a if batch.masked else b * (2 * a + 2 * kv)
    mlp = k * (2 if batch.liger else 3) * b * i
    mlp += k * b * i if mlp_trains or reads("down_proj") else 0
    mlp += 4 * arch.experts if arch.experts else 0
    dropout = 2 * b if precision.device == "cpu" else b + 1
    lora = 0
    for name in adapted:
        fan_in = arch.linears()[name][0]
        copies = k if arch.experts and name in LINEARS[4:] else 1
        lora += copies * (trained.rank * b + (dropout * fan_in if trained.dropout else 0))
    branch = arch.peer
    peer = 0
    lowest = (
        peer_only
        and not trained.embeddings
        and bool(trained.layers)
        and index == min(trained.layers)
    )
    if lowest:
        # nothing below this branch trains: its input needs no gradient, so neither its layer's
        # attention nor its FFN keeps anything; the query network and u keep that input
        norms, attention, mlp = b * h, 0, 0
    if branch is not None and index in branch.layers:
        # the query before its norm (for the norm's backward) and after (each piece's checkpointed
        # input); the pieces' gathered rows are recomputed in backward (activation_bytes' `peer`)
        peer = (2 if branch.query_norm else 1) * b * branch.heads * branch.key_dim
        if peer_only and index in trained.layers and not lowest:
            norms += b * h  # the query network and u read the FFN's input
    return norms + attention + mlp + lora + peer


def activation_bytes(
    arch: Architecture, batch: Batch, precision: Precision, trained: Trained | None = None
) -> dict[str, int]:
    """What one micro-batch holds at the peak of its step (the start of backward), by part:
    layers  T x the sum of layer_activation_bytes over the layers backward passes through:
            from the first trained one up (below it nothing needs a gradient when the
            embeddings are frozen); with activation checkpointing T x bh per such layer (its
            input) plus one layer's full activations, recomputed in backward
    head    TRL's LM head (SFT and DPO alike), which scores tokens in tiles without the logits:
            T x (b + 4)h (the hidden states it keeps and their fp32 gradient), a tile buffer
            min(T, 4096) x 32768 x b, an fp32 4Vh gradient of a trained head; on CPU (torch
            ops for its Triton kernel) 7 fp32 temporaries of a min(T, 4096) x min(V, 32768) tile
    norm    T x (4h + 2bh): the final norm
    peer    a PEER model's one piece of tokens recomputed in backward: its gathered rows of u
            and their gradient (2 x PEER_CHUNK_BYTES at most), and where a branch trains, the
            dense N x d gradient of a table before it is added to the parameter's; later in
            backward than the head's, so the step holds the larger of the two
    mask    rows x length^2 x b per layer kept (one under checkpointing): the additive
            attention mask sdpa keeps for backward where rows are padded or documents masked
            apart (no flash-attn)
    """
    b, t = precision.activation_bytes, batch.tokens
    h, V = arch.hidden, arch.vocab
    first = 0
    if trained is not None and not trained.embeddings:
        first = min(trained.layers) if trained.layers else arch.layers
    kept = [
        layer_activation_bytes(arch, batch, precision, trained, j)
        for j in range(first, arch.layers)
    ]
    if batch.checkpointing:
        layers = t * len(kept) * b * h + t * max(kept, default=0)
    else:
        layers = t * sum(kept)
    head_trains = trained is None or (trained.lm_head and trained.adapter is None)
    tile = min(t, TILE_TOKENS)
    head = t * (b + 4) * h + tile * TILE_VOCAB * b + (4 * V * h if head_trains else 0)
    if precision.device == "cpu":
        head += 7 * 4 * tile * min(V, TILE_VOCAB)
    # the additive mask sdpa makes of transformers' boolean one, kept by every layer's backward;
    # under checkpointing only by the layer being recomputed
    copies = (1 if batch.checkpointing else len(kept)) if kept else 0
    mask = batch.rows * batch.length**2 * b * copies if batch.masked else 0
    return {
        "layers": layers,
        "head": head,
        "final_norm": t * (4 * h + 2 * b * h),
        "mask": mask,
        "peer": peer_transient(arch, batch, precision, trained, first),
    }


def peer_transient(
    arch: Architecture, batch: Batch, precision: Precision, trained: Trained | None, first: int
) -> int:
    """activation_bytes' `peer` part (0 for a model without PEER branches)."""
    branch = arch.peer
    if branch is None or not any(j >= first for j in branch.layers):
        return 0
    w = precision.weight_bytes
    row = branch.heads * branch.top_k * arch.hidden * w  # a token's gathered rows of u
    piece = min(batch.tokens, max(1, PEER_CHUNK_BYTES // row)) * row
    trains = trained is None or any(
        j in trained.layers and trained.adapter is None and trained.within in (None, "mlp.peer")
        for j in branch.layers
    )
    return 2 * piece + (branch.experts * arch.hidden * w if trains else 0)


@dataclass(frozen=True)
class Strategy:
    """How the state is spread: upstack.core.hardware.Strategy's fields (name, world, offload)."""

    name: str = "single"
    world: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False

    @classmethod
    def of(cls, other: Any) -> Strategy:
        return cls(other.name, other.world, other.offload_optimizer, other.offload_params)


@dataclass
class Component:
    bytes: float
    formula: str

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class Memory:
    """Per GPU, by component; `host` what offloading puts in each process's CPU memory."""

    weights: Component
    gradients: Component
    optimizer: Component
    activations: Component
    buffers: Component
    gradients_held: bool  # held during the forward (summed), else max(activations, gradients)
    host: float = 0.0
    parts: dict[str, int] = field(default_factory=dict)  # the activations by part

    @property
    def total(self) -> float:
        fixed = self.weights.bytes + self.optimizer.bytes + self.buffers.bytes
        if self.gradients_held:
            return fixed + self.gradients.bytes + self.activations.bytes
        return fixed + max(self.activations.bytes, self.gradients.bytes)

    def components(self) -> dict[str, Component]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "buffers": self.buffers,
        }

    def largest(self) -> str:
        return max(self.components(), key=lambda name: self.components()[name].bytes)


def memory(
    arch: Architecture,
    trained: Trained,
    batch: Batch,
    precision: Precision,
    strategy: Strategy,
    reference_copy: bool = False,
) -> Memory:
    """Memory per GPU of one training step (see the module's docstring for each component).
    `reference_copy`: DPO with its reference computed in every step from a second model (full
    training without precomputed log-probs): its weights count too."""
    counts = parameters(arch, trained)
    n, name = max(1, strategy.world), strategy.name
    zero = name.startswith("zero")
    w = precision.weight_bytes
    # bytes per trainable parameter: its weight, gradient and optimizer state as the strategy keeps them
    if name == "fsdp" and precision.mixed:
        weight, grad, optim = 4, 4, 8  # accelerate upcasts trainable parameters to fp32
        optim_formula = "8 (fp32 moments; FSDP2's trainable weights are fp32)"
    elif zero and precision.mixed:
        weight, grad, optim = 2, 2, 12
        optim_formula = "12 (fp32 master + 2 fp32 moments)"
    else:
        weight, grad, optim = w, w, 2 * w
        optim_formula = f"{2 * w} (2 moments in the weights' dtype)"
    adapter = counts.adapter  # peft keeps adapters in fp32: 4 + 4 + 8
    full = counts.trainable - adapter
    quantized = counts.quantized
    frozen_plain = counts.frozen - quantized
    q_bytes = 0.52 if trained.adapter == "qlora" else 1.0
    shard_params = n if name in ("zero3", "fsdp") else 1
    shard_grads = n if name in ("zero2", "zero3", "fsdp") else 1
    shard_optim = n if zero or name == "fsdp" else 1

    weights_bytes = (
        full * weight + adapter * 4 + frozen_plain * w + quantized * q_bytes
    ) / shard_params
    if reference_copy:
        weights_bytes += counts.total * w / shard_params
    host = 0.0
    if strategy.offload_params:
        host += weights_bytes
        weights_bytes = 0.0
    grads_bytes = (full * grad + adapter * 4) / shard_grads
    optim_bytes = (full * optim + adapter * 8) / shard_optim
    if strategy.offload_optimizer:
        host += optim_bytes + (grads_bytes if name == "fsdp" else 0)
        optim_bytes = 0.0
        if name == "fsdp":
            grads_bytes = 0.0

    parts = activation_bytes(arch, batch, precision, trained)
    # a PEER piece is recomputed in a branch layer's backward, after the head's tiles are freed
    act = sum(parts.values()) - parts["head"] - parts["peer"] + max(parts["head"], parts["peer"])

    buffers, buffer_formula = 0.0, []
    if name == "ddp":
        buffers += grads_bytes  # gradient buckets: one more copy of the gradients
        buffer_formula.append("DDP buckets = gradients")
    layer_bytes = arch.layer_params * 2
    if name == "zero3":
        buffers += 2 * max(layer_bytes, arch.embedding_params * 2) + 2 * 4 * arch.hidden**2
        buffer_formula.append("2 gathered layers (bf16) + 2 fp32 h^2 reduce buckets")
    elif name in ("zero1", "zero2"):
        buffers += 2 * 4 * arch.hidden**2
        buffer_formula.append("2 fp32 h^2 reduce buckets")
    elif name == "fsdp":
        buffers += 2 * layer_bytes + 2 * (arch.embedding_params + arch.head_params)
        buffer_formula.append("2 gathered layers + embeddings and head (bf16)")
    if precision.device == "cuda":
        buffers += CUDA_RESERVE_GIB * GIB
        buffer_formula.append(f"{CUDA_RESERVE_GIB:g} GiB CUDA context and workspaces")

    held = batch.accumulation > 1 or zero
    shard = lambda k: f" / {k}" if k > 1 else ""  # noqa: E731
    return Memory(
        weights=Component(
            weights_bytes,
            f"{full:,} x {weight} + adapters {adapter:,} x 4 + frozen {frozen_plain:,} x {w}"
            + (f" + quantized {quantized:,} x {q_bytes}" if quantized else "")
            + (" + reference copy" if reference_copy else "")
            + shard(shard_params)
            + (" (offloaded)" if strategy.offload_params else ""),
        ),
        gradients=Component(
            grads_bytes, f"{full:,} x {grad} + {adapter:,} x 4{shard(shard_grads)}"
        ),
        optimizer=Component(
            optim_bytes,
            f"{full:,} x {optim_formula} + {adapter:,} x 8{shard(shard_optim)}"
            + (" (offloaded)" if strategy.offload_optimizer else ""),
        ),
        activations=Component(
            act,
            f"{batch.rows} x {batch.length} tokens: layers {parts['layers'] / GIB:.2f}, "
            f"head {parts['head'] / GIB:.2f}, final norm {parts['final_norm'] / GIB:.2f}, "
            f"mask {parts['mask'] / GIB:.2f}"
            + (f", PEER pieces {parts['peer'] / GIB:.2f}" if parts["peer"] else "")
            + " GiB"
            + (" (checkpointed)" if batch.checkpointing else ""),
        ),
        buffers=Component(buffers, " + ".join(buffer_formula) or "none"),
        gradients_held=held,
        host=host,
        parts=parts,
    )


# --------------------------------------------------------------------------- FLOPs


FLOPS_FORMULA = (
    "per token: forward 2N + 4LWS, backward 2N + 8LWS through every layer from the lowest trained "
    "one up, and 2N for the weight gradients of what trains (full training: 6N + 12LWS, PaLM's "
    "count, Chowdhery et al. 2022, appendix B, as bench/gpu.py uses); N parameters in matrix "
    "multiplies (the head counted, not the input embedding), L layers, W = heads x head_dim, "
    "S tokens an attention spans (the row length); DPO adds the reference's forward, "
    "2N + 4LWS (precomputed or in every step). Model FLOPs: recomputation under activation "
    "checkpointing is not counted, as MFU does not."
)


def train_flops_per_token(arch: Architecture, trained: Trained, span: int) -> float:
    """FLOPS_FORMULA for one token of a training sequence whose attention spans `span` tokens."""
    n = arch.matmul_params()
    width = arch.attention_width
    per_layer_n = (n - arch.vocab * arch.hidden) / arch.layers
    lowest = 0 if trained.embeddings or not trained.layers else min(trained.layers)
    above = arch.layers - lowest
    forward = 2 * n + 4 * arch.layers * width * span
    backward = 2 * (above * per_layer_n + arch.vocab * arch.hidden) + 8 * above * width * span
    if trained.adapter is not None:
        weight_grads = 2 * parameters(arch, trained).trainable
    else:
        counts = parameters(arch, trained)
        # the trainable share of the matmul parameters (the input embedding does no matmul)
        embed = arch.embedding_params if trained.embeddings else 0
        weight_grads = 2 * min(
            n,
            counts.trainable
            - embed
            + (arch.vocab * arch.hidden if arch.tied and trained.embeddings else 0),
        )
    return forward + backward + weight_grads


def reference_flops_per_token(arch: Architecture, span: int) -> float:
    """A forward pass: 2N + 4LWS."""
    return 2 * arch.matmul_params() + 4 * arch.layers * arch.attention_width * span


def with_layers(arch: Architecture, layers: int) -> Architecture:
    return replace(arch, layers=layers)
