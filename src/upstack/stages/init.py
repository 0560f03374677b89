"""init stage: a model from nothing: a byte-level BPE tokenizer trained here and a small Llama."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from upstack.core.settings import StageSpec, Strict, error_at

# The stage contract (upstack.core.contract)
OUTPUT = "model"  # a checkpoint: `model:` may name this stage
LAYER_MAP = "none"  # a model of its own
LAUNCHABLE = False

# ChatML, with {% generation %} around what the assistant says: TRL's assistant-only loss
# reads those marks to build its loss mask.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


class Tokenizer(Strict):
    GENERATED: ClassVar[bool] = True  # its BPE trains on data_synth.arith text

    vocab_size: int = Field(
        1024, ge=320, description="upper bound: BPE stops when the corpus runs out of merges"
    )
    corpus_problems: int = Field(4000, ge=10, description="arithmetic problems to train the BPE on")


class Architecture(Strict):
    """A LlamaConfig subset. Linear sizes are multiples of 64 so bitsandbytes 4-bit works on CPU."""

    hidden_size: int = Field(128, ge=64, multiple_of=64)
    intermediate_size: int = Field(384, ge=64, multiple_of=64)
    num_hidden_layers: int = Field(8, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(4, ge=1)
    max_position_embeddings: int = Field(512, ge=16)
    rope_theta: float = Field(10000.0, gt=0, description="rotary embedding base")
    tie_word_embeddings: bool = False  # untied, like Mistral/Llama-2: upscale copies lm_head apart

    @model_validator(mode="after")
    def _heads_fit(self) -> Architecture:
        """Shapes transformers would only refuse when the model is built, or get wrong silently."""
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if self.hidden_size % heads:
            raise error_at(
                ("num_attention_heads",),
                f"{heads} heads do not divide hidden_size {self.hidden_size}",
            )
        if (self.hidden_size // heads) % 2:
            raise error_at(
                ("num_attention_heads",),
                f"head size {self.hidden_size // heads} (hidden_size / heads) must be even: "
                "rotary embeddings turn pairs of dimensions",
            )
        if heads % kv_heads:
            raise error_at(
                ("num_key_value_heads",),
                f"{kv_heads} key/value heads do not divide {heads} attention heads "
                "(grouped-query attention shares each key/value head among a group)",
            )
        return self


class Spec(StageSpec):
    kind: Literal["init"] = "init"
    tokenizer: Tokenizer = Field(default_factory=Tokenizer)
    architecture: Architecture = Field(default_factory=Architecture)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


def output_shape(spec: Spec, input_shape) -> dict:
    """The model init will write; its vocab size follows from the tokenizer it trains."""
    arch = spec.architecture
    return {
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_key_value_heads,
        "vocab_size": None,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "tie_word_embeddings": arch.tie_word_embeddings,
        # for a plan (upstack.models.memory): the vocabulary is at most the tokenizer's bound,
        # rounded up as `run` rounds it; the weights are written in fp32
        "max_vocab_size": -(-spec.tokenizer.vocab_size // 64) * 64,
        "dtype": "float32",
    }


def run(spec: Spec, ctx) -> dict:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(spec.tokenizer, seed=ctx.seed)
    tokenizer.save_pretrained(ctx.out_dir)
    tokenizer = AutoTokenizer.from_pretrained(ctx.out_dir)  # what every later stage will load

    config = LlamaConfig(
        # rounded up to a multiple of 64, like the Linear sizes, for 4-bit lm_head and fast matmuls
        vocab_size=-(-len(tokenizer) // 64) * 64,
        **spec.architecture.model_dump(),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(ctx.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, spec.dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
        max_new_tokens=128,
    )
    model.save_pretrained(ctx.out_dir, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    ctx.log(f"{params / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    return {
        "parameters": params,
        "vocab_size": config.vocab_size,
        "layers": config.num_hidden_layers,
    }


def build_tokenizer(spec: Tokenizer, seed: int):
    """Byte-level BPE on arithmetic word problems: any text encodes, the task's words stay short."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from data_synth.arith import corpus

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus(spec.corpus_problems, seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )
