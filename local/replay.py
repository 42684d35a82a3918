"""`slofleet replay`: drive a running fleet with a real trace's arrivals and report what users saw.

Prompts are synthesised as token-id lists of exactly the trace's prompt length (ids drawn from the
served model's vocabulary, seeded), and outputs are pinned to the trace's lengths with
`ignore_eos`, so the load the fleet sees is the trace's load, not the tiny model's whims.
Interactive requests stream (TTFT and ITL are measured at the client); batch requests carry the
batch class header and are only judged against their deadline.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from slofleet.instance import RequestClass


@dataclass(frozen=True, slots=True)
class Arrival:
    at_seconds: float
    prompt_tokens: int
    output_tokens: int
    request_class: RequestClass = RequestClass.INTERACTIVE


@dataclass(slots=True)
class Outcome:
    arrival: Arrival
    sent_at: float
    ok: bool = False
    status: int = 0
    error: str = ""
    ttft_seconds: float | None = None
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    finished_at: float = 0.0

    @property
    def completed(self) -> bool:
        """Answered in full: every token the trace asked for arrived."""
        return self.ok and self.output_tokens >= self.arrival.output_tokens

    @property
    def itl_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]

    @property
    def e2e_seconds(self) -> float:
        return self.finished_at - self.sent_at


def synthesise_prompt(rng: random.Random, length: int, vocab_low: int, vocab_high: int) -> list[int]:
    return [rng.randrange(vocab_low, vocab_high) for _ in range(length)]


async def _send_one(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    arrival: Arrival,
    prompt_ids: list[int],
    t0: float,
) -> Outcome:
    outcome = Outcome(arrival=arrival, sent_at=time.monotonic() - t0)
    body = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": arrival.output_tokens,
        "min_tokens": arrival.output_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        # Token ids per chunk: a chunk's text can be empty (an incomplete UTF-8 sequence), so
        # text alone cannot count tokens.
        "return_token_ids": True,
    }
    interactive = arrival.request_class == RequestClass.INTERACTIVE
    headers = {"X-Slofleet-Class": arrival.request_class.value}
    if interactive:
        body["stream"] = True
    try:
        async with session.post(f"{base_url}/v1/completions", json=body, headers=headers) as resp:
            outcome.status = resp.status
            if resp.status != 200:
                outcome.error = (await resp.text())[:300]
                return outcome
            if interactive:
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        outcome.error = str(chunk["error"])[:300]
                        return outcome
                    for choice in chunk.get("choices", []):
                        n = len(choice.get("token_ids") or [])
                        if n:
                            now = time.monotonic() - t0
                            if outcome.ttft_seconds is None:
                                outcome.ttft_seconds = now - outcome.sent_at
                            outcome.token_times.extend([now] * n)
                            outcome.output_tokens += n
            else:
                payload = await resp.json()
                outcome.output_tokens = int(payload.get("usage", {}).get("completion_tokens", 0))
            outcome.ok = True
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        outcome.finished_at = time.monotonic() - t0
    return outcome


async def replay(
    base_url: str,
    model: str,
    arrivals: Sequence[Arrival],
    vocab: tuple[int, int],
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
    sample: Callable[[float], None] | None = None,
    request_timeout_seconds: float = 3600.0,
) -> list[Outcome]:
    """Send every arrival at its time (relative to now) and wait for all of them."""
    rng = random.Random(seed)
    prompts = [synthesise_prompt(rng, a.prompt_tokens, *vocab) for a in arrivals]
    timeout = aiohttp.ClientTimeout(total=request_timeout_seconds)
    connector = aiohttp.TCPConnector(limit=0)
    done = 0
    outcomes: list[Outcome] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.monotonic()
        tasks: list[asyncio.Task[Outcome]] = []

        def _finished(_: asyncio.Task[Outcome]) -> None:
            nonlocal done
            done += 1
            if on_progress:
                on_progress(done, len(arrivals))

        async def _sampler() -> None:
            while sample is not None:
                await asyncio.to_thread(sample, time.monotonic() - t0)
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(_sampler())
        try:
            for arrival, prompt in zip(arrivals, prompts, strict=True):
                delay = arrival.at_seconds - (time.monotonic() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(_send_one(session, base_url, model, arrival, prompt, t0))
                task.add_done_callback(_finished)
                tasks.append(task)
            outcomes = list(await asyncio.gather(*tasks))
        finally:
            sampler.cancel()
    return outcomes
