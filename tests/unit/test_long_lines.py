"""One enormous line never gets tokenised whole: each message is cut to the characters that
``data.max_len`` tokens can use (at the tokenizer's longest token), and the first ``max_len``
tokens, their loss mask and the truncation flag are those of the whole line."""

from __future__ import annotations

import numpy as np
import pytest

from dsft.data import tokenize
from dsft.data.formats import Example
from dsft.data.tokenize import ChatOptions, char_cap, encode

from .test_template import FAMILIES, family_tokenizer


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_long_message_is_cut_before_tokenising(kind: str, monkeypatch) -> None:
    tok = family_tokenizer(next(iter(FAMILIES)))
    max_len = 64
    cap = char_cap(tok, max_len)
    words = " ".join(f"w{i % 97}x{i % 13}" for i in range(60_000))  # ~400k characters
    assert len(words) > 20 * cap
    if kind == "chat":
        msgs = [{"role": "user", "content": "Say it: " + words[:500]},
                {"role": "assistant", "content": words}]  # fmt: skip
    else:
        msgs = [{"role": "assistant", "content": words}]
    ex = Example(msgs, "big.jsonl:1", kind)
    whole = encode(tok, [ex])
    seen: list[int] = []
    real = tokenize._batch_encode
    monkeypatch.setattr(
        tokenize,
        "_batch_encode",
        lambda t, texts: (seen.extend(map(len, texts)), real(t, texts))[1],
    )
    cut = encode(tok, [ex], options=ChatOptions(char_cap=cap))
    assert max(seen) < 2 * cap + 1000  # the template's text and the two cut messages
    n_whole, n_cut = whole.offsets[1], cut.offsets[1]
    assert n_whole > n_cut > max_len  # still truncated: the flag stays exact
    np.testing.assert_array_equal(cut.ids[:max_len], whole.ids[:max_len])
    np.testing.assert_array_equal(cut.trained[:max_len], whole.trained[:max_len])


def test_cap_grows_with_max_len_and_the_longest_token() -> None:
    tok = family_tokenizer(next(iter(FAMILIES)))
    longest = tokenize.longest_token_chars(tok)
    assert char_cap(tok, 1000) >= (1000 + 64) * longest
    assert char_cap(tok, 1000) == char_cap(tok, 1001)  # a power of two: cache entries shared


def test_max_line_mb_bounds_a_row(tmp_path, monkeypatch) -> None:
    from dsft.config import load_config
    from dsft.data import readers
    from dsft.data.formats import load_examples
    from dsft.errors import ConfigError, DataError

    monkeypatch.setattr(readers, "MAX_ROW_BYTES", readers.MAX_ROW_BYTES)  # restored after
    ok = '{"text": "fine"}\n'
    big = tmp_path / "big.jsonl"
    big.write_text(ok + '{"text": "' + "x" * (2 << 20) + '"}\n' + ok)
    readers.set_max_row_bytes(1 << 20)
    with pytest.raises(DataError, match=r"big\.jsonl:2: a line longer than 1 MiB"):
        load_examples([str(big)])
    assert len(load_examples([str(big)], on_bad_row="skip").skipped) == 1
    with pytest.raises(ConfigError, match=r"data\.max_line_mb"):
        load_config(None, ["data.max_line_mb=0"])
