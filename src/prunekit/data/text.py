"""Jane Austen's six novels as plain text, and token windows for calibration and perplexity.

The text comes from the Debian package ``r-cran-janeaustenr`` (1.6 MB) through :mod:`prunekit.data.fetch`: its
``data/Rdata.rdx`` index (gzip) locates each novel in ``data/Rdata.rdb`` (per object: a 4-byte big-endian length,
then a zlib stream), and each object is an R character vector (one element per line of the book), decoded with the
PyPI package ``rdata``. Nothing of R is needed.

The protocol used by the LLM benchmarks: calibrate on the five novels other than *Persuasion*
(:func:`calibration_windows`), evaluate perplexity on all of *Persuasion* in non-overlapping windows
(:func:`eval_windows`).

For word-level language models (the LSTM of :mod:`prunekit.reproduce.large_vs_small`), :func:`words` splits a text
into lower-case words with ``<eos>`` at sentence ends, and :class:`Vocabulary` maps the most frequent words to ids.

Examples:
    >>> text = austen("persuasion")
    >>> text[:10], len(text) > 400_000
    ('Persuasion', True)
"""

from __future__ import annotations

import collections
import functools
import gzip
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunekit.data.fetch import Asset, DebianSource, fetch

__all__ = [
    "AUSTEN",
    "EOS",
    "NOVELS",
    "UNK",
    "Vocabulary",
    "austen",
    "calibration_windows",
    "eval_windows",
    "read_rdata_strings",
    "words",
]

_DATA = "usr/lib/R/site-library/janeaustenr/data"

AUSTEN = Asset(
    name="janeaustenr",
    files={
        "Rdata.rdb": "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21",
        "Rdata.rdx": "cab8cbe4ce965d3b42b35c03383bafccc0eb78151f70e4748ead45270470c22f",
    },
    sources=(
        DebianSource(
            "r-cran-janeaustenr",
            "1.0.0-1",
            {f"{_DATA}/Rdata.rdb": "Rdata.rdb", f"{_DATA}/Rdata.rdx": "Rdata.rdx"},
            url="http://deb.debian.org/debian/pool/main/r/r-cran-janeaustenr/r-cran-janeaustenr_1.0.0-1_all.deb",
        ),
    ),
)
"""Jane Austen's novels (R lazy-load data files) from Debian ``r-cran-janeaustenr``; env var
``PRUNEKIT_JANEAUSTENR_DIR``."""

#: The six novels by their object name in the R package, in publication order.
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


def _rdata():  # type: ignore[no-untyped-def]
    try:
        import rdata
    except ImportError as exc:
        raise ImportError(
            "reading the Austen corpus needs the PyPI package `rdata`; install it with "
            "`pip install 'prunekit[llm]'` (or `pip install rdata`)"
        ) from exc
    return rdata


def _decode(raw: bytes, what: str) -> object:
    rdata = _rdata()
    with warnings.catch_warnings():  # rdata warns that a bare serialized object has no file header ("assumed RDS")
        warnings.simplefilter("ignore", UserWarning)
        try:
            return rdata.conversion.convert(rdata.parser.parse_data(raw))
        except Exception as exc:  # noqa: BLE001 - rdata raises many types for malformed input
            raise ValueError(f"{what} is not a readable R serialized object: {exc}") from None


def read_rdata_strings(directory: str | os.PathLike[str], names: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Read character-vector objects from an R lazy-load database (``Rdata.rdx`` + ``Rdata.rdb``).

    Args:
        directory: Folder holding ``Rdata.rdx`` and ``Rdata.rdb``.
        names: Objects to read (default: every object in the index).

    Returns:
        ``{object name: list of strings}``.

    Raises:
        ValueError: A file is malformed, an object is not a character vector, or a name is not in the index.
    """
    directory = Path(directory)
    rdx = (directory / "Rdata.rdx").read_bytes()
    rdx = gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:])
    index = _decode(rdx, f"{directory / 'Rdata.rdx'}")
    if not isinstance(index, dict) or "variables" not in index:
        raise ValueError(f"{directory / 'Rdata.rdx'} is not an R lazy-load index (no 'variables' entry)")
    variables = {str(k): (int(v[0]), int(v[1])) for k, v in index["variables"].items()}
    wanted = list(variables) if names is None else list(names)
    unknown = [n for n in wanted if n not in variables]
    if unknown:
        raise ValueError(f"objects {unknown} are not in {directory / 'Rdata.rdx'}; it holds {sorted(variables)}")
    out: dict[str, list[str]] = {}
    with open(directory / "Rdata.rdb", "rb") as fh:
        for name in wanted:
            offset, length = variables[name]
            fh.seek(offset)
            chunk = fh.read(length)
            if len(chunk) != length or length < 5:
                raise ValueError(f"{directory / 'Rdata.rdb'} is truncated at object {name!r}")
            (size,) = struct.unpack(">I", chunk[:4])
            try:
                raw = zlib.decompress(chunk[4:])
            except zlib.error as exc:
                raise ValueError(
                    f"object {name!r} in {directory / 'Rdata.rdb'} is not zlib-compressed ({exc}); only R's default "
                    "lazy-load compression (zlib) is supported"
                ) from None
            if len(raw) != size:
                raise ValueError(f"object {name!r} decompresses to {len(raw)} bytes, its header says {size}")
            value = _decode(raw, f"object {name!r}")
            if not hasattr(value, "tolist") or any(not isinstance(s, str) for s in value.tolist()):
                raise ValueError(f"object {name!r} is a {type(value).__name__}, not a character vector")
            out[name] = list(value.tolist())
    return out


@functools.lru_cache(maxsize=2)
def _novels(directory: str) -> dict[str, str]:
    return {name: "\n".join(lines) for name, lines in read_rdata_strings(directory, NOVELS).items()}


def austen(novel: str, root: str | os.PathLike[str] | None = None, *, verify: bool = True) -> str:
    """One of Jane Austen's novels as plain text (lines joined with ``"\\n"``).

    Args:
        novel: One of :data:`NOVELS` (e.g. ``"persuasion"``, ``"emma"``).
        root: Folder that already holds ``Rdata.rdb`` and ``Rdata.rdx``; if None, ``$PRUNEKIT_JANEAUSTENR_DIR`` or the
            cache is used, downloading Debian ``r-cran-janeaustenr`` (1.6 MB) on first use.
        verify: Check user-provided files against the SHA-256 in :data:`AUSTEN`.

    Returns:
        The text of the novel.

    Raises:
        ValueError: ``novel`` is not one of :data:`NOVELS`.
        prunekit.data.fetch.FetchError: The files could not be found or downloaded.

    Examples:
        >>> len(austen("emma").split()) > 150_000
        True
    """
    if novel not in NOVELS:
        raise ValueError(f"unknown novel {novel!r}; choose one of {list(NOVELS)}")
    return _novels(os.fspath(fetch(AUSTEN, root, verify=verify)))[novel]


def _check_ids(token_ids: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1 or token_ids.is_floating_point():
        got = f"{token_ids.dtype} tensor of shape {tuple(token_ids.shape)}" if isinstance(token_ids, torch.Tensor) \
            else type(token_ids).__name__
        raise ValueError(f"{what} must be a 1-D integer tensor of token ids, got {got}; tokenize the text first")
    return token_ids


def calibration_windows(
    token_ids: torch.Tensor | Sequence[torch.Tensor], n: int = 128, length: int = 512, *, seed: int = 0
) -> torch.Tensor:
    """``n`` random windows of ``length`` tokens (start positions drawn uniformly with a fixed seed).

    Args:
        token_ids: A 1-D tensor of token ids, or several (one per document; windows never cross documents, and
            each document is drawn with probability proportional to its number of possible windows).
        n: Number of windows.
        length: Tokens per window.
        seed: Seed of the generator that draws the start positions.

    Returns:
        An ``int64`` tensor of shape ``(n, length)``.

    Examples:
        >>> w = calibration_windows(torch.arange(100), n=3, length=8)
        >>> w.shape, bool((w[:, 1:] - w[:, :-1] == 1).all())
        (torch.Size([3, 8]), True)
    """
    docs = [token_ids] if isinstance(token_ids, torch.Tensor) else list(token_ids)
    docs = [_check_ids(d, "token_ids") for d in docs]
    if n < 1 or length < 1:
        raise ValueError(f"need n >= 1 windows of length >= 1, got n={n}, length={length}")
    starts_per_doc = torch.tensor([max(d.numel() - length + 1, 0) for d in docs], dtype=torch.float64)
    if starts_per_doc.sum() == 0:
        raise ValueError(
            f"no document has {length} tokens (longest: {max(d.numel() for d in docs)}); use a shorter length"
        )
    gen = torch.Generator().manual_seed(seed)
    which = torch.multinomial(starts_per_doc, n, replacement=True, generator=gen)  # (n,)
    out = torch.empty(n, length, dtype=torch.int64)
    for i, d in enumerate(which.tolist()):
        start = int(torch.randint(int(starts_per_doc[d]), (1,), generator=gen))
        out[i] = docs[d][start : start + length]
    return out


def eval_windows(token_ids: torch.Tensor, length: int = 512, *, keep_last: bool = True) -> list[torch.Tensor]:
    """Split a token stream into consecutive non-overlapping windows of ``length`` tokens.

    Args:
        token_ids: 1-D tensor of token ids.
        length: Tokens per window.
        keep_last: Keep the last, shorter window (so every token is evaluated); dropped if it has fewer than 2
            tokens (nothing to predict).

    Returns:
        A list of ``int64`` tensors of shape ``(1, length)`` (the last one possibly shorter).

    Examples:
        >>> [w.shape[1] for w in eval_windows(torch.arange(10), 4)]
        [4, 4, 2]
    """
    _check_ids(token_ids, "token_ids")
    if length < 2:
        raise ValueError(f"windows need length >= 2 (one token of context, one to predict), got {length}")
    ids = token_ids.to(torch.int64)
    out = [ids[i : i + length][None] for i in range(0, ids.numel(), length)]
    if out and (out[-1].shape[1] < 2 or (not keep_last and out[-1].shape[1] < length)):
        out.pop()
    return out


# --- word-level tokenisation ------------------------------------------------------------------------------------------

EOS = "<eos>"
"""Token that ends a sentence (replaces ``.``, ``!``, ``?`` and runs of them)."""
UNK = "<unk>"
"""Token that stands for every word outside a :class:`Vocabulary`."""

# A word: letters/digits, with inner apostrophes ("don't", "lady's"); or a run of sentence-ending punctuation.
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|[.!?]+")
# Abbreviations whose full stop does not end a sentence in the Austen texts ("Mr. Darcy").
_ABBREVIATIONS = frozenset({"mr", "mrs", "dr", "st", "messrs"})


def words(text: str) -> list[str]:
    """Split ``text`` into lower-case word tokens, with :data:`EOS` at the end of every sentence.

    The rules (close to the Penn Treebank language-modelling data): lower-case; a word is a run of letters and digits
    with inner apostrophes (``"don't"``, ``"lady's"``; the typographic apostrophe U+2019 counts as ``'``); ``.``,
    ``!`` and ``?`` (or runs of them) become :data:`EOS`, except the full stop after ``Mr``, ``Mrs``, ``Dr``, ``St``
    and ``Messrs``; all other punctuation (commas, quotes, dashes, the underscores of italics) is dropped. Hyphenated
    words become several words.

    Examples:
        >>> words('"My dear Mr. Bennet," said his lady. "Have you heard?!"')
        ['my', 'dear', 'mr', 'bennet', 'said', 'his', 'lady', '<eos>', 'have', 'you', 'heard', '<eos>']
    """
    if not isinstance(text, str):
        raise TypeError(f"words() needs a str, got {type(text).__name__}")
    out: list[str] = []
    for token in _TOKEN.findall(text.lower().replace("\u2019", "'")):
        if token[0] in ".!?":
            if out and out[-1] != EOS and not (token == "." and out[-1] in _ABBREVIATIONS):
                out.append(EOS)
        else:
            out.append(token)
    return out


@dataclass(frozen=True)
class Vocabulary:
    """Word <-> id table: id 0 is :data:`UNK`, then words by decreasing frequency (ties in alphabetical order).

    Build it from training tokens only (:meth:`build`); words never seen there, or cut by ``max_words``, map to
    :data:`UNK`. Plain data: :meth:`to_dict`/:meth:`from_dict` round-trip through JSON.

    Examples:
        >>> vocab = Vocabulary.build(["a", "b", "a", "c", "a", "b"], max_words=2)
        >>> vocab.words, len(vocab)
        (('<unk>', 'a', 'b'), 3)
        >>> vocab.encode(["a", "c", "b"]).tolist(), vocab.decode([2, 0])
        ([1, 0, 2], ['b', '<unk>'])
    """

    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.words or self.words[0] != UNK:
            raise ValueError(f"a Vocabulary's first word must be {UNK!r}, got {self.words[:1]}")
        if len(set(self.words)) != len(self.words):
            dupes = sorted(w for w, n in collections.Counter(self.words).items() if n > 1)
            raise ValueError(f"a Vocabulary lists each word once; repeated: {dupes[:8]}")

    @classmethod
    def build(cls, tokens: Iterable[str], max_words: int) -> Vocabulary:
        """The ``max_words`` most frequent tokens (plus :data:`UNK`).

        Raises:
            ValueError: ``max_words`` is not a positive integer, or there are no tokens.
        """
        if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
            raise ValueError(f"max_words must be a positive integer (e.g. 10000), got {max_words!r}")
        counts = collections.Counter(tokens)
        counts.pop(UNK, None)
        if not counts:
            raise ValueError("cannot build a vocabulary from no tokens")
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_words]
        return cls((UNK, *(w for w, _ in ranked)))

    def __len__(self) -> int:
        return len(self.words)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def encode(self, tokens: Iterable[str]) -> torch.Tensor:
        """Token ids (``int64``, 1-D); unknown words get id 0 (:data:`UNK`)."""
        index = self._index
        return torch.tensor([index.get(t, 0) for t in tokens], dtype=torch.int64)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """Words of ``ids``.

        Raises:
            ValueError: An id is outside ``[0, len(self))``.
        """
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in values if not 0 <= int(i) < len(self.words)]
        if bad:
            raise ValueError(f"ids {bad[:8]} are outside this vocabulary of {len(self.words)} words")
        return [self.words[int(i)] for i in values]

    def coverage(self, tokens: Sequence[str]) -> float:
        """Fraction of ``tokens`` that are in the vocabulary (not mapped to :data:`UNK`)."""
        if not tokens:
            raise ValueError("coverage of no tokens is undefined")
        index = self._index
        return sum(t in index for t in tokens) / len(tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"words": list(self.words)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Vocabulary:
        return cls(tuple(data["words"]))
