"""Document quality rules and text edits for data_clean.py: small named filters, each with its threshold.

    from quality import QualityConfig, judge
    cfg = QualityConfig(min_chars=50)              # thresholds (data_clean.py exposes each as a flag)
    edited, failed = judge(texts, cfg)             # texts with boilerplate lines dropped and punctuation runs
                                                   # collapsed; per text None (keep) or the first rule it fails

The rules follow Gopher (Rae et al. 2021, as datatrove's GopherQualityFilter and GopherRepetitionFilter
implement them) with characters in place of words, since Chinese has no spaces: a Chinese "word" is one
to three characters, so the n-gram rules use character 5- and 10-grams with thresholds raised to match.
Repeated paragraphs are caught by the repeated-lines rule (a paragraph repeated repeats its lines; most
Chinese corpora put one paragraph on a line). Each rule is checked in RULES order; a document is counted under the first rule it fails. The character
measures are computed for a whole batch of texts at once with numpy (measure()).
Thresholds were set so that none of the real documents in ../shared/realdata (a medical textbook chapter,
medical Q&A, Wikipedia, Baike, WuDao records) fails any rule; tests/test_data_clean.py pins a positive and
a negative example for each.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

_URL = re.compile(r"(?:https?://|www\.)[^\s\u3000-\u303f\uff00-\uffef\u4e00-\u9fff]+", re.IGNORECASE)
# Boilerplate lines as web crawls (WuDao, C4) and encyclopedia dumps carry them: copyright and licence
# notices, "click to read", share/follow prompts, navigation trails and page furniture. A line counts when
# it is short (navigation is never a paragraph of prose) and matches one of these.
_BOILERPLATE = re.compile(
    # the lookahead names every first character the alternatives can start with: re then skips the
    # other positions quickly (3x faster on ordinary text)
    r"(?=[版copyrightCOPYRIGHT©aA未禁转免点查阅上下返首当您网扫关分收加设联iI京增本责编来])(?:"
    r"版权所有|版权归|copyright|©|all rights reserved|未经授权|禁止转载|转载请注明|免责声明|"
    r"点击(?:查看|进入|这里|下载|阅读|关注)|查看(?:更多|全文|原文|详情)|阅读(?:全文|原文|更多)|"
    r"上一篇|下一篇|上一页|下一页|返回(?:首页|顶部|列表)|首页\s*[>›»/]|当前位置|您的位置|网站地图|"
    r"扫一扫|扫码|关注(?:我们|微信|公众号)|分享到|收藏本(?:站|文)|加入收藏|设为首页|联系我们|"
    r"ICP备|京ICP|增值电信|本文来源|责任编辑|编辑[:：]|来源[:：])",
    re.IGNORECASE)
BOILERPLATE_LINE_MAX_CHARS = 80
# Runs of one punctuation mark, as scraped text is full of them ("！！！", "。。。。", "，，"): the seed
# project collapsed them before training. The ellipsis and dash are written as pairs (…… ——), so those
# collapse to a pair; every other mark to one.
_PUNCT_RUN = re.compile(r"(?=[，。！？；：、,.!?;:~～·…—])(?:([，。！？；：、,.!?;:~～·])\1+|([…—])\2{2,})")


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of the quality rules (each documented in RULES) and switches of the edits."""
    min_chars: int = 50
    min_chinese: float = 0.3
    max_dup_line_chars: float = 0.3
    max_dup_5gram_chars: float = 0.8
    max_dup_10gram_chars: float = 0.6
    max_symbols: float = 0.1
    max_digits: float = 0.35
    max_url_chars: float = 0.2
    max_boilerplate: float = 0.5
    strip_boilerplate: bool = True
    collapse_punctuation: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


_TABLES: dict[str, np.ndarray] = {}


def _tables() -> dict[str, np.ndarray]:
    """Per BMP character: whitespace? symbol (Unicode category S*)? Built once per process."""
    if not _TABLES:
        chars = [chr(c) if not 0xD800 <= c < 0xE000 else "" for c in range(1 << 16)]
        _TABLES["space"] = np.fromiter((c.isspace() for c in chars), dtype=bool, count=1 << 16)
        _TABLES["symbol"] = np.fromiter((bool(c) and unicodedata.category(c)[0] == "S" for c in chars),
                                        dtype=bool, count=1 << 16)
    return _TABLES


def measure(texts: list[str], dup10_above: float = 0.0, ngrams: bool = True) -> dict[str, np.ndarray]:
    """Per text, over its non-whitespace characters: their number (chars) and the shares of Chinese
    characters, digits and symbols, and of characters covered by repeated character 5- and 10-grams
    (Gopher's duplicated n-gram character fraction, over characters instead of words; the costly part,
    left out with ngrams=False). All texts at once in numpy."""
    tables = _tables()
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype="<u4")
    doc = np.repeat(np.arange(len(texts)), lengths)
    bmp = np.minimum(codes, (1 << 16) - 1)
    content = ~(tables["space"][bmp] & (codes < (1 << 16)))
    codes, doc = codes[content], doc[content]
    chars = np.bincount(doc, minlength=len(texts))
    denominator = np.maximum(chars, 1)

    def share(mask: np.ndarray) -> np.ndarray:
        return np.bincount(doc[mask], minlength=len(texts)) / denominator

    cjk = ((codes >= 0x3400) & (codes <= 0x4DBF)) | ((codes >= 0x4E00) & (codes <= 0x9FFF)) | \
        ((codes >= 0xF900) & (codes <= 0xFAFF)) | ((codes >= 0x20000) & (codes <= 0x2FFFF))
    digit = ((codes >= 0x30) & (codes <= 0x39)) | ((codes >= 0xFF10) & (codes <= 0xFF19))
    symbol = np.where(codes < (1 << 16), tables["symbol"][np.minimum(codes, (1 << 16) - 1)],
                      (codes >= 0x1F000) & (codes <= 0x1FAFF))
    out = {"chars": chars, "chinese": share(cjk), "digits": share(digit), "symbols": share(symbol)}
    if not ngrams:
        return out
    codes = codes.astype(np.uint64)
    out["dup_5grams"] = _dup_ngram_share(codes, doc, chars, 5)
    # a repeated 10-gram is made of repeated 5-grams, so dup_10grams <= dup_5grams: only texts whose
    # dup_5grams exceeds `dup10_above` can matter, and only those are measured (the rest get dup_5grams)
    out["dup_10grams"] = out["dup_5grams"].copy()
    again = out["dup_5grams"] > dup10_above
    if again.any():
        picked = again[doc]
        _, local = np.unique(doc[picked], return_inverse=True)
        out["dup_10grams"][again] = _dup_ngram_share(codes[picked], local, chars[again], 10)
    return out


def _dup_ngram_share(codes: np.ndarray, doc: np.ndarray, chars: np.ndarray, n: int) -> np.ndarray:
    """Share of each text's characters covered by an n-gram occurring more than once in that text
    (0 for texts shorter than 2n)."""
    count = len(codes) - n + 1
    if count <= 0:
        return np.zeros(len(chars))
    h = codes[:count].copy()
    for k in range(1, n):
        h = h * np.uint64(0x9E3779B97F4A7C15) + codes[k:k + count]
    valid = doc[:count] == doc[n - 1:]            # the n-gram lies inside one text
    starts = np.flatnonzero(valid)
    # one plain sort of (32-bit hash of text and n-gram, position): far faster than argsort or unique;
    # a chance 32-bit collision marks a few characters of a batch as repeated
    mixed = (h[starts] ^ (doc[starts].astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9))) * \
        np.uint64(0x94D049BB133111EB)
    packed = np.sort(((mixed >> np.uint64(32)) << np.uint64(32)) | starts.astype(np.uint64))
    high = packed >> np.uint64(32)
    same = high[1:] == high[:-1]
    repeated = np.zeros(len(packed), dtype=bool)
    repeated[1:] |= same
    repeated[:-1] |= same
    dup_starts = (packed[repeated] & np.uint64(0xFFFFFFFF)).astype(np.int64)
    depth = np.cumsum(np.bincount(dup_starts, minlength=len(codes) + n)
                      - np.bincount(dup_starts + n, minlength=len(codes) + n))[:len(codes)]
    covered = np.bincount(doc[depth > 0], minlength=len(chars))
    return np.where(chars >= 2 * n, covered / np.maximum(chars, 1), 0.0)


def dup_line_share(text: str) -> float:
    """Characters in lines that occur more than once (Gopher's dup_line_char_frac)."""
    if text.count("\n") < 1:
        return 0.0
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    counts = Counter(lines)
    dup = sum(len(line) for line in lines if counts[line] > 1)
    return dup / max(sum(map(len, lines)), 1)


def url_share(text: str) -> float:
    """Characters inside URLs among the non-whitespace characters."""
    if "://" not in text and "www." not in text.lower():
        return 0.0
    return sum(len(m.group()) for m in _URL.finditer(text)) / max(len("".join(text.split())), 1)


def is_boilerplate_line(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and len(stripped) <= BOILERPLATE_LINE_MAX_CHARS and bool(_BOILERPLATE.search(stripped))


def boilerplate_share(text: str) -> float:
    """Characters in boilerplate lines among the characters of all non-blank lines (before editing)."""
    if not _BOILERPLATE.search(text):
        return 0.0
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return sum(len(line) for line in lines if is_boilerplate_line(line)) / max(sum(map(len, lines)), 1)


@dataclass(frozen=True)
class Rule:
    """A named filter: a document is removed when measure `measure` is below (`minimum`) or above the
    threshold in QualityConfig field `limit`."""
    name: str
    about: str
    measure: str
    limit: str
    minimum: bool = False


RULES: list[Rule] = [
    Rule("boilerplate", "boilerplate lines (copyright, 点击查看, navigation, share prompts) are more than "
         "--max_boilerplate of its characters", "boilerplate", "max_boilerplate"),
    Rule("too_short", "it has fewer than --min_chars non-whitespace characters (after the edits)",
         "chars", "min_chars", minimum=True),
    Rule("not_chinese", "Chinese characters are less than --min_chinese of its characters", "chinese",
         "min_chinese", minimum=True),
    Rule("repeated_lines", "lines occurring more than once hold more than --max_dup_line_chars of its "
         "characters", "dup_lines", "max_dup_line_chars"),
    Rule("repeated_5grams", "repeated character 5-grams cover more than --max_dup_5gram_chars of it",
         "dup_5grams", "max_dup_5gram_chars"),
    Rule("repeated_10grams", "repeated character 10-grams cover more than --max_dup_10gram_chars of it",
         "dup_10grams", "max_dup_10gram_chars"),
    Rule("symbols", "symbol characters are more than --max_symbols of it", "symbols", "max_symbols"),
    Rule("digits", "digits are more than --max_digits of it", "digits", "max_digits"),
    Rule("urls", "URLs are more than --max_url_chars of its characters", "urls", "max_url_chars"),
]
RULE_NAMES = [rule.name for rule in RULES]


def judge(raw_texts: list[str], cfg: QualityConfig, rules: list[Rule] = RULES) -> tuple[list[str], list[str | None]]:
    """The texts edited (edit_text), and per text the name of the first rule in `rules` it fails, or None.
    The boilerplate share is measured before the edit removes those lines; every other measure after."""
    has_boilerplate = [_BOILERPLATE.search(t) is not None for t in raw_texts]
    edited = [edit_text(t, cfg, has) for t, has in zip(raw_texts, has_boilerplate)]
    needed = {rule.measure for rule in rules}   # only what the active rules read is measured
    measures = measure(edited, dup10_above=cfg.max_dup_10gram_chars,
                       ngrams=bool(needed & {"dup_5grams", "dup_10grams"}))
    if "boilerplate" in needed:
        measures["boilerplate"] = np.array([boilerplate_share(t) if has else 0.0
                                            for t, has in zip(raw_texts, has_boilerplate)])
    if "dup_lines" in needed:
        measures["dup_lines"] = np.array([dup_line_share(t) for t in edited])
    if "urls" in needed:
        measures["urls"] = np.array([url_share(t) for t in edited])
    failed: list[str | None] = [None] * len(raw_texts)
    for rule in reversed(rules):   # the first rule that fails wins
        limit = getattr(cfg, rule.limit)
        values = measures[rule.measure]
        for i in np.flatnonzero(values < limit if rule.minimum else values > limit).tolist():
            failed[i] = rule.name
    return edited, failed


def edit_text(text: str, cfg: QualityConfig, has_boilerplate: bool | None = None) -> str:
    """The document as it will be tokenized: boilerplate lines removed, punctuation runs collapsed.
    `has_boilerplate`: whether _BOILERPLATE occurs in it, when the caller already knows."""
    if has_boilerplate is None:
        has_boilerplate = _BOILERPLATE.search(text) is not None
    if cfg.strip_boilerplate and has_boilerplate:
        text = "\n".join(line for line in text.split("\n") if not is_boilerplate_line(line))
    if cfg.collapse_punctuation:
        text = _PUNCT_RUN.sub(lambda m: m.group(1) or m.group(2) * 2, text)
    return text
