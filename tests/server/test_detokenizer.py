"""Incremental detokenizing never splits a UTF-8 character; stop strings match across chunks, never retracted."""

from __future__ import annotations

import pytest

from server.detokenizer import IncrementalDetokenizer, StopChecker


class ByteTokenizer:
    """id i = byte i (ids >= 256 are special and skipped), like a byte-fallback vocabulary."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def stream(text: str, sizes: list[int]) -> list[str]:
    data = list(text.encode())
    detok = IncrementalDetokenizer(ByteTokenizer(), [ord("P")])
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        out.append(detok.add(data[i:i + n]))
        i, k = i + n, k + 1
    out.append(detok.flush())
    return out


@pytest.mark.parametrize("sizes", [[1], [2], [3], [1, 4], [7]])
def test_multibyte_characters_are_never_split(sizes: list[int]) -> None:
    text = "héllo wörld 😀 日本語 ok"
    parts = stream(text, sizes)
    assert "".join(parts) == text
    assert all("\ufffd" not in p for p in parts)


def test_special_tokens_are_skipped_and_an_incomplete_tail_is_flushed_as_replacement() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer(), [])
    assert detok.add([300, ord("a")]) == "a"
    assert detok.add([0xE6]) == ""
    assert detok.flush() == "\ufffd"


def push_all(checker: StopChecker, deltas: list[str]) -> str:
    out = []
    for i, d in enumerate(deltas):
        emit, stopped = checker.push(d, final=i == len(deltas) - 1)
        out.append(emit)
        if stopped:
            break
    return "".join(out)


def test_stop_string_across_chunk_boundaries() -> None:
    c = StopChecker(["STOP"])
    assert push_all(c, ["abc S", "T", "OP tail", "more"]) == "abc "
    assert c.stop_reason == "STOP"


def test_text_that_might_start_a_stop_string_is_held_back_not_retracted() -> None:
    c = StopChecker(["xyz"])
    emitted = [c.push(d)[0] for d in ["ab", "x", "y", "q"]]
    assert emitted == ["", "a", "b", "x"]  # always holds back len("xyz") - 1 = 2 characters
    assert c.push("", final=True)[0] == "yq"


def test_earliest_stop_wins_and_include_stop_str() -> None:
    c = StopChecker(["cd", "b"], include_stop=True)
    assert push_all(c, ["abcd"]) == "ab" and c.stop_reason == "b"


def test_no_stop_strings_passes_text_through() -> None:
    c = StopChecker([])
    assert [c.push(d)[0] for d in ["a", "b"]] == ["a", "b"]
