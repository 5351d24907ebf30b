"""Document quality rules and text edits for data_clean.py: small named filters, each with its threshold.

    from quality import QualityConfig, edit_text, failed_rule
    cfg = QualityConfig(min_chars=50)                     # thresholds (data_clean.py exposes each as a flag)
    text = edit_text(raw, cfg)                            # boilerplate lines dropped, punctuation runs collapsed
    rule = failed_rule(text, cfg, boilerplate_share(raw)) # None (keep) or the name of the first rule that fails

The rules follow Gopher (Rae et al. 2021, as datatrove's GopherQualityFilter and GopherRepetitionFilter
implement them) with characters in place of words, since Chinese has no spaces: a Chinese "word" is one
to three characters, so the n-gram rules count character n-grams of twice the words' n.
Each rule is checked in RULES order; a document is counted under the first rule it fails.
Thresholds were set so that none of the real documents in ../shared/realdata (a medical textbook chapter,
medical Q&A, Wikipedia, Baike, WuDao records) fails any rule; tests/test_data_clean.py pins a positive and
a negative example for each.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_URL = re.compile(r"(?:https?://|www\.)[^\s\u3000-\u303f\uff00-\uffef\u4e00-\u9fff]+", re.IGNORECASE)
_DIGIT = re.compile(r"[0-9０-９]")
# Boilerplate lines as web crawls (WuDao, C4) and encyclopedia dumps carry them: copyright and licence
# notices, "click to read", share/follow prompts, navigation trails and page furniture. A line counts when
# it is short (navigation is never a paragraph of prose) and matches one of these.
_BOILERPLATE = re.compile(
    r"版权所有|版权归|copyright|©|all rights reserved|未经授权|禁止转载|转载请注明|免责声明|"
    r"点击(?:查看|进入|这里|下载|阅读|关注)|查看(?:更多|全文|原文|详情)|阅读(?:全文|原文|更多)|"
    r"上一篇|下一篇|上一页|下一页|返回(?:首页|顶部|列表)|首页\s*[>›»/]|当前位置|您的位置|网站地图|"
    r"扫一扫|扫码|关注(?:我们|微信|公众号)|分享到|收藏本(?:站|文)|加入收藏|设为首页|联系我们|"
    r"ICP备|京ICP|增值电信|本文来源|责任编辑|编辑[:：]|来源[:：]",
    re.IGNORECASE)
BOILERPLATE_LINE_MAX_CHARS = 80
# Runs of one punctuation mark, as scraped text is full of them ("！！！", "。。。。", "，，"): the seed
# project collapsed them before training. The ellipsis and dash are written as pairs (…… ——), so those
# collapse to a pair; every other mark to one.
_PUNCT_RUN = re.compile(r"([，。！？；：、,.!?;:~～·])\1+|([…—])\2{2,}")


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


def _content(text: str) -> str:
    return "".join(text.split())


def chinese_share(text: str) -> float:
    """Chinese characters among the non-whitespace characters."""
    content = _content(text)
    return len(_CJK.findall(content)) / max(len(content), 1)


def dup_line_share(text: str) -> float:
    """Characters in lines that occur more than once (Gopher's dup_line_char_frac)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    counts = Counter(lines)
    dup = sum(len(line) for line in lines if counts[line] > 1)
    return dup / max(sum(map(len, lines)), 1)


def dup_ngram_share(text: str, n: int) -> float:
    """Characters covered by character n-grams that occur more than once (Gopher's duplicated n-gram
    character fraction, over characters instead of words)."""
    content = _content(text)
    if len(content) < 2 * n:
        return 0.0
    grams = [content[i:i + n] for i in range(len(content) - n + 1)]
    counts = Counter(grams)
    covered = bytearray(len(content))
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = b"\x01" * n
    return sum(covered) / len(content)


def symbol_share(text: str) -> float:
    """Symbols (Unicode categories S*: #, ★, emoji, box drawing, ...) among the non-whitespace characters."""
    content = _content(text)
    return sum(unicodedata.category(c)[0] == "S" for c in content) / max(len(content), 1)


def digit_share(text: str) -> float:
    content = _content(text)
    return len(_DIGIT.findall(content)) / max(len(content), 1)


def url_share(text: str) -> float:
    """Characters inside URLs among the non-whitespace characters."""
    return sum(len(m.group()) for m in _URL.finditer(text)) / max(len(_content(text)), 1)


def is_boilerplate_line(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and len(stripped) <= BOILERPLATE_LINE_MAX_CHARS and bool(_BOILERPLATE.search(stripped))


def boilerplate_share(text: str) -> float:
    """Characters in boilerplate lines among the characters of all non-blank lines (before editing)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return sum(len(line) for line in lines if is_boilerplate_line(line)) / max(sum(map(len, lines)), 1)


@dataclass(frozen=True)
class Rule:
    name: str
    about: str
    fails: Callable[[str, QualityConfig, float], bool]


RULES: list[Rule] = [
    Rule("boilerplate", "boilerplate lines (copyright, 点击查看, navigation, share prompts) are more than "
         "--max_boilerplate of its characters", lambda t, c, b: b > c.max_boilerplate),
    Rule("too_short", "fewer than --min_chars non-whitespace characters (after the edits)",
         lambda t, c, b: len(_content(t)) < c.min_chars),
    Rule("not_chinese", "Chinese characters are less than --min_chinese of its characters",
         lambda t, c, b: chinese_share(t) < c.min_chinese),
    Rule("repeated_lines", "lines occurring more than once hold more than --max_dup_line_chars of its characters",
         lambda t, c, b: dup_line_share(t) > c.max_dup_line_chars),
    Rule("repeated_5grams", "repeated character 5-grams cover more than --max_dup_5gram_chars of it",
         lambda t, c, b: dup_ngram_share(t, 5) > c.max_dup_5gram_chars),
    Rule("repeated_10grams", "repeated character 10-grams cover more than --max_dup_10gram_chars of it",
         lambda t, c, b: dup_ngram_share(t, 10) > c.max_dup_10gram_chars),
    Rule("symbols", "symbol characters are more than --max_symbols of it", lambda t, c, b: symbol_share(t) > c.max_symbols),
    Rule("digits", "digits are more than --max_digits of it", lambda t, c, b: digit_share(t) > c.max_digits),
    Rule("urls", "URLs are more than --max_url_chars of its characters",
         lambda t, c, b: url_share(t) > c.max_url_chars),
]
RULE_NAMES = [rule.name for rule in RULES]


def edit_text(text: str, cfg: QualityConfig) -> str:
    """The document as it will be tokenized: boilerplate lines removed, punctuation runs collapsed."""
    if cfg.strip_boilerplate and _BOILERPLATE.search(text):
        text = "\n".join(line for line in text.split("\n") if not is_boilerplate_line(line))
    if cfg.collapse_punctuation:
        text = _PUNCT_RUN.sub(lambda m: m.group(1) or m.group(2) * 2, text)
    return text


def failed_rule(text: str, cfg: QualityConfig, boilerplate: float, rules: list[Rule] = RULES) -> str | None:
    """The name of the first rule in `rules` that `text` (already edited) fails, or None.
    `boilerplate` is boilerplate_share of the text before editing."""
    for rule in rules:
        if rule.fails(text, cfg, boilerplate):
            return rule.name
    return None
