"""The OpenAI-compatible engine: any server speaking `/v1/completions`, e.g. a simulator model
served by vLLM on another machine.

Owns `OpenAIEngine`: token-id prompts in, token ids and log-probs out over HTTP (httpx), JSON
constraints (vLLM's `structured_outputs`, with the standard `response_format` as fallback),
retries with exponential backoff on connection errors and 5xx, timeouts, and the split of
failures into recoverable and fatal. It cannot load weights (`update_weights` raises), and
sleep/wake are no-ops (the server's memory is not ours to free).

Fidelity needs server settings: vLLM must run with `--logprobs-mode processed_logprobs` for the
log-probs to be after temperature, and must return token ids (`return_token_ids`, vLLM >= 0.10).
Callers: `build_engine` (backend 'openai'), the simulator roles, the contract tests.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import msgspec

from trustee.engines.base import (
    Completion,
    EngineStats,
    FatalEngineError,
    RecoverableEngineError,
    Sampling,
    WeightUpdate,
)
from trustee.engines.grammar import json_ebnf


class _Logprobs(msgspec.Struct):
    token_logprobs: list[float | None]


class _Choice(msgspec.Struct):
    finish_reason: str | None = None
    token_ids: list[int] | None = None
    logprobs: _Logprobs | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens_details: _PromptDetails | None = None


class _CompletionBody(msgspec.Struct):
    """The part of a /v1/completions response this engine reads."""

    choices: list[_Choice]
    usage: _Usage | None = None


_DECODER = msgspec.json.Decoder(_CompletionBody)
_RETRY_STATUS = frozenset({500, 502, 503, 504})


class OpenAIEngine:
    """`Engine` over an OpenAI-compatible HTTP server. `base_url` ends in `/v1`.
    `transport` replaces the network (tests pass `httpx.MockTransport`)."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        api_key: str | None = None,
        max_connections: int = 256,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url {base_url!r} must start with http:// or https://, e.g. http://127.0.0.1:8000/v1"
            )
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.version = 0
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._structured_outputs = True  # vLLM's field; switched to response_format if refused
        self._stats = EngineStats()
        self._inflight = 0
        self._busy_since = 0.0

    @classmethod
    def from_config(cls, cfg: Any) -> OpenAIEngine:
        """Build from an `EngineConfig`; the served model name is asked from `/models`.
        `max_num_seqs` caps the requests in flight (HTTP connections)."""
        return cls(
            cfg.base_url,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            max_connections=cfg.max_num_seqs,
        )

    def _http(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                limits=self._limits,
                transport=self._transport,
                headers=self._headers,
            )
        return self._client

    # ------------------------------------------------------------------ HTTP with retries

    async def _request(self, method: str, path: str, json: Any = None) -> httpx.Response:
        """One call with retries on connection errors, timeouts and 5xx (exponential backoff)."""
        url = f"{self.base_url}{path}"
        last: str = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                resp = await self._http().request(method, url, json=json)
            except httpx.ConnectError as e:
                last, kind = f"cannot connect: {e}", "connect"
                continue
            except httpx.TimeoutException as e:
                last, kind = f"timed out after {self.timeout_s} s ({type(e).__name__})", "timeout"
                continue
            except httpx.TransportError as e:  # reset connections, protocol errors
                last, kind = f"transport error: {e!r}", "transport"
                continue
            if resp.status_code in _RETRY_STATUS:
                last, kind = f"HTTP {resp.status_code}: {resp.text[:300]}", "5xx"
                continue
            return resp
        where = f"{method} {url} failed {self.max_retries + 1} times; last: {last}"
        if kind in ("connect", "transport"):
            raise FatalEngineError(
                f"OpenAI-compatible server unreachable: {where}; is it running at {self.base_url}?"
            )
        raise RecoverableEngineError(where)

    async def _model_name(self) -> str:
        if self.model is None:
            resp = await self._request("GET", "/models")
            try:
                self.model = str(resp.json()["data"][0]["id"])
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise FatalEngineError(
                    f"GET {self.base_url}/models gave no model id ({resp.text[:200]}); pass model="
                ) from e
        return self.model

    # ------------------------------------------------------------------ generate

    def _body(self, model: str, prompt: list[int], params: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "prompt": list(prompt),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "logprobs": 0,  # the sampled token's log-prob only
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        if params.json_schema is not None:
            if self._structured_outputs:
                # vLLM's field, with the same grammar the local engines use (compact JSON,
                # strict strings); `{"json": schema}` would allow free whitespace.
                body["structured_outputs"] = {"grammar": json_ebnf(params.json_schema)}
            else:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": params.json_schema, "strict": True},
                }
        return body

    async def generate(self, prompt: list[int], params: Sampling, *, key: str | None = None) -> Completion:
        """POST /completions with the prompt as token ids. `key` is ignored (one server)."""
        model = await self._model_name()
        if self._inflight == 0:
            self._busy_since = time.perf_counter()
        self._inflight += 1
        self._stats.requests += 1
        self._stats.prompt_tokens += len(prompt)
        try:
            out = await self._complete(model, prompt, params)
        except asyncio.CancelledError:
            self._stats.aborted += 1  # httpx closes the connection; vLLM aborts on disconnect
            raise
        except (RecoverableEngineError, FatalEngineError):
            self._stats.failed += 1
            raise
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._stats.busy_s += time.perf_counter() - self._busy_since
        self._stats.generated_tokens += len(out.token_ids)
        return out

    async def _complete(self, model: str, prompt: list[int], params: Sampling) -> Completion:
        try:
            body = self._body(model, prompt, params)
        except (RuntimeError, ValueError) as e:  # xgrammar could not compile the schema
            raise RecoverableEngineError(f"json_schema cannot be compiled by xgrammar: {e}") from e
        resp = await self._request("POST", "/completions", body)
        if resp.status_code == 400 and params.json_schema is not None and self._structured_outputs:
            if "structured_outputs" in resp.text:  # a server without vLLM's field: use the standard one
                self._structured_outputs = False
                resp = await self._request("POST", "/completions", self._body(model, prompt, params))
        if resp.status_code != 200:
            raise RecoverableEngineError(
                f"server refused the request: HTTP {resp.status_code}: {resp.text[:300]}"
            )
        return self._parse(resp.content)

    def _parse(self, content: bytes) -> Completion:
        try:
            body = _DECODER.decode(content)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise RecoverableEngineError(f"malformed /completions body ({e}): {content[:200]!r}") from e
        if len(body.choices) != 1:
            raise RecoverableEngineError(f"expected 1 choice, got {len(body.choices)}: {content[:200]!r}")
        c = body.choices[0]
        if c.token_ids is None:
            raise RecoverableEngineError(
                "response has no token_ids; the server must support return_token_ids (vLLM >= 0.10)"
            )
        if c.logprobs is None or len(c.logprobs.token_logprobs) != len(c.token_ids):
            raise RecoverableEngineError(
                f"response has {len(c.token_ids)} token ids but logprobs {c.logprobs!r:.120}"
            )
        lps = c.logprobs.token_logprobs
        if any(lp is None for lp in lps):
            raise RecoverableEngineError(f"response has null log-probs: {content[:200]!r}")
        reason = c.finish_reason if c.finish_reason in ("stop", "length", "abort") else "stop"
        details = body.usage.prompt_tokens_details if body.usage else None
        return Completion(
            token_ids=c.token_ids,
            logprobs=[float(lp) for lp in lps if lp is not None],
            finish_reason=reason,
            policy_version=self.version,
            prompt_cached_tokens=details.cached_tokens if details else None,
        )

    # ------------------------------------------------------------------ the rest of the contract

    async def update_weights(self, update: WeightUpdate) -> None:
        raise NotImplementedError(
            "the openai backend serves a remote model and cannot load weights; use backend 'vllm' or 'hf' for the policy"
        )

    async def sleep(self, level: int = 1) -> None:
        """No-op: a remote server's memory is not on our GPUs."""

    async def wake(self) -> None:
        """No-op (see `sleep`)."""

    def stats(self) -> EngineStats:
        return msgspec.structs.replace(self._stats)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
