"""HeldEngine: a StepGate over an in-process Engine plus a hook inside its step, for tests that need requests
open (admitted, streaming, unfinished) at a moment of their choosing, on any machine.

`run_until_first_tokens(n)` lets the engine step until n sequences have each emitted a token and closes the gate
from inside the step that got there, so no further step can start: a request needing many more tokens than that
is then certainly unfinished. `open_streams` admits streaming requests with the engine held (so all of them are
in the engine before it steps), runs it until each has its first token (a stream's headers need one) and holds
it again. `fail_next` makes the next step raise instead of running (an injected forward failure).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.server.gate import StepGate

BOUND = 30.0  # seconds: a "does not hang" bound


class HeldEngine:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._real = engine.step
        self._want: int | None = None
        self._seen: set[str] = set()
        self._reached = threading.Event()
        self.fail_next: BaseException | None = None
        engine.step = self._step  # under the gate: StepGate wraps whatever engine.step is
        self.gate = StepGate(engine)

    def _step(self) -> list:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        outs = self._real()
        if self._want is not None:
            self._seen.update(o.request_id for o in outs if o.new_token_ids)
            if len(self._seen) >= self._want:
                self._want = None
                self.gate.close()  # before this thread can ask for the next step's permit
                self._reached.set()
        return outs

    def run_until_first_tokens(self, n: int) -> None:
        """Step until n sequences (counted from now) have emitted a token, then hold the engine again."""
        self._seen.clear()
        self._reached.clear()
        self._want = n
        self.gate.open()
        assert self._reached.wait(BOUND), f"fewer than {n} sequences emitted a token"

    def open_once_past(self, seconds: float) -> None:
        """Wait until the engine is held with work, then `seconds` more, then let it run: a request admitted
        before that with a deadline `seconds` away has then certainly passed it before its first step."""
        assert self.gate.wait_blocked(BOUND)
        until = time.monotonic() + seconds
        while time.monotonic() <= until:
            time.sleep(0.02)
        self.gate.open()

    def open_streams(self, client: httpx.Client, url: str, bodies: list[dict],
                     path: str = "/v1/completions") -> list[httpx.Response]:
        """Streaming requests, all admitted before the engine steps, each holding its first token; engine held."""
        base = httpx.get(f"{url}/load", timeout=BOUND).json()["server_load"]

        def open_one(body: dict) -> httpx.Response:
            r = client.send(client.build_request("POST", f"{url}{path}", json={**body, "stream": True}),
                            stream=True)
            assert r.status_code == 200, r.read()
            return r

        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(open_one, body) for body in bodies]
            wait_for(lambda: httpx.get(f"{url}/load", timeout=BOUND).json()["server_load"] >= base + len(bodies),
                     "the streams were not all admitted")
            self.run_until_first_tokens(sum(body.get("n", 1) for body in bodies))
            return [f.result(BOUND) for f in futures]

    def remove(self) -> None:
        self.gate.remove()  # also drops self._step: it was the instance attribute the gate replaced

    def __enter__(self) -> HeldEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def wait_for(check: Any, what: str, bound: float = BOUND) -> None:
    """Poll `check` until it is true; fail with `what` after `bound` seconds."""
    stop = time.monotonic() + bound
    while not check():
        assert time.monotonic() < stop, what
        time.sleep(0.02)
