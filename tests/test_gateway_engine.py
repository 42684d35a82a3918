"""The gateway in front of two real vLLM CPU servers, driven by the official `openai` client.

One module-scoped pair of engines (priority scheduling, as the gateway expects) serves every test;
the engines die with the module, so no other test file's servers overlap with them. Tests that
kill an engine restart it before they return. Greedy decoding makes outputs comparable: the
same request straight to vLLM, or through the gateway, or across an instance failure, must give
the same tokens.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from enginectl import PROJECT_ENGINE_ARGS, VllmServer, start_vllm
from gateway_support import GatewayProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.engine

ENGINE_ARGS = (*PROJECT_ENGINE_ARGS, "--scheduling-policy", "priority", "--served-model-name", "tiny")
CONTEXT = 2048  # the tiny model's max_position_embeddings: room for long streams
LONG = 1900  # tokens: a stream long enough to interrupt (prompt + LONG < CONTEXT)


class Engines:
    def __init__(self, model: Path) -> None:
        self.model = model
        self.servers: list[VllmServer] = []

    def start(self, port: int | None = None) -> VllmServer:
        server = start_vllm(self.model, port=port, extra_args=ENGINE_ARGS, max_model_len=CONTEXT)
        self.servers.append(server)
        return server

    def by_instance(self, instance_id: str) -> VllmServer:
        return next(s for s in self.servers if instance_id.endswith(f":{s.port}"))

    def crash(self, server: VllmServer) -> None:
        """SIGKILL the whole group (API server, engine core, worker): an instance failure.

        The server leaves the list first, so a slow reap (a loaded CI box once took over 10 s to
        tear down a killed 3 GB engine) cannot leave a dead instance for later tests to wait on."""
        self.servers.remove(server)
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(120)

    def stop_all(self) -> None:
        for s in self.servers:
            s.stop()


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> Iterator[Engines]:
    e = Engines(tiny_model)
    try:
        e.start()
        e.start()
        yield e
    finally:
        e.stop_all()


@pytest.fixture(scope="module")
def gateway(engines: Engines, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    d = tmp_path_factory.mktemp("gateway")
    args = [arg for s in engines.servers for arg in ("--engine", s.url)] + ["--db", str(d / "q.sqlite3")]
    gw = GatewayProcess(args, d)
    gw.start()
    _wait_ready(gw, 2)
    try:
        yield gw
    finally:
        gw.kill(signal.SIGTERM)


def _wait_ready(gw: GatewayProcess, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(gw.url + "/health")
        if r.status_code == 200 and r.json()["instances_ready"] >= n:
            return
        time.sleep(0.3)
    raise TimeoutError(f"gateway did not see {n} ready instances:\n{gw.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=120)


GREEDY: dict[str, Any] = {"temperature": 0.0}


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_matches_the_engine_direct(client: openai.OpenAI, engines: Engines) -> None:
    direct = openai.OpenAI(base_url=engines.servers[0].url + "/v1", api_key="x", max_retries=0)
    want = direct.completions.create(model="tiny", prompt="the fleet", max_tokens=12, **GREEDY)
    got = client.completions.create(model="tiny", prompt="the fleet", max_tokens=12, **GREEDY)
    assert got.choices[0].text == want.choices[0].text
    assert got.choices[0].finish_reason == "length"
    assert got.usage is not None and got.usage.completion_tokens == 12
    assert got.usage.prompt_tokens == want.usage.prompt_tokens  # type: ignore[union-attr]
    assert got.id.startswith("cmpl-")


def test_chat_stream_equals_chat_non_stream(client: openai.OpenAI) -> None:
    msgs: Any = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=msgs,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completion_stream_carries_token_ids_when_asked(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="tiny", prompt="abc", max_tokens=8, stream=True, extra_body={"return_token_ids": True}, **GREEDY
    )
    chunks = [c.model_dump() for c in stream]
    assert chunks[0]["choices"][0]["prompt_token_ids"]
    assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 8


def _raw(gw: GatewayProcess, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(gw.url + path, content=data, headers=headers, timeout=60)


BAD_REQUESTS: list[tuple[str, Any, dict[str, str], int, str]] = [
    ("/v1/completions", b"{not json", {}, 400, "body"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, {}, 404, "model"),
    ("/v1/completions", {"prompt": "x"}, {}, 400, "model"),
    ("/v1/completions", {"model": "tiny"}, {}, 400, "prompt"),
    ("/v1/chat/completions", {"model": "tiny"}, {}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"content": "x"}]}, {}, 400, "messages[0].role"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -5}, {}, 400, "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 10**9}, {}, 400, "max_tokens"),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        {},
        400,
        "max_completion_tokens",
    ),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 6000, "max_tokens": 4}, {}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [7] * 3000}, {}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 3}, {}, 400, "n"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, {}, 400, "temperature"),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "x"},
        {"X-Slofleet-Class": "vip"},
        400,
        "X-Slofleet-Class",
    ),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "x"},
        {"X-Slofleet-Priority": "high"},
        400,
        "X-Slofleet-Priority",
    ),
]


@pytest.mark.parametrize(("path", "body", "headers", "status", "field"), BAD_REQUESTS)
def test_bad_input_gets_4xx_naming_the_field(
    gateway: GatewayProcess, path: str, body: Any, headers: dict[str, str], status: int, field: str
) -> None:
    r = _raw(gateway, path, body, headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == field and field in err["message"], err


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert exc.value.param == "max_tokens"  # type: ignore[attr-defined]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
completion_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["tiny", "other", ""]) | json_values,
        "prompt": st.text(max_size=50) | st.lists(st.integers(-3, 600), max_size=5) | json_values,
        "max_tokens": st.integers(-3, 3) | st.sampled_from([2000, 10**12]) | json_values,
        "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
        "top_p": st.floats(-1, 2, allow_nan=False) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": json_values,
        "stop": json_values,
        "n": st.integers(0, 3) | json_values,
        "logprobs": st.integers(-1, 30) | json_values,
        "seed": json_values,
        "priority": st.integers(-5, 5) | json_values,
        "echo": json_values,
    },
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.just("tiny") | json_values,
        "messages": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "role": st.sampled_from(["user", "system", "robot"]) | json_values,
                    "content": st.text(max_size=30) | json_values,
                },
            ),
            max_size=3,
        )
        | json_values,
        "max_tokens": st.integers(-2, 3) | json_values,
        "max_completion_tokens": st.integers(-2, 3) | json_values,
        "stream": st.booleans(),
        "logprobs": json_values,
        "top_logprobs": st.integers(-1, 30) | json_values,
        "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(completion_bodies.map(lambda b: ("/v1/completions", b)),
                      chat_bodies.map(lambda b: ("/v1/chat/completions", b))))  # fmt: skip
def test_fuzzed_bodies_never_get_5xx(gateway: GatewayProcess, body: tuple[str, Any]) -> None:
    path, payload = body
    r = _raw(gateway, path, payload)
    assert r.status_code < 500, (payload, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def _batch_lines(n: int, max_tokens: int, prefix: str = "req", url: str = "/v1/completions") -> bytes:
    lines = []
    for i in range(n):
        body: dict[str, Any] = {"model": "tiny"}
        if url == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": f"q{i}"}]
        else:
            body["prompt"] = f"item {i}"
        body.update(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        lines.append(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": url, "body": body}))
    return ("\n".join(lines) + "\n").encode()


def _wait_batch(client: openai.OpenAI, batch_id: str, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "cancelled", "expired"):
            return b
        time.sleep(0.5)
    raise TimeoutError(f"batch {batch_id} still {b.status}: {b.request_counts}")


def _check_output(client: openai.OpenAI, batch: Any, n: int, prefix: str, max_tokens: int) -> None:
    assert batch.status == "completed", batch
    assert batch.request_counts.total == n and batch.request_counts.completed == n, batch.request_counts
    assert batch.error_file_id is None
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(f"{prefix}-{i}" for i in range(n))
    for o in out:
        assert o["response"]["status_code"] == 200
        assert o["response"]["body"]["usage"]["completion_tokens"] == max_tokens


def test_batch_api_end_to_end(client: openai.OpenAI, gateway: GatewayProcess) -> None:
    f = client.files.create(
        file=("in.jsonl", _batch_lines(6, 8, url="/v1/chat/completions")), purpose="batch"
    )
    assert client.files.retrieve(f.id).bytes == f.bytes
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "in_progress"
    status = httpx.get(gateway.url + "/slofleet/v1/status").json()
    assert {"batch_queue_depth", "batch_deadline_slack_seconds", "interactive_queue_depth"} <= set(status)
    done = _wait_batch(client, batch.id)
    _check_output(client, done, 6, "req", 8)
    assert batch.id in [b.id for b in client.batches.list(limit=100).data]
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'slofleet_gateway_requests_total{outcome="success",request_class="batch"}' in metrics


def test_batch_cancel_keeps_what_finished(client: openai.OpenAI) -> None:
    # More lines than both instances take at once (2 x (64 - 1 reserved)): some are still queued.
    n = 300
    f = client.files.create(file=("in.jsonl", _batch_lines(n, 50, "c")), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="1h")
    client.batches.cancel(batch.id)
    done = _wait_batch(client, batch.id)
    assert done.status == "cancelled"
    finished = done.request_counts.completed
    assert finished < n
    if finished:
        out = client.files.content(done.output_file_id).text.splitlines()
        assert len(out) == finished


BAD_FILES: list[tuple[bytes, str]] = [
    (
        b'{"custom_id": "a", "url": "/v1/completions", "body": {"model": "tiny", "prompt": "x"}}\n{oops\n',
        "line 2",
    ),
    (b'{"url": "/v1/completions", "body": {"model": "tiny", "prompt": "x"}}\n', "line 1: custom_id"),
    (b'{"custom_id": "a", "url": "/v1/embeddings", "body": {}}\n', "line 1: url"),
    (
        b'{"custom_id": "a", "url": "/v1/completions",'
        b' "body": {"model": "tiny", "prompt": "x", "max_tokens": -1}}\n',
        "line 1: body.max_tokens",
    ),
    (
        b'{"custom_id": "a", "url": "/v1/completions", "body": {"model": "tiny", "prompt": "x"}}\n' * 2,
        "line 2: custom_id",
    ),
    (b"\n\n", "file"),
]


@pytest.mark.parametrize(("content", "field"), BAD_FILES)
def test_bad_jsonl_lines_are_refused_naming_line_and_field(
    client: openai.OpenAI, content: bytes, field: str
) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("bad.jsonl", content), purpose="batch")
    assert field in exc.value.message


def _sse_lines(r: httpx.Response) -> Iterator[bytes]:
    """SSE lines end at CR, LF or CRLF only. httpx's `iter_lines` also breaks at U+2028, U+0085
    and the like, which the random tiny model writes and JSON carries raw inside its strings."""
    buf = b""
    for data in r.iter_bytes():
        buf += data
        *lines, buf = buf.split(b"\n")
        yield from (ln.removesuffix(b"\r") for ln in lines)
    if buf:
        yield buf


def _stream_tokens(
    url: str, body: dict[str, Any], on_chunk: Any = None
) -> tuple[list[int], str, list[dict[str, Any]], httpx.Headers]:
    tokens: list[int] = []
    text: list[str] = []
    chunks: list[dict[str, Any]] = []
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in _sse_lines(r):
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            c = json.loads(line[6:])
            chunks.append(c)
            assert "error" not in c, c
            ch = c["choices"][0]
            tokens.extend(ch.get("token_ids") or [])
            text.append(ch.get("text") or (ch.get("delta") or {}).get("content") or "")
            if on_chunk:
                on_chunk(len(chunks), r.headers)
        return tokens, "".join(text), chunks, r.headers


def _long_body(kind: str) -> tuple[str, dict[str, Any]]:
    common = {"model": "tiny", "max_tokens": LONG, "ignore_eos": True, "stream": True, "temperature": 0.0}
    common["return_token_ids"] = True
    if kind == "completions":
        return "/v1/completions", {**common, "prompt": "a stream that must survive"}
    return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": "survive this"}]}


def _metric(gw: GatewayProcess, line_prefix: str) -> float:
    for line in httpx.get(gw.url + "/metrics").text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.split()[-1])
    return 0.0


MOVES = 'slofleet_gateway_resumes_total{reason="move"}'


class BackgroundLoad:
    """Long requests straight to every engine, so that a stream through the gateway is slower than
    its reader (an idle engine finishes 1900 tiny-model tokens before the client reads chunk 2)."""

    def __init__(self, engines: Engines, per_engine: int = 12) -> None:
        body = {"model": "tiny", "prompt": "background", "max_tokens": 1500, "ignore_eos": True}
        self.threads = [
            threading.Thread(target=self._post, args=(s.url, body), daemon=True)
            for s in list(engines.servers)
            for _ in range(per_engine)
        ]

    @staticmethod
    def _post(url: str, body: dict[str, Any]) -> None:
        try:
            httpx.post(url + "/v1/completions", json=body, timeout=120)
        except httpx.HTTPError:
            pass  # an engine killed by the test ends its background requests too

    def __enter__(self) -> BackgroundLoad:
        for t in self.threads:
            t.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self.threads:
            t.join()


LOSSES = 'slofleet_gateway_resumes_total{reason="instance_lost"}'


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_move_mid_stream_keeps_the_token_sequence(
    gateway: GatewayProcess, engines: Engines, kind: str
) -> None:
    path, body = _long_body(kind)
    want, _, _, _ = _stream_tokens(gateway.url + path, body)
    assert len(want) == LONG
    # The engine can outrun every reader, so a move may come too late (409): try a few times.
    for _ in range(3):
        before = _metric(gateway, MOVES)
        answers: list[tuple[int, str]] = []

        def move(n: int, headers: httpx.Headers, answers: list[tuple[int, str]] = answers) -> None:
            if n == 2:
                rid, here = headers["X-Request-Id"], headers["X-Slofleet-Instance"]
                # The status lists it on its instance (a move controller picks requests from there).
                listed = httpx.get(gateway.url + "/slofleet/v1/status").json()["instances"]
                on = {i["instance_id"]: [r["request_id"] for r in i["requests"]] for i in listed}
                assert rid in on[here], on
                other = next(
                    f"127.0.0.1:{s.port}" for s in engines.servers if not here.endswith(f":{s.port}")
                )
                r = httpx.post(f"{gateway.url}/slofleet/v1/requests/{rid}/move", json={"instance_id": other})
                answers.append((r.status_code, r.text))

        with BackgroundLoad(engines):
            got, _, chunks, _ = _stream_tokens(gateway.url + path, body, move)
        assert got == want
        assert len({c["id"] for c in chunks}) == 1
        statuses = [status for status, _ in answers]
        if statuses == [200]:
            assert _metric(gateway, MOVES) == before + 1
            return
        # Or the target answered /health too slowly under the background load for a while (CI's
        # box once took it out mid-stream): the gateway refuses a move to it, and we try again.
        not_ready = statuses == [400] and "is not a ready instance" in answers[0][1]
        assert statuses == [409] or not_ready, answers
        _wait_ready(gateway, 2, timeout=120)
    pytest.fail("no move landed while the stream was running")


def test_engine_killed_mid_stream_client_gets_the_undisturbed_tokens(
    gateway: GatewayProcess, engines: Engines
) -> None:
    path, body = _long_body("completions")
    want, _, _, _ = _stream_tokens(gateway.url + path, body)
    for _ in range(3):
        before = _metric(gateway, LOSSES)
        killed: list[VllmServer] = []

        def kill(n: int, headers: httpx.Headers, killed: list[VllmServer] = killed) -> None:
            if n == 2:
                victim = engines.by_instance(headers["X-Slofleet-Instance"])
                killed.append(victim)
                engines.crash(victim)

        try:
            with BackgroundLoad(engines):
                got, _, _, _ = _stream_tokens(gateway.url + path, body, kill)
        finally:
            if killed:  # bring the fleet back to two instances
                engines.start(port=killed[0].port)
                _wait_ready(gateway, 2, timeout=180)
        assert killed
        assert got == want
        if _metric(gateway, LOSSES) > before:
            return
    pytest.fail("the engine finished each stream before it was killed")


def test_full_queue_answers_429_with_retry_after(engines: Engines, tmp_path: Path) -> None:
    args = [a for s in engines.servers for a in ("--engine", s.url)]
    args += ["--concurrency-limit", "1", "--burst-factor", "1", "--max-queued", "1"]
    args += ["--db", str(tmp_path / "q.db")]
    gw = GatewayProcess(args, tmp_path)
    gw.start()
    try:
        _wait_ready(gw, 2)
        path, body = _long_body("completions")
        body = {**body, "max_tokens": 900, "stream": False}
        results: list[httpx.Response] = []
        data = json.dumps(body).encode()
        json_headers = {"Content-Type": "application/json"}
        # Every client is built before any sends (creating one takes tens of ms under the GIL, which
        # on a loaded box spread the 8 arrivals over as long as a request takes to run).
        start = threading.Barrier(8)

        def send() -> None:
            with httpx.Client(timeout=60) as client:
                start.wait()
                results.append(client.post(gw.url + path, content=data, headers=json_headers))

        # 2 slots (two instances at limit 1) + 1 queue place: of 8 at once, some must be refused.
        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        refused = [r for r in results if r.status_code == 429]
        assert refused, [r.status_code for r in results]
        assert all(r.status_code == 200 for r in results if r.status_code != 429)
        assert len(refused) <= 5
        for r in refused:
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
    finally:
        gw.kill(signal.SIGTERM)


def test_gateway_restart_with_batches_in_flight_loses_and_duplicates_nothing(
    engines: Engines, tmp_path: Path
) -> None:
    db = tmp_path / "durable.sqlite3"
    args = [a for s in engines.servers for a in ("--engine", s.url)] + [
        "--db",
        str(db),
        "--concurrency-limit",
        "3",
    ]
    gw = GatewayProcess(args, tmp_path)
    gw.start()
    try:
        _wait_ready(gw, 2)
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
        n, max_tokens = 24, 250
        ids = []
        for k in range(2):
            f = client.files.create(file=("in.jsonl", _batch_lines(n, max_tokens, f"b{k}")), purpose="batch")
            ids.append(client.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                             completion_window="2h").id)  # fmt: skip
        deadline = time.monotonic() + 120
        while client.batches.retrieve(ids[0]).request_counts.completed < 3:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        gw.kill(signal.SIGKILL)  # a crash: no shutdown hooks run
        gw.start()
        _wait_ready(gw, 2)
        for k, bid in enumerate(ids):
            _check_output(client, _wait_batch(client, bid), n, f"b{k}", max_tokens)
    finally:
        gw.kill(signal.SIGTERM)
