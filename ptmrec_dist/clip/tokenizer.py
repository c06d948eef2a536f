"""The demo backbone's tokenizer: a CLIP-format byte-level BPE vocabulary trained on a corpus.

The merges are learned by the ``tokenizers`` library's :class:`~tokenizers.trainers.BpeTrainer`
on CLIP's own normaliser and pre-tokeniser; the vocabulary is then laid out as CLIP's (the 256
byte symbols, the same with ``</w>``, the merged symbols in merge order, then
``<|startoftext|>`` and ``<|endoftext|>``) and handed to a transformers ``CLIPTokenizer``.
docs/backbone.md ("Tokenizer") says why the trainer is given the 256 ``</w>`` symbols as
special tokens.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_VOCAB = 2000              # tokenizer size cap (base 512 symbols + merges + 2 specials)
MIN_PAIR_COUNT = 2            # a merge needs a pair seen at least this often in the corpus


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the 256 base symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=1)
def _clip_backend():
    """A vocabulary-less CLIPTokenizer's backend: CLIP's normaliser and pre-tokeniser."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer().backend_tokenizer


def _library_merges(texts: Iterable[str], max_vocab: int,
                    min_count: int) -> tuple[set[str], list[tuple[str, str]]]:
    """(vocab strings, merges in order) from ``tokenizers``' BpeTrainer on CLIP's
    normaliser + pre-tokeniser.

    The 256 ``</w>`` byte symbols go in as special tokens, after BOS and EOS: the trainer would
    otherwise add only the ``</w>`` symbols that end a corpus word, with ids in the order of a
    randomly seeded hash map, and as it breaks ties between equally frequent pairs by symbol id,
    the merge order would change from process to process. Given as specials they are all there,
    with fixed ids, and the vocabulary size counts the same 512 base symbols as CLIP's.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    ends = [b + END_OF_WORD for b in bytes_to_unicode().values()]
    backend = _clip_backend()
    tok = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix=END_OF_WORD))
    tok.normalizer, tok.pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab, min_frequency=min_count, show_progress=False,
        special_tokens=[BOS, EOS] + ends, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=END_OF_WORD)
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return set(model["vocab"]), merges


def train_bpe(texts: Iterable[str], max_vocab: int = MAX_VOCAB,
              min_count: int = MIN_PAIR_COUNT) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style byte-level BPE on ``texts``: (vocab, merges), deterministic.

    Merges are learned greedily from word frequencies by ``tokenizers``' BpeTrainer (the most
    frequent adjacent pair first, ties broken by the symbols' ids) until the vocab holds
    ``max_vocab`` tokens or no pair occurs ``min_count`` times. Vocab order as CLIP's: the 256
    byte symbols, the same with ``</w>``, the merged symbols in merge order, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (the two largest ids).
    """
    trained, merges = _library_merges(texts, max_vocab, min_count)
    base = list(bytes_to_unicode().values())
    vocab_list = base + [b + END_OF_WORD for b in base]
    known = set(vocab_list)
    for a, b in merges:
        if a + b not in known:
            known.add(a + b)
            vocab_list.append(a + b)
    vocab_list += [BOS, EOS]
    if set(vocab_list) != trained:        # a tokenizers release that lays out its vocab otherwise
        raise RuntimeError("tokenizers' BpeTrainer gave a vocabulary other than its merges "
                           f"imply ({len(trained ^ set(vocab_list))} tokens differ)")
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_tokenizer(texts: Iterable[str], max_len: int, max_vocab: int = MAX_VOCAB):
    """A transformers ``CLIPTokenizer`` with a BPE vocabulary trained on ``texts``."""
    from transformers import CLIPTokenizer

    vocab, merges = train_bpe(texts, max_vocab=max_vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_len)


def normalise_text(text: str) -> str:
    """What ``decode(encode(text))`` gives: CLIP's normalisation (NFC, lower case), one space
    between pre-tokens (words, single digits, punctuation runs)."""
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    backend = _clip_backend()
    pieces = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
    return " ".join(bytes(inverse[c] for c in w).decode("utf-8", errors="replace")
                    for w, _ in pieces)
