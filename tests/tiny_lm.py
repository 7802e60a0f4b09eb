"""A tiny real causal MoE LM and a small byte-level BPE tokenizer for task/evaluation tests.

The GPT-2 tokenizer is not available offline, so a byte-level BPE is trained on a few strings: it
can encode any text (bytes are its alphabet), which the GLUE/WikiText/XSum files need.
"""

from __future__ import annotations

import torch

_CORPUS = [
    "it 's a charming and often affecting journey . ",
    "Question: Is this sentence positive or negative?\nAnswer: positive negative",
    "Sentence 1: the cat sat on the mat\nSentence 2: a cat was sitting\nDo both sentences mean the same thing? yes no",
    "Does this response answer the question? True or False? entailment",
    " = Robert = \n Robert is an English film , television and theatre actor . He had a guest role",
    "Article: The owners said their planned development at the site would create jobs.\nOne-sentence summary:",
]


def build_tokenizer(vocab_size: int = 400):
    """Byte-level BPE wrapped in ``PreTrainedTokenizerFast`` with ``<pad>``/``<eos>``; adds no bos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def build_model(tokenizer, *, seed: int = 0, max_positions: int = 128):
    """Tiny ``MixtralForCausalLM`` (hidden 32, 2 layers, 4 experts, top-2), random weights, eval mode."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init, so choices and argmaxes differ clearly
        model.lm_head.weight.mul_(20.0)
    return model.eval()
