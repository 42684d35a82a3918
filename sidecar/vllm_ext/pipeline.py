"""Worker half of a runtime pipeline of two engines (DESIGN.md section 5, KunServe; issue 10).

Two engines of one model merge into one pipeline of g=2 at runtime: the *leader* keeps decoder
layers [0, mid) and the embedding, the *follower* keeps [mid, n), the final norm and lm_head; each
drops the rest (`slofleet_drop`, layers.py), which frees memory for KV. Requests go to the leader
only; its scheduler publishes every SchedulerOutput and the follower's scheduler replays it
(pipeline_scheduler.py), so both workers run the same batch with the same block ids in the same
step. Inside that step (vllm-kunserve-facts.md, section 1):
- the leader's model runs embed + its layers and sends `(hidden_states, residual)` to the
  follower; its `compute_logits` returns the logits the follower sends back; the leader samples;
- the follower's model ignores its input ids, receives `(hidden_states, residual)`, runs its
  layers and the norm; its `compute_logits` computes the real logits and sends them back.
vLLM's runner still builds the attention metadata, slot mapping and KV binding for every layer,
so attention code is untouched: a layer that does not run just writes no KV.

Why replace the forward at all instead of vLLM's pipeline parallelism: PP roles
(`get_pp_group().is_first_rank`, `make_layers` ranges) are fixed when the engine is built, and one
engine's PP stages share one scheduler; here two already-running engines must become stages.
The replacement is an *instance* attribute (`model.model.forward`, `model.compute_logits`),
removed on leave, and `model.model.do_not_compile` is set while in pipeline mode: a compiled
LlamaModel runs its AOT graph with the full layer range baked in and would silently ignore an
instance-level forward (compilation/decorators.py, `__call__`). So pipeline steps run eagerly.

Transport: one TCP connection per pipeline, opened by the workers themselves (the follower
listens, the leader connects; a random token from the follower gates it). Each message is a
frame tagged (step, seq): both workers count forwards and logits calls identically because they
run identical SchedulerOutputs, so a frame with another tag means the engines diverged and the
step fails loudly instead of computing with the wrong tensors. A receive that times out also
fails the step (the engine dies) rather than hanging forever.

Every vLLM internal used here goes through `_Internals`, which fails naming the attribute.
"""

from __future__ import annotations

import json
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any

import torch

from slofleet.sidecar.vllm_ext.internals import require

PIPELINE_PROTOCOL = 1
ROLE_LEADER = "leader"
ROLE_FOLLOWER = "follower"

_MAGIC = b"SLFP"
_HEADER = struct.Struct("!4sqqI")  # magic, step, seq, metadata length
_HELLO = struct.Struct("!4s32s")  # magic, token (hex of 16 random bytes)
_CONNECT_SECONDS = 30.0


class PipelineError(RuntimeError):
    """A refused pipeline op or a broken step; the message names the argument or internal."""


_require = partial(require, error=PipelineError, feature="pipeline mode")


class _Internals:
    """All access to vLLM internals for pipeline mode, in one place."""

    @staticmethod
    def causal_lm(worker: Any) -> torch.nn.Module:
        runner = _require(worker, "model_runner", "Worker")
        return _require(runner, "model", type(runner).__name__)

    @staticmethod
    def decoder(model: torch.nn.Module) -> torch.nn.Module:
        """The decoder stack (LlamaModel and kin): layers, embedding, norm, compile switch."""
        inner = _require(model, "model", type(model).__name__)
        where = type(inner).__name__
        for attr in ("layers", "norm", "embed_input_ids", "start_layer", "end_layer", "do_not_compile"):
            _require(inner, attr, where)
        if (int(inner.start_layer), int(inner.end_layer)) != (0, len(inner.layers)):
            raise PipelineError(
                f"{where} runs layers [{inner.start_layer}, {inner.end_layer}) of {len(inner.layers)}: "
                "the engine already uses vLLM's pipeline parallelism; runtime pipelines need PP=1"
            )
        if tuple(getattr(inner, "aux_hidden_state_layers", ()) or ()):
            raise PipelineError(f"{where}.aux_hidden_state_layers is set (EAGLE-3); not supported")
        return inner

    @staticmethod
    def compute_logits(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return _require(model, "compute_logits", type(model).__name__)


@dataclass(slots=True)
class _Counters:
    steps: int = 0  # forwards run in pipeline mode
    logits_calls: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    wait_seconds: float = 0.0  # blocked in a receive (the peer's share of the step)
    layer_seconds: float = 0.0  # running this stage's own layers (and norm on the follower)


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PipelineError(f"frame names dtype {name!r}, which torch does not have")
    return dtype


def _byte_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy (bf16 has no numpy dtype, so view it as uint8 first)."""
    flat = t.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class TensorChannel:
    """Tagged frames of named CPU tensors over one connected TCP socket (see module docstring)."""

    def __init__(self, sock: socket.socket, timeout_seconds: float) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout_seconds)
        self.sock = sock

    def close(self) -> None:
        self.sock.close()

    def send(self, step: int, seq: int, tensors: dict[str, torch.Tensor]) -> int:
        ready = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        meta = json.dumps(
            [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in ready.items()]
        ).encode()
        self.sock.sendall(_HEADER.pack(_MAGIC, step, seq, len(meta)) + meta)
        total = _HEADER.size + len(meta)
        for t in ready.values():
            view = _byte_view(t)
            self.sock.sendall(view)
            total += len(view)
        return total

    def _recv_exact(self, buf: memoryview) -> None:
        got = 0
        while got < len(buf):
            n = self.sock.recv_into(buf[got:], len(buf) - got)
            if n == 0:
                raise PipelineError("the pipeline peer closed the connection mid-step")
            got += n

    def recv(self, step: int, seq: int) -> tuple[dict[str, torch.Tensor], int]:
        header = bytearray(_HEADER.size)
        self._recv_exact(memoryview(header))
        magic, got_step, got_seq, meta_len = _HEADER.unpack(header)
        if magic != _MAGIC:
            raise PipelineError(f"pipeline frame has magic {magic!r}; the stream is corrupt")
        if (got_step, got_seq) != (step, seq):
            raise PipelineError(
                f"pipeline frame is step {got_step} seq {got_seq}, expected step {step} seq {seq}: the "
                "two engines ran different steps (a SchedulerOutput was lost or replayed twice)"
            )
        meta_buf = bytearray(meta_len)
        self._recv_exact(memoryview(meta_buf))
        out: dict[str, torch.Tensor] = {}
        total = _HEADER.size + meta_len
        for name, dtype, shape in json.loads(meta_buf):
            t = torch.empty(tuple(shape), dtype=_torch_dtype(dtype))
            if t.numel():
                view = _byte_view(t)
                self._recv_exact(view)
                total += len(view)
            out[name] = t
        return out, total


@dataclass(slots=True)
class _PipelineState:
    role: str
    first_layer: int
    end_layer: int
    token: str
    timeout_seconds: float
    listener: socket.socket | None = None
    channel: TensorChannel | None = None
    connected: threading.Event = field(default_factory=threading.Event)
    accept_error: str = ""
    saved_do_not_compile: bool = False
    counters: _Counters = field(default_factory=_Counters)
    peer: str = ""


def _accept(state: _PipelineState) -> None:
    """Follower: accept the leader's connection, check its token (daemon thread)."""
    assert state.listener is not None
    deadline = time.monotonic() + state.timeout_seconds
    try:
        while time.monotonic() < deadline:
            state.listener.settimeout(max(0.1, deadline - time.monotonic()))
            conn, addr = state.listener.accept()
            conn.settimeout(5.0)
            try:
                hello = bytearray(_HELLO.size)
                view, got = memoryview(hello), 0
                while got < len(hello):
                    n = conn.recv_into(view[got:])
                    if n == 0:
                        raise OSError("closed during hello")
                    got += n
                magic, token = _HELLO.unpack(hello)
                if magic != _MAGIC or not secrets.compare_digest(token.decode(errors="replace"), state.token):
                    raise OSError("wrong token")
                conn.sendall(b"OK")
            except OSError:
                conn.close()
                continue
            state.channel = TensorChannel(conn, state.timeout_seconds)
            state.peer = f"{addr[0]}:{addr[1]}"
            return
        state.accept_error = f"no leader connected within {state.timeout_seconds:.0f} s"
    except OSError as e:
        state.accept_error = f"accept failed: {type(e).__name__}: {e}"
    finally:
        state.connected.set()
        if state.listener is not None:
            state.listener.close()
            state.listener = None


def _connect(host: str, port: int, token: str, timeout_seconds: float) -> socket.socket:
    deadline = time.monotonic() + min(timeout_seconds, _CONNECT_SECONDS)
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5.0)
            sock.sendall(_HELLO.pack(_MAGIC, token.encode()))
            ack = sock.recv(2)
            if ack != b"OK":
                sock.close()
                raise PipelineError(f"follower at {host}:{port} refused the hello (token?)")
            return sock
        except OSError as e:
            if time.monotonic() > deadline:
                raise PipelineError(f"cannot connect to the follower at {host}:{port}: {e}") from e
            time.sleep(0.05)


class PipelineExtension:
    """Worker methods `slofleet_pipeline_*`; mixed into vLLM's Worker via SlofleetWorkerExtension."""

    model_runner: Any
    vllm_config: Any
    rank: int

    def _slofleet_pipeline(self) -> _PipelineState | None:
        return self.__dict__.get("_slofleet_pipeline_state")

    def slofleet_pipeline_enter(
        self,
        role: str,
        first_layer: str,
        end_layer: str,
        peer_host: str = "127.0.0.1",
        peer_port: str = "0",
        token: str = "",
        timeout_seconds: str = "60",
    ) -> dict[str, Any]:
        """Become a pipeline stage running decoder layers [first_layer, end_layer). The engine must
        be paused and idle (no request state in this worker), and the layers this stage does not
        own may already be dropped.

        follower: listens on `peer_host:peer_port` (port 0 picks one) and returns `port` and
        `token` for the leader. leader: connects to the follower at `peer_host:peer_port` with
        `token`. Returns `{"ok": true, ...}` or `{"ok": false, "error"}` with nothing changed.
        """
        try:
            return self._slofleet_pipeline_enter(
                role, int(first_layer), int(end_layer), peer_host, int(peer_port), token,
                float(timeout_seconds),
            )  # fmt: skip
        except (PipelineError, ValueError, OSError) as e:
            return {"ok": False, "protocol": PIPELINE_PROTOCOL, "error": f"{type(e).__name__}: {e}"}

    def _slofleet_pipeline_enter(
        self, role: str, lo: int, hi: int, host: str, port: int, token: str, timeout: float
    ) -> dict[str, Any]:
        if self._slofleet_pipeline() is not None:
            raise PipelineError("already in pipeline mode; leave it first")
        if role not in (ROLE_LEADER, ROLE_FOLLOWER):
            raise PipelineError(f"role: {role!r}; expected {ROLE_LEADER!r} or {ROLE_FOLLOWER!r}")
        model = _Internals.causal_lm(self)
        inner = _Internals.decoder(model)
        n = len(inner.layers)
        if not 0 <= lo < hi <= n:
            raise PipelineError(f"layers: [{lo}, {hi}) is not a non-empty range of the model's {n} layers")
        if role == ROLE_LEADER and lo != 0:
            raise PipelineError("layers: the leader embeds the tokens, so it must own layer 0")
        if role == ROLE_FOLLOWER and hi != n:
            raise PipelineError(f"layers: the follower computes the logits, so it must own layer {n - 1}")
        for attr, owner in (("forward", inner), ("compute_logits", model)):
            if attr in owner.__dict__:
                raise PipelineError(f"{type(owner).__name__}.{attr} is already replaced on the instance")
        _Internals.compute_logits(model)
        state = _PipelineState(role, lo, hi, token, timeout)
        result: dict[str, Any] = {"ok": True, "protocol": PIPELINE_PROTOCOL, "role": role,
                                  "layers": [lo, hi], "num_layers": n}  # fmt: skip
        if role == ROLE_FOLLOWER:
            state.token = secrets.token_hex(16)
            listener = socket.create_server((host, port))
            state.listener = listener
            result.update(port=int(listener.getsockname()[1]), token=state.token)
            threading.Thread(target=_accept, args=(state,), name="slofleet-pipeline-accept",
                             daemon=True).start()  # fmt: skip
        else:
            if not token:
                raise PipelineError("token: the leader needs the token the follower's enter returned")
            state.channel = TensorChannel(_connect(host, port, token, timeout), timeout)
            state.peer = f"{host}:{port}"
            state.connected.set()
        self._slofleet_install(model, inner, state)
        self.__dict__["_slofleet_pipeline_state"] = state
        return result

    def _slofleet_install(
        self, model: torch.nn.Module, inner: torch.nn.Module, state: _PipelineState
    ) -> None:
        """Replace the instance's forward and compute_logits (see the module docstring)."""
        original_logits = _Internals.compute_logits(model)
        layers = inner.layers
        c = state.counters

        def channel() -> TensorChannel:
            if state.channel is None:
                if not state.connected.wait(state.timeout_seconds) or state.channel is None:
                    raise PipelineError(f"pipeline peer not connected: {state.accept_error or 'timeout'}")
            return state.channel

        def run_layers(h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                       extra: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
            start = time.perf_counter()
            for layer in islice(layers, state.first_layer, state.end_layer):
                h, residual = layer(positions, h, residual, **extra)
            c.layer_seconds += time.perf_counter() - start
            assert residual is not None  # at least one layer ran
            return h, residual

        def recv(seq: int) -> dict[str, torch.Tensor]:
            start = time.perf_counter()
            tensors, n = channel().recv(c.steps, seq)
            c.wait_seconds += time.perf_counter() - start
            c.received_bytes += n
            return tensors

        def leader_forward(input_ids: torch.Tensor | None, positions: torch.Tensor,
                           intermediate_tensors: Any = None, inputs_embeds: torch.Tensor | None = None,
                           **extra: Any) -> torch.Tensor:  # fmt: skip
            c.steps += 1
            c.logits_calls = 0
            h = inputs_embeds if inputs_embeds is not None else inner.embed_input_ids(input_ids)
            h, residual = run_layers(h, None, positions, extra)
            c.sent_bytes += channel().send(c.steps, 0, {"hidden_states": h, "residual": residual})
            # A stand-in of the right shape: the runner slices it with logits_indices and hands
            # it to compute_logits below, which returns the follower's logits instead.
            return h

        def follower_forward(input_ids: torch.Tensor | None, positions: torch.Tensor,
                             intermediate_tensors: Any = None, inputs_embeds: torch.Tensor | None = None,
                             **extra: Any) -> torch.Tensor:  # fmt: skip
            c.steps += 1
            c.logits_calls = 0
            got = recv(0)
            h, residual = got["hidden_states"], got["residual"]
            if h.shape[0] != positions.shape[-1]:
                raise PipelineError(
                    f"step {c.steps}: the leader sent {h.shape[0]} tokens, this batch has "
                    f"{positions.shape[-1]}: the engines scheduled different batches"
                )
            h, residual = run_layers(h, residual, positions, extra)
            start = time.perf_counter()
            h, _ = inner.norm(h, residual)
            c.layer_seconds += time.perf_counter() - start
            return h

        def leader_logits(hidden_states: torch.Tensor) -> torch.Tensor:
            c.logits_calls += 1
            logits = recv(c.logits_calls)["logits"]
            if logits.shape[0] != hidden_states.shape[0]:
                raise PipelineError(f"step {c.steps}: {logits.shape[0]} logits rows for "
                                    f"{hidden_states.shape[0]} sampled positions")  # fmt: skip
            return logits

        def follower_logits(hidden_states: torch.Tensor) -> torch.Tensor:
            c.logits_calls += 1
            logits = original_logits(hidden_states)
            c.sent_bytes += channel().send(c.steps, c.logits_calls, {"logits": logits})
            return logits

        leader = state.role == ROLE_LEADER
        state.saved_do_not_compile = bool(inner.do_not_compile)
        inner.do_not_compile = True
        inner.forward = leader_forward if leader else follower_forward
        model.compute_logits = leader_logits if leader else follower_logits

    def slofleet_pipeline_leave(self) -> dict[str, Any]:
        """Leave pipeline mode: the original forward, compute_logits and compile switch come back
        and the connection closes. The engine must be paused with no pipeline request left; the
        dropped layers are restored separately (`slofleet_restore`)."""
        state = self._slofleet_pipeline()
        if state is None:
            return {"ok": True, "protocol": PIPELINE_PROTOCOL, "was": None}
        try:
            model = _Internals.causal_lm(self)
            inner = _Internals.decoder(model)
        except PipelineError as e:
            return {"ok": False, "protocol": PIPELINE_PROTOCOL, "error": str(e)}
        inner.__dict__.pop("forward", None)
        model.__dict__.pop("compute_logits", None)
        inner.do_not_compile = state.saved_do_not_compile
        if state.channel is not None:
            state.channel.close()
        if state.listener is not None:
            state.listener.close()
        del self.__dict__["_slofleet_pipeline_state"]
        return {"ok": True, "protocol": PIPELINE_PROTOCOL, "was": state.role,
                **self._slofleet_counters(state)}  # fmt: skip

    def slofleet_pipeline_status(self) -> dict[str, Any]:
        """This worker's role, layer range, connection and step counters (what tests and the
        sidecar read to see that a stage really ran)."""
        state = self._slofleet_pipeline()
        base: dict[str, Any] = {"ok": True, "protocol": PIPELINE_PROTOCOL, "rank": int(self.rank)}
        if state is None:
            return {**base, "role": None}
        return {**base, "role": state.role, "layers": [state.first_layer, state.end_layer],
                "connected": state.channel is not None, "peer": state.peer,
                "accept_error": state.accept_error, **self._slofleet_counters(state)}  # fmt: skip

    @staticmethod
    def _slofleet_counters(state: _PipelineState) -> dict[str, Any]:
        c = state.counters
        return {
            "steps": c.steps,
            "sent_bytes": c.sent_bytes,
            "received_bytes": c.received_bytes,
            "wait_seconds": round(c.wait_seconds, 6),
            "layer_seconds": round(c.layer_seconds, 6),
        }
