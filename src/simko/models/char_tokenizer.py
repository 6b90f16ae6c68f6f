"""A character-level tokenizer over printable ASCII, built locally (nothing to download).

One token per character, so the tiny model's arithmetic ("12+34=" -> "46") needs no merges to learn and every
digit is its own token. Characters outside the alphabet map to ``<unk>``. No BOS is added automatically and
there is no chat template: prompts are raw text, and rollouts tokenize with ``add_special_tokens=False``.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3
ALPHABET = [chr(code) for code in range(32, 127)] + ["\n"]  # printable ASCII (space..~) and newline


def build_char_tokenizer(model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """The tiny model's tokenizer: ids 0-3 are <pad> <bos> <eos> <unk>, then one id per character."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + ALPHABET)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own "word"; [\s\S] (unlike ".") also matches the newline.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters back without the spaces WordLevel would insert
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",  # generation appends on the right, so prompts are padded on the left
        clean_up_tokenization_spaces=False,  # would rewrite " ." and the like
        model_max_length=model_max_length,
    )
