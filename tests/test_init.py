from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_loads_and_masks_assistant_tokens(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.num_hidden_layers == 8
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tokenizer)
    messages = [
        {"role": "user", "content": "Ana has 3 apples."},
        {"role": "assistant", "content": "The answer is \\boxed{3}."},
    ]
    out = tokenizer.apply_chat_template(
        messages, return_dict=True, return_assistant_tokens_mask=True
    )
    kept = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(kept) == "The answer is \\boxed{3}.<|im_end|>"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.decode(tokenizer("Ben has 12 coins.").input_ids) == "Ben has 12 coins."
