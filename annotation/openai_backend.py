"""Annotation through any OpenAI-compatible chat-completions server (vLLM, SGLang, hosted).

One asyncio loop, an ``aiohttp`` session and a semaphore bound the requests in flight
(``concurrency``). Each HTTP request has a timeout and is retried with exponential backoff on
429, 5xx, timeouts and connection errors (honouring ``Retry-After``). On top of that, an answer
that fails validation is sent back to the model with the validation error, ``max_retries``
times; after that the pair keeps an empty list, status ``annotation_failed`` and the raw answer.
The API key is read from the environment variable named in the config and sent only in the
``Authorization`` header; it is never logged or stored.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import time
from typing import Any

import aiohttp

from know3d.annotation.base import PairRequest, Replicas
from know3d.annotation.config import AnnotateConfig
from know3d.annotation.schema import AnnotationError, ask_again, check_answer, failure_record, success_record

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class RequestFailed(RuntimeError):
    """The server did not give a usable answer after every HTTP attempt."""


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def build_prompt(cfg: AnnotateConfig, hint: list[str]) -> str:
    hint_text = f" The object's named parts visible from the back include: {', '.join(hint)}." if hint else ""
    return cfg.prompt.format(max_items=cfg.max_items, max_words=cfg.max_words, hint=hint_text)


class OpenAIAnnotator:
    """Client of an OpenAI-compatible server (vLLM, SGLang serving Qwen2.5-VL): the server batches,
    so the build calls it from the driver with ``openai.concurrency`` requests in flight."""

    @staticmethod
    def replicas(cfg: AnnotateConfig) -> Replicas | None:
        return None

    @staticmethod
    def wants_parts(cfg: AnnotateConfig) -> bool:
        return cfg.parts_hint

    @staticmethod
    def model_name(cfg: AnnotateConfig) -> str:
        return cfg.openai.model

    @staticmethod
    def cache_salt(cfg: AnnotateConfig) -> str:
        return ""

    def __init__(self, cfg: AnnotateConfig) -> None:
        self.cfg = cfg
        self.api = cfg.openai
        key = os.environ.get(self.api.api_key_env)
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self.url = self.api.base_url.rstrip("/") + "/chat/completions"
        self.max_in_flight = 0
        self._in_flight = 0

    async def _post(
        self, session: aiohttp.ClientSession, sem: asyncio.Semaphore, messages: list[dict]
    ) -> tuple[str, int]:
        payload = {
            "model": self.api.model,
            "messages": messages,
            "max_tokens": self.api.max_tokens,
            "temperature": self.api.temperature,
        }
        last = "no attempt"
        for attempt in range(self.api.max_attempts):
            retry_after: float | None = None
            async with sem:
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
                try:
                    async with session.post(self.url, json=payload, headers=self._headers) as resp:
                        if resp.status == 200:
                            body = await resp.json(content_type=None)
                            text = body["choices"][0]["message"]["content"] or ""
                            tokens = int((body.get("usage") or {}).get("completion_tokens") or 0)
                            return text, tokens
                        last = f"HTTP {resp.status}"
                        if resp.status not in _RETRY_STATUS:
                            raise RequestFailed(f"{last}: {(await resp.text())[:200]}")
                        header = resp.headers.get("Retry-After")
                        retry_after = float(header) if header and header.replace(".", "", 1).isdigit() else None
                except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                    last = f"{type(exc).__name__}"
                except (KeyError, IndexError, TypeError, ValueError) as exc:
                    last = f"malformed response ({type(exc).__name__})"
                finally:
                    self._in_flight -= 1
            if attempt + 1 < self.api.max_attempts:
                delay = retry_after if retry_after is not None else self.api.backoff_s * 2**attempt
                await asyncio.sleep(min(delay, 60.0) * (1.0 + 0.1 * random.random()))
        raise RequestFailed(f"{last} after {self.api.max_attempts} attempts")

    async def _annotate_one(
        self, session: aiohttp.ClientSession, sem: asyncio.Semaphore, req: PairRequest
    ) -> dict[str, Any]:
        start = time.perf_counter()
        messages: list[dict] = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": build_prompt(self.cfg, req.hint)},
                    {"type": "image_url", "image_url": {"url": _data_url(req.front_png)}},
                    {"type": "image_url", "image_url": {"url": _data_url(req.back_png)}},
                ],
            }
        ]
        tokens, raw, error, attempts = 0, "", "", 0
        for attempt in range(self.cfg.max_retries + 1):
            try:
                raw, used = await self._post(session, sem, messages)
            except RequestFailed as exc:
                error = str(exc)
                break
            attempts, tokens = attempt + 1, tokens + used
            try:
                parsed = check_answer(raw, self.cfg.max_items, self.cfg.max_words)
            except AnnotationError as exc:
                error = str(exc)
                messages += ask_again(raw, exc)
                continue
            return {**success_record(parsed, attempt, raw, tokens), "latency_s": time.perf_counter() - start}
        return {**failure_record(error, raw, attempts, tokens), "latency_s": time.perf_counter() - start}

    async def _run(self, requests: list[PairRequest]) -> list[dict[str, Any]]:
        sem = asyncio.Semaphore(self.api.concurrency)
        timeout = aiohttp.ClientTimeout(total=self.api.timeout_s)
        connector = aiohttp.TCPConnector(limit=self.api.concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            return list(await asyncio.gather(*(self._annotate_one(session, sem, r) for r in requests)))

    def annotate(self, requests: list[PairRequest]) -> list[dict[str, Any]]:
        """One result per request, in order; never raises for a request's sake."""
        if not requests:
            return []
        return asyncio.run(self._run(requests))
