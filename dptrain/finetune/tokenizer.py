"""An offline byte-level tokenizer: 256 byte tokens plus <pad>, <bos>, <eos>; no download, no training.

It is a Hugging Face ``PreTrainedTokenizerFast`` (a byte-level BPE with an empty merge list), so it has
``encode``/``decode``/``save_pretrained`` and a saved model directory loads back with
``AutoTokenizer.from_pretrained``. Every UTF-8 string round-trips exactly.
"""

from __future__ import annotations

from typing import Dict

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["byte_tokenizer", "PAD", "BOS", "EOS"]

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def _byte_symbols() -> Dict[int, str]:
    """Byte -> printable unicode symbol (the GPT-2 byte-level convention: printable bytes map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


def byte_tokenizer(model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """Ids 0..255 are the bytes, 256 ``<pad>``, 257 ``<bos>``, 258 ``<eos>``; encode adds <bos> in front."""
    vocab = {sym: b for b, sym in _byte_symbols().items()}
    vocab.update({PAD: 256, BOS: 257, EOS: 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # <bos> only: a prompt must not end in <eos>, or generation would continue after an end of text
    # (training appends <eos> to each record: dptrain.finetune.loss.TokenizedTexts)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {EOS} $B", special_tokens=[(BOS, 257), (EOS, 258)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, model_max_length=model_max_length,
        padding_side="right", clean_up_tokenization_spaces=False,
    )
    return fast
