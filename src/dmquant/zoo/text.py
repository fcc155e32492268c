"""Text conditioning of the latent text-to-image reference model: prompts, tokenizer, text encoder.

Prompts describe a glyph image in words built from its drawn attributes (``GlyphBatch.attributes``),
e.g. ``"a red bold italic serif capital q on a blue background"``. Letter case is said in words
(``capital q`` / ``small q``) because CLIP's tokenizer lower-cases its input.

The tokenizer is a genuine CLIP byte-pair-encoding tokenizer (``transformers.CLIPTokenizer``) whose
vocabulary is built here rather than downloaded: every single character, then one merge chain per
prompt word, so each word of :data:`PROMPT_WORDS` is one token and any other word still tokenizes
(into its characters). The text encoder is a small ``CLIPTextModel`` trained together with the
denoiser (Stable Diffusion freezes a pre-trained one; none can be downloaded here).
"""

from __future__ import annotations

import string
from collections import Counter
from functools import lru_cache
from itertools import pairwise

import torch
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .datasets import COLOUR_NAMES, FAMILIES, GlyphBatch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: Characters the tokenizer spells any word with (CLIP's tokenizer lower-cases its input first).
ALPHABET = string.ascii_lowercase + string.digits
#: Tokens per prompt, BOS and EOS/padding included (the longest prompt takes 15).
MAX_LENGTH = 20
#: Every word a prompt can contain.
PROMPT_WORDS = (
    ("a", "an", "on", "background", "gradient", "to", "bold", "italic", "capital", "small", "digit")
    + FAMILIES
    + COLOUR_NAMES
)
#: Hidden width of the text encoder (the denoiser's ``cross_attention_dim``).
TEXT_WIDTH = 128


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def character_phrase(character: str) -> str:
    """``"digit 7"``, ``"capital q"`` or ``"small q"``."""
    if character.isdigit():
        return f"digit {character}"
    return f"{'capital' if character.isupper() else 'small'} {character.lower()}"


def prompt(attributes: dict[str, object]) -> str:
    """The prompt describing one glyph image, from :meth:`GlyphBatch.attributes`."""
    style = [str(attributes["foreground"])]
    if attributes["bold"]:
        style.append("bold")
    if attributes["oblique"]:
        style.append("italic")
    style += [str(attributes["family"]), character_phrase(str(attributes["character"]))]
    background = str(attributes["background"])
    if attributes["background_gradient"]:
        ground = f"{_article(background)} {background} to {attributes['background2']} gradient background"
    else:
        ground = f"{_article(background)} {background} background"
    return f"{_article(style[0])} {' '.join(style)} on {ground}"


def prompts(batch: GlyphBatch) -> list[str]:
    """The prompt of every image of ``batch``."""
    return [prompt(attributes) for attributes in batch.attribute_list()]


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair-encoding merges learned on ``words`` until each is one symbol (Sennrich et al. 2016).

    Words are spelled as characters with ``</w>`` on the last; each round merges the most frequent
    adjacent pair, ties broken by the pair's text, so the result never depends on hashing order
    (the ``tokenizers`` trainer breaks ties differently from run to run).
    """
    spelled = [[*word[:-1], word[-1] + "</w>"] for word in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for symbols in spelled for pair in pairwise(symbols))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for i, symbols in enumerate(spelled):
            merged, j = [], 0
            while j < len(symbols):
                if tuple(symbols[j : j + 2]) == best:
                    merged.append(best[0] + best[1])
                    j += 2
                else:
                    merged.append(symbols[j])
                    j += 1
            spelled[i] = merged


def _vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tokenizer's vocabulary (BOS, EOS, the alphabet alone and word-final, then every merge) and merges.

    Every letter and digit is a word of its own too, so a prompt's ``q`` or ``7`` is one token and
    unseen words still tokenize (into pieces).
    """
    merges = learn_merges([*PROMPT_WORDS, *ALPHABET])
    tokens = [BOS, EOS, *ALPHABET, *(symbol + "</w>" for symbol in ALPHABET)]
    tokens += [first + second for first, second in merges]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}, merges


def build_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer over the prompt vocabulary (saved with the pipeline via ``save_pretrained``)."""
    vocab, merges = _vocabulary()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=MAX_LENGTH,
    )


@lru_cache(maxsize=1)
def _tokenizer() -> CLIPTokenizer:
    return build_tokenizer()


def token_ids(texts: list[str], device: torch.device | str | None = None) -> Tensor:
    """``(N, MAX_LENGTH)`` token ids, padded with EOS as Stable Diffusion's pipeline does."""
    encoded = _tokenizer()(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    return encoded.input_ids.to(device)


def build_text_encoder() -> CLIPTextModel:
    """A 2-layer, 128-wide ``CLIPTextModel`` (~0.4 M parameters) over the prompt vocabulary."""
    vocab, _ = _vocabulary()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    return CLIPTextModel(config)
