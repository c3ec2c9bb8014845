"""Hostile input: huge bodies of type errors stay cheap, text UTF-8 cannot encode is a 400 naming its field, and
the API key can come from a file that never shows in `ps`.

The cost of a bad body is asserted by counting the validation errors built (pydantic used to build one per bad
list item: 1.6 million, over 10 s of event loop, for a 3 MB body), never by timing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from server.app import MAX_REPORTED_ERRORS, create_app
from server.cli import main
from server.config import ServerConfig, load_config
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, error_body
from tests.server.conftest import make_engine
from tests.server_fixtures import free_port, live_server, wait_until_healthy

ROOT = Path(__file__).parents[2]
MAX_ERRORS = 16  # what any body may cost in validation errors: a handful per field at most
K = 5000  # items in a hostile list: every one of them a type error
MSG = [{"role": "user", "content": "hi"}]
C, CH = "/v1/completions", "/v1/chat/completions"

# ---- bounded validation ---------------------------------------------------------------------------------------

MODELS: list[tuple[type[BaseModel], dict[str, Any]]] = [  # each request model with a minimal valid body
    (CompletionRequest, {"prompt": "x"}), (ChatCompletionRequest, {"messages": MSG}), (TokenizeRequest, {}),
    (DetokenizeRequest, {"tokens": [1]}),
]


def _hostile_values() -> list[Any]:
    """Large containers whose every item is wrong for some field type: K errors each, without fail-fast."""
    return [["x"] * K, [1] * K, [[1, "x"]] * K, [["x"] * K], [{"role": 1}] * K, [{"type": 1}] * K,
            {str(i): "x" for i in range(K)}, {str(i): [1] for i in range(K)}]


def _error_count(model: type[BaseModel], body: dict[str, Any]) -> int:
    try:
        model.model_validate(body)
    except ValidationError as exc:
        return exc.error_count()
    return 0


@pytest.mark.parametrize(("model", "base"), MODELS, ids=[m.__name__ for m, _ in MODELS])
def test_every_field_of_every_request_model_yields_few_errors_however_long_the_bad_list(
        model: type[BaseModel], base: dict[str, Any]) -> None:
    # every declared field, so a list or dict field added later is covered without editing this test
    worst = {name: max(_error_count(model, {**base, name: v}) for v in _hostile_values())
             for name in model.model_fields}
    assert max(worst.values()) <= MAX_ERRORS, {k: v for k, v in worst.items() if v > MAX_ERRORS}


@pytest.mark.parametrize("model", [ChatCompletionRequest, TokenizeRequest])
def test_nested_message_fields_yield_few_errors(model: type[BaseModel]) -> None:
    for value in _hostile_values():
        for msg in ({"role": "user", "content": value}, {"role": "user", "content": [{"type": "text", "text": value}]},
                    {"role": "user", "content": "x", "name": value}):
            assert _error_count(model, {"messages": [msg]}) <= MAX_ERRORS
        assert _error_count(model, {"messages": [{"role": "user", "content": "x"}] + [value] * 3}) <= MAX_ERRORS


@pytest.fixture(scope="module")
def engine(ckpt: Path):
    return make_engine(ckpt, num_kv_tokens=4096)


@pytest.fixture(scope="module")
def spied(engine) -> Iterator[tuple[str, list[int]]]:
    """A live server whose validation handler records how many errors each 400 was built from."""
    app = create_app(engine, ServerConfig())
    counts: list[int] = []
    handler = app.exception_handlers[RequestValidationError]

    async def spy(request: Any, exc: RequestValidationError) -> Any:
        counts.append(len(exc.errors()))
        return await handler(request, exc)

    app.exception_handlers[RequestValidationError] = spy
    with live_server(app) as url:
        yield url, counts


N = 100_000  # items in a server-side hostile body (~0.5 MB): the errors the old code built scale with it
HUGE_BAD = [  # (path, raw JSON body, param)
    (C, '{"prompt": [[' + ",".join(['"x"'] * N) + "]]}", "prompt"),
    (C, '{"prompt": [' + ",".join(['"x"', "1"] * (N // 2)) + "]}", "prompt"),
    (C, '{"prompt": "x", "stop_token_ids": [' + ",".join(['"a"'] * N) + "]}", "stop_token_ids"),
    (C, '{"prompt": "x", "stop": [' + ",".join(["1"] * N) + "]}", "stop"),
    (CH, '{"messages": [' + ",".join(['{"role": 1}'] * N) + "]}", "messages"),
    (CH, '{"messages": [{"role": "user", "content": [' + ",".join(["1"] * N) + "]}]}", "messages"),
    (CH, '{"messages": [{"role": "user", "content": "x"}], "tools": [' + ",".join(["1"] * N) + "]}", "tools"),
    ("/tokenize", '{"messages": [' + ",".join(['{"role": "user", "content": 1}'] * N) + "]}", "messages"),
    ("/detokenize", '{"tokens": [' + ",".join(['"a"'] * N) + "]}", "tokens"),
]


@pytest.mark.parametrize(("path", "raw", "param"), HUGE_BAD, ids=[f"{i}" for i in range(len(HUGE_BAD))])
def test_a_huge_bad_body_builds_few_errors_on_every_endpoint(spied: tuple[str, list[int]], path: str, raw: str,
                                                             param: str) -> None:
    url, counts = spied
    before = len(counts)
    r = httpx.post(f"{url}{path}", content=raw.encode(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "BadRequestError" and err["code"] == 400
    assert len(err["message"].split("; ")) <= MAX_REPORTED_ERRORS
    assert len(counts) == before + 1 and counts[-1] <= MAX_ERRORS, counts[before:]


def test_detokenize_refuses_more_ids_than_a_context_holds(spied: tuple[str, list[int]], engine) -> None:
    """Decoding runs on the event loop: a body of valid ids is bounded by the context length, as a prompt is."""
    url, _ = spied
    n = engine.max_model_len
    r = httpx.post(f"{url}/detokenize", json={"tokens": [5] * (n + 1)}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens" and str(n) in r.json()["error"]["message"]
    assert httpx.post(f"{url}/detokenize", json={"tokens": [5] * n}, timeout=60).status_code == 200


def test_malformed_json_names_no_field(spied: tuple[str, list[int]]) -> None:
    r = httpx.post(f"{spied[0]}{C}", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None


# ---- text UTF-8 cannot encode ---------------------------------------------------------------------------------

S = "\\ud800"  # a lone surrogate, as a JSON escape
SURROGATES = [  # (path, raw JSON body, param)
    (C, f'{{"prompt": "a{S}b"}}', "prompt"),
    (C, f'{{"prompt": ["ok", "{S}"]}}', "prompt"),
    (C, '{"prompt": "\\udfff"}', "prompt"),  # a lone low surrogate
    (C, f'{{"prompt": "x", "model": "{S}"}}', "model"),
    (C, f'{{"prompt": "x", "stop": "{S}"}}', "stop"),
    (C, f'{{"prompt": "x", "stop": ["a", "{S}"], "stream": true}}', "stop"),
    (C, f'{{"prompt": "x", "user": "{S}"}}', "user"),
    (C, f'{{"prompt": "x", "mode": "{S}"}}', "mode"),
    (C, f'{{"prompt": "x", "suffix": "{S}"}}', "suffix"),
    (C, f'{{"prompt": "x", "logit_bias": {{"{S}": 1}}}}', "logit_bias"),
    (C, f'{{"prompt": "x", "unknown_field": ["{S}"]}}', "unknown_field"),
    (CH, f'{{"messages": [{{"role": "user", "content": "{S}"}}]}}', "messages"),
    (CH, f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": "{S}"}}]}}]}}', "messages"),
    (CH, f'{{"messages": [{{"role": "user", "content": "hi", "name": "{S}"}}]}}', "messages"),
    (CH, f'{{"messages": [{{"role": "user", "content": "hi"}}], "model": "{S}", "stream": true}}', "model"),
    (CH, f'{{"messages": [{{"role": "user", "content": "hi"}}], "stop": "{S}"}}', "stop"),
    ("/tokenize", f'{{"prompt": "{S}"}}', "prompt"),
    ("/tokenize", f'{{"messages": [{{"role": "user", "content": "{S}"}}]}}', "messages"),
    ("/tokenize", f'{{"prompt": "x", "model": "{S}"}}', "model"),
    ("/detokenize", f'{{"tokens": [5], "model": "{S}"}}', "model"),
    (C, f'{{"prompt": "x", "{S}": 1}}', S),  # a bad key is named as its escape: the error must stay encodable
]


@pytest.mark.parametrize(("path", "raw", "param"), SURROGATES, ids=[f"{i}" for i in range(len(SURROGATES))])
def test_text_utf8_cannot_encode_is_a_400_naming_the_field(spied: tuple[str, list[int]], path: str, raw: str,
                                                           param: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    r = httpx.post(f"{spied[0]}{path}", content=raw.encode(), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err == {"message": err["message"], "type": "BadRequestError", "param": param, "code": 400}
    assert "surrogate" in err["message"]
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]


def test_surrogate_bytes_in_the_body_name_the_field(spied: tuple[str, list[int]]) -> None:
    # CESU-8 bytes for U+D800: json.loads(bytes) turns them into a lone surrogate ('surrogatepass')
    r = httpx.post(f"{spied[0]}/tokenize", content=b'{"prompt": "a\xed\xa0\x80"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{spied[0]}/tokenize", content=b'{"prompt": "a\xff"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400


def test_valid_astral_text_and_escaped_pairs_still_work(spied: tuple[str, list[int]]) -> None:
    for raw in ('{"prompt": "\\ud83d\\ude00 hi"}', '{"prompt": "\U0001f600 hi"}', '{"prompt": "caf\\u00e9"}'):
        r = httpx.post(f"{spied[0]}/tokenize", content=raw.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


def test_a_surrogate_in_a_model_path_is_a_404_not_a_500(spied: tuple[str, list[int]]) -> None:
    r = httpx.get(f"{spied[0]}/v1/models/%ED%A0%80x")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_error_bodies_render_whatever_text_they_echo() -> None:
    body = error_body(400, "bad \ud800 text", "field\udc80")
    json.dumps(body, ensure_ascii=False).encode("utf-8")
    assert body["error"]["message"] == "bad \\ud800 text" and body["error"]["param"] == "field\\udc80"


# ---- the API key from a file ----------------------------------------------------------------------------------

KEY = "sk-file-0123456789abcdef"


def _key_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "api-key"
    path.write_text(text)
    return str(path)


def test_the_api_key_comes_from_a_file_stripped_and_never_shown(tmp_path: Path) -> None:
    path = _key_file(tmp_path, f"  {KEY}\r\n")
    cfg = ServerConfig(api_key_file=path)
    assert cfg.api_key == KEY and KEY not in repr(cfg)
    assert ServerConfig(api_key=KEY, api_key_file=path).api_key == KEY  # both, agreeing (dataclasses.replace)
    preset = tmp_path / "p.toml"
    preset.write_text(f'[server]\napi_key_file = "{path}"\n')
    assert load_config(preset)[1].api_key == KEY


@pytest.mark.parametrize(("text", "words"), [
    (None, "cannot read"), ("", "is empty"), (" \n\n", "is empty"), ("sk-a\nsk-b\n", "more than one line"),
    ("sk-\u00e9t\u00e9\n", "printable ASCII"), ("sk-a\tb", "printable ASCII"), ("dir", "cannot read"),
    (b"sk-\xff\xfe", "not UTF-8"),
])
def test_a_bad_key_file_is_a_config_error_naming_the_field(tmp_path: Path, text: str | bytes | None,
                                                           words: str) -> None:
    path = tmp_path / "api-key"
    if text == "dir":
        path.mkdir()
    elif isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(ValueError, match="api_key_file") as info:
        ServerConfig(api_key_file=str(path))
    assert words in str(info.value)


def test_bad_api_keys_and_conflicts_are_config_errors(tmp_path: Path) -> None:
    for key in ("", " sk-secret-1", "sk-secret-2\n", "sk-secret-\u00e9"):
        with pytest.raises(ValueError, match="api_key") as info:
            ServerConfig(api_key=key)
        assert key.strip() == "" or key.strip() not in str(info.value)
    with pytest.raises(ValueError, match="api_key_file") as info:
        ServerConfig(api_key="sk-other", api_key_file=_key_file(tmp_path, KEY))
    assert KEY not in str(info.value) and "sk-other" not in str(info.value)


def test_serve_exits_2_naming_the_field_for_a_bad_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRIMODE_API_KEY", raising=False)
    assert main(["serve", "--api-key-file", str(tmp_path / "missing")]) == 2
    assert "config error" in capsys.readouterr().err
    assert main(["serve", "--api-key-file", _key_file(tmp_path, "\n")]) == 2
    err = capsys.readouterr().err
    assert "api_key_file" in err and "is empty" in err
    monkeypatch.setenv("TRIMODE_API_KEY", "sk-from-env")
    assert main(["serve", "--api-key-file", _key_file(tmp_path, KEY)]) == 2
    err = capsys.readouterr().err
    assert "api_key_file" in err and KEY not in err and "sk-from-env" not in err


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (the engine process and its helpers), from each process's parent in /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
    out, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        out += children
        frontier = children
    return out


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_serve_reads_the_key_file_and_the_key_never_shows_in_ps_or_logs(ckpt: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRIMODE_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model", str(ckpt), "--port", str(port),
         "--api-key-file", _key_file(tmp_path, KEY + "\n"), "--engine.device", "cpu", "--engine.num_kv_tokens", "4096",
         "--log-level", "debug"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**env, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url)
        pids = [proc.pid, *_descendants(proc.pid)]
        assert len(pids) >= 2  # the HTTP process and the engine process
        for pid in pids:
            assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert httpx.post(f"{url}/tokenize", json={"prompt": "x"}, timeout=30).status_code == 401
        r = httpx.post(f"{url}/tokenize", json={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert r.status_code == 200 and r.json()["count"] >= 1
        assert httpx.get(f"{url}/metrics", timeout=30).status_code == 200
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
    assert "API key required" in output and KEY not in output
