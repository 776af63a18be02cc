"""The OpenAI-compatible engine's failure handling, against fakes: httpx.MockTransport servers
(`FakeServer`) and a loopback socket that accepts and never answers (`FakeSilentServer`).
The engine against a real vLLM server runs in the contract suite (test_engine_contract.py)."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from trustee.engines.base import FatalEngineError, RecoverableEngineError, Sampling
from trustee.engines.openai import OpenAIEngine


def _ok_body(ids: list[int], lps: list[float], reason: str = "length") -> dict:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "choices": [
            {
                "index": 0,
                "text": "",
                "token_ids": ids,
                "finish_reason": reason,
                "logprobs": {"token_logprobs": lps},
            }
        ],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": len(ids),
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


class FakeServer:
    """Scripted /v1 endpoints: each POST /completions pops the next (status, body) reply."""

    def __init__(self, replies: list[tuple[int, object]]):
        self.replies = list(replies)
        self.requests: list[dict] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "fake-model"}]})
        self.requests.append(json.loads(request.content))
        status, body = self.replies.pop(0)
        if isinstance(body, bytes):
            return httpx.Response(status, content=body)
        return httpx.Response(status, json=body)

    def engine(self, **kw) -> OpenAIEngine:
        return OpenAIEngine(
            "http://fake/v1", transport=httpx.MockTransport(self.handler), backoff_s=0.01, **kw
        )


def _run(coro):
    return asyncio.run(coro)


async def _generate_and_close(eng: OpenAIEngine, params: Sampling | None = None):
    try:
        return await eng.generate([1, 2, 3], params or Sampling(max_tokens=3))
    finally:
        await eng.close()


def test_request_body_and_parsed_completion():
    fake = FakeServer([(200, _ok_body([7, 8, 2], [-0.5, -1.0, -0.1], "stop"))])
    params = Sampling(
        max_tokens=3, temperature=0.7, seed=4, stop_token_ids=(2,), json_schema={"type": "object"}
    )
    out = _run(_generate_and_close(fake.engine(), params))
    assert out.token_ids == [7, 8, 2] and out.logprobs == [-0.5, -1.0, -0.1]
    assert out.finish_reason == "stop" and out.prompt_cached_tokens == 0 and out.policy_version == 0
    sent = fake.requests[0]
    assert sent["prompt"] == [1, 2, 3] and sent["model"] == "fake-model" and sent["return_token_ids"] is True
    assert sent["stop_token_ids"] == [2] and sent["seed"] == 4 and sent["logprobs"] == 0
    assert "root ::=" in sent["structured_outputs"]["grammar"]  # the shared EBNF grammar


def test_5xx_is_retried_then_succeeds():
    fake = FakeServer([(503, {"error": "busy"}), (500, {"error": "oops"}), (200, _ok_body([5], [-1.0]))])
    out = _run(_generate_and_close(fake.engine(max_retries=3)))
    assert out.token_ids == [5]
    assert len(fake.requests) == 3


def test_5xx_after_all_retries_is_recoverable():
    fake = FakeServer([(502, {"error": "bad gateway"})] * 3)
    eng = fake.engine(max_retries=2)
    with pytest.raises(RecoverableEngineError, match="HTTP 502"):
        _run(_generate_and_close(eng))
    assert len(fake.requests) == 3 and eng.stats().failed == 1


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        {"choices": []},
        {"choices": [{"text": "hi", "finish_reason": "stop"}]},  # no token_ids
        {"choices": [{"token_ids": [1, 2], "finish_reason": "stop", "logprobs": {"token_logprobs": [-1.0]}}]},
        {"choices": [{"token_ids": [1], "finish_reason": "stop", "logprobs": {"token_logprobs": [None]}}]},
    ],
    ids=["not-json", "no-choices", "no-token-ids", "short-logprobs", "null-logprob"],
)
def test_malformed_bodies_are_recoverable(body):
    fake = FakeServer([(200, body)])
    with pytest.raises(RecoverableEngineError):
        _run(_generate_and_close(fake.engine()))


def test_4xx_is_recoverable_and_not_retried():
    fake = FakeServer([(400, {"error": {"message": "prompt too long"}})])
    with pytest.raises(RecoverableEngineError, match="prompt too long"):
        _run(_generate_and_close(fake.engine()))
    assert len(fake.requests) == 1


def test_falls_back_to_response_format_when_structured_outputs_is_refused():
    refusal = {"error": {"message": "Unrecognized request argument: structured_outputs"}}
    fake = FakeServer([(400, refusal), (200, _ok_body([3], [-0.2]))])
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    out = _run(_generate_and_close(fake.engine(), Sampling(max_tokens=2, json_schema=schema)))
    assert out.token_ids == [3]
    assert "structured_outputs" in fake.requests[0] and "structured_outputs" not in fake.requests[1]
    assert fake.requests[1]["response_format"]["json_schema"]["schema"] == schema


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


def test_refused_connection_is_fatal_after_retries():
    eng = OpenAIEngine(f"http://127.0.0.1:{_closed_port()}/v1", model="m", max_retries=2, backoff_s=0.01)
    with pytest.raises(FatalEngineError, match="unreachable.*failed 3 times"):
        _run(_generate_and_close(eng))


class FakeSilentServer:
    """A loopback TCP server that accepts connections and never answers."""

    async def __aenter__(self) -> int:
        self.done = asyncio.Event()
        self.server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _hold(self, reader, writer):
        await self.done.wait()
        writer.close()

    async def __aexit__(self, *exc):
        self.done.set()
        self.server.close()
        await asyncio.sleep(0.05)  # let the handlers close their sockets


def test_timeout_is_retried_then_recoverable():
    async def scenario():
        async with FakeSilentServer() as port:
            eng = OpenAIEngine(
                f"http://127.0.0.1:{port}/v1", model="m", timeout_s=0.2, max_retries=1, backoff_s=0.01
            )
            return await _generate_and_close(eng)

    with pytest.raises(RecoverableEngineError, match="failed 2 times; last: timed out"):
        _run(scenario())


def test_cancellation_counts_an_abort():
    async def scenario():
        async with FakeSilentServer() as port:
            eng = OpenAIEngine(f"http://127.0.0.1:{port}/v1", model="m", timeout_s=30)
            task = asyncio.create_task(eng.generate([1], Sampling(max_tokens=2)))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await eng.close()
            return eng.stats()

    stats = _run(scenario())
    assert stats.aborted == 1 and stats.failed == 0


def test_update_weights_is_refused():
    from trustee.engines.base import FullUpdate

    eng = OpenAIEngine("http://127.0.0.1:9/v1", model="m")
    with pytest.raises(NotImplementedError, match="cannot load weights"):
        _run(eng.update_weights(FullUpdate(chunks=[])))
