"""The OpenAI-compatible HTTP API in front of an :class:`~mindformers_ext.serving.engine.Engine` (FastAPI).

Endpoints: ``GET /v1/models``, ``POST /v1/completions`` (``suffix`` for fill-in-the-middle with the
family's FIM tokens), ``POST /v1/chat/completions`` (the family's chat template), both streamed as
server-sent events ending with ``data: [DONE]`` when ``stream`` is true; ``GET /health`` and
Prometheus-style ``GET /metrics``. Errors are OpenAI's JSON (``{"error": {"message", "type", "param",
"code"}}``): 400 for bad requests (the message names the field), 404 for an unknown model, 503 when
the queue is full. Sampling defaults not set by a request come from the model's generation config
(as vLLM does): without ``temperature`` the YAML's ``do_sample`` / ``top_k`` / ``top_p`` /
``repetition_penalty`` apply; ``temperature: 0`` is greedy. OpenAI's ``presence_penalty`` and
``frequency_penalty`` (default 0) count the tokens generated so far, not the prompt's, as vLLM does.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mindformers_ext.generation.chat_templates import apply_chat_template
from mindformers_ext.generation.fim import build_fim_prompt, fim_stop_token_ids
from mindformers_ext.generation.sampling import SamplingParams
from mindformers_ext.serving.engine import Engine, EngineFull, Event, GenerationRequest


_TYPE_TAG = re.compile(r"str|int|float|bool|list\[.*\]|dict\[.*\]|[a-z]+-[a-z-]+\[.*\]")


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 kind: str = "invalid_request_error", code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    presence_penalty: Optional[float] = None  # ranges: SamplingParams.validate
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None  # token id (a JSON key, so a string) -> bias
    n: int = 1
    stream: bool = False
    stream_options: Optional[dict] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens (benchmarks)


class CompletionBody(_Sampling):
    """``POST /v1/completions``."""
    prompt: Union[str, list[str], list[int], list[list[int]]]  # text(s), or token ids (one list or several)
    suffix: Optional[str] = None
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None


class ChatBody(_Sampling):
    """``POST /v1/chat/completions``."""
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


@dataclass
class ServedModel:
    """What the API serves: the engine, its tokenizer, the name clients use and the model family
    (for the FIM tokens and the chat template); ``defaults`` are the model's sampling defaults."""
    engine: Engine
    tokenizer: Any
    name: str
    family: str
    defaults: SamplingParams


def _sampling(body: _Sampling, defaults: SamplingParams, vocab_size: int) -> SamplingParams:
    penalties = dict(repetition_penalty=defaults.repetition_penalty if body.repetition_penalty is None
                     else body.repetition_penalty,
                     presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                     logit_bias=_logit_bias(body.logit_bias or {}, vocab_size))
    if body.temperature is None:  # the model's own generation defaults, overridden field by field
        return SamplingParams(defaults.do_sample, defaults.temperature,
                              defaults.top_k if body.top_k is None else body.top_k,
                              defaults.top_p if body.top_p is None else body.top_p, **penalties)
    if body.temperature == 0:
        return SamplingParams(False, 1.0, 0, 1.0, **penalties)
    return SamplingParams(True, body.temperature, body.top_k or 0,
                          1.0 if body.top_p is None else body.top_p, **penalties)


def _logit_bias(bias: dict, vocab_size: int) -> tuple:
    """OpenAI's ``logit_bias`` as sorted (token id, bias) pairs; 400 for a key that is not a token id of the
    model (the biases' range is checked with the other settings, :meth:`SamplingParams.validate`)."""
    pairs = []
    for key, value in bias.items():
        token = int(key) if key.strip().lstrip("-").isdigit() else None
        if token is None or not 0 <= token < vocab_size:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of the model (0 to {vocab_size - 1})",
                           "logit_bias")
        pairs.append((token, float(value)))
    return tuple(sorted(pairs))


def _prompt_list(prompt: Union[str, list]) -> list:
    """A completion request's prompts: strings, or lists of token ids (OpenAI's "array of tokens" is one
    prompt, its "array of token arrays" several)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return list(prompt)


def _stops(stop: Optional[Union[str, list[str]]]) -> tuple:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: at most 4 non-empty strings", "stop")
    return tuple(stops)


def _token_id(tokenizer: Any, token: str) -> Optional[int]:
    """The id of ``token`` when the tokenizer has it as one token."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if isinstance(tid, int) and tid >= 0 and tokenizer.convert_ids_to_tokens(tid) == token:
        return tid
    return None


class _Mailbox:
    """Hands events from the engine's thread to the event loop with one wake-up for all that arrive
    together (a decode step emits one event per running request; waking the loop for each costs a
    system call and a loop turn while the step holds the interpreter)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.lock, self.pending, self.scheduled = loop, threading.Lock(), [], False

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.pending.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for queue, item in items:
            queue.put_nowait(item)


class _Collector:
    """Receives the engine's events (in its thread) into an asyncio queue, tagged with the choice index."""

    def __init__(self, mailbox: _Mailbox) -> None:
        self.mailbox, self.queue = mailbox, asyncio.Queue()

    def sink(self, index: int):
        return lambda event: self.mailbox.put(self.queue, (index, event))


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def build_app(served: ServedModel) -> FastAPI:
    """The FastAPI application serving ``served`` (starts and stops the engine's thread with the app)."""
    engine, tokenizer = served.engine, served.tokenizer
    vocab = engine.model.config.vocab_size  # token ids a request may name: 0 to vocab - 1
    eot = _token_id(tokenizer, "<|EOT|>")
    chat_stops = (eot,) if eot is not None else ()
    try:
        fim_stops = tuple(fim_stop_token_ids(tokenizer, served.family))
    except KeyError:
        fim_stops = None  # no FIM tokens in this family: ``suffix`` is refused

    mailboxes: dict = {}  # event loop -> its mailbox (one loop in practice)

    def mailbox() -> _Mailbox:
        loop = asyncio.get_running_loop()
        if loop not in mailboxes:
            mailboxes[loop] = _Mailbox(loop)
        return mailboxes[loop]

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="mindformers-ext", lifespan=lifespan)
    app.state.served = served

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        # the field's path; pydantic adds the union member tried ("str", "list[str]") for union fields
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_TAG.fullmatch(str(p))]
        field = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            message, field = f"the body is not valid JSON: {first.get('msg')} at character {loc[-1] if loc else '?'}", None
        elif first.get("type") == "extra_forbidden":
            message = f"{field}: unknown field"
        elif first.get("type") == "missing":
            message = f"{field}: required field missing"
        else:
            message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        return APIError(400, message, field).response()

    def check_model(name: str) -> None:
        if name != served.name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{served.name}'",
                           "model", code="model_not_found")

    def check_common(body: _Sampling, max_tokens: Optional[int], prompt_len: int) -> int:
        check_model(body.model)
        if body.n != 1:
            raise APIError(400, f"n: only n=1 is supported, got {body.n}", "n")
        if body.stream_options is not None and (not body.stream or set(body.stream_options) - {"include_usage"}):
            raise APIError(400, "stream_options: only {'include_usage': bool}, with stream=true", "stream_options")
        room = engine.capacity - prompt_len
        if room < 1:
            raise APIError(400, f"prompt: {prompt_len} tokens do not fit the model's context of "
                                f"{engine.capacity} tokens with at least one new token", "prompt")
        if max_tokens is None:
            return room
        if max_tokens < 1:
            raise APIError(400, f"max_tokens: must be >= 1, got {max_tokens}", "max_tokens")
        if max_tokens > room:
            raise APIError(400, f"max_tokens: the prompt has {prompt_len} tokens, so at most {room} new "
                                f"tokens fit the model's context of {engine.capacity}; got {max_tokens}",
                           "max_tokens")
        return max_tokens

    def submit(requests: list, collector: _Collector) -> list:
        ids = []
        try:
            for index, request in enumerate(requests):
                ids.append(engine.submit(request, collector.sink(index)))
        except EngineFull as exc:
            for request_id in ids:
                engine.cancel(request_id)
            raise APIError(503, str(exc), kind="server_overloaded", code="queue_full") from exc
        except ValueError as exc:
            for request_id in ids:
                engine.cancel(request_id)
            raise APIError(400, str(exc), str(exc).split(":", 1)[0]) from exc
        return ids

    async def collect(request: Request, collector: _Collector, ids: list) -> list:
        """Every choice's events until each finished; cancels all when the client goes away."""
        events = [[] for _ in ids]
        done = 0
        while done < len(ids):
            try:
                index, event = await asyncio.wait_for(collector.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    for request_id in ids:
                        engine.cancel(request_id)
                    return []
                continue
            events[index].append(event)
            done += event.finish_reason is not None
        if any(e[-1].finish_reason == "error" for e in events):
            raise APIError(500, f"the engine failed: {engine.error!r}", kind="server_error")
        return events

    async def stream(collector: _Collector, ids: list, chunk, usage_chunk) -> AsyncIterator[str]:
        finished, usage = 0, [0, 0]
        try:
            while finished < len(ids):
                index, event = await collector.queue.get()
                if event.finish_reason == "error":
                    yield _sse({"error": {"message": f"the engine failed: {engine.error!r}", "type": "server_error",
                                          "param": None, "code": None}})
                    break
                if event.text or event.finish_reason is not None or event.logprobs:
                    yield _sse(chunk(index, event))
                if event.finish_reason is not None:
                    finished += 1
                    usage[0] += event.prompt_tokens
                    usage[1] += event.completion_tokens
            if usage_chunk is not None:
                yield _sse(usage_chunk(usage))
            yield "data: [DONE]\n\n"
        finally:
            if finished < len(ids):  # the client went away mid-stream (or the engine failed)
                for request_id in ids:
                    engine.cancel(request_id)

    def usage_of(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def logprobs_of(events: list, offset: int) -> dict:
        entries = [lp for e in events for lp in (e.logprobs or [])]
        offsets, pos = [], offset
        for token, _, _ in entries:
            offsets.append(pos)
            pos += len(token)
        return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [top for _, _, top in entries], "text_offset": offsets}

    def chat_logprobs(events: list, asked: bool) -> Optional[dict]:
        """The chat API's ``logprobs`` of these events' tokens (None unless the request ``asked`` for them)."""
        if not asked:
            return None
        entries = [lp for e in events for lp in (e.logprobs or [])]

        def entry(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
        return {"content": [{**entry(token, value), "top_logprobs": [entry(t, v) for t, v in top.items()]}
                            for token, value, top in entries]}

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "error", "error": repr(engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "mindformers-ext", "max_model_len": engine.capacity}]}

    @app.get("/metrics")
    async def metrics():
        s = engine.stats()
        ttft = np.array(s["ttft"]) if s["ttft"] else np.zeros(0)
        lines = []

        def metric(name: str, kind: str, help_text: str, value: float, labels: str = "") -> None:
            if not any(line.startswith(f"# TYPE {name} ") for line in lines):
                lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            lines.append(f"{name}{labels} {value}")

        metric("mfx_queue_length", "gauge", "Requests waiting for admission.", s["waiting"])
        metric("mfx_running_requests", "gauge", "Requests in the running batch.", s["running"])
        metric("mfx_kv_cache_free_blocks", "gauge", "Free blocks of the paged KV cache.", s["free_blocks"])
        metric("mfx_kv_cache_blocks", "gauge", "Blocks of the paged KV cache.", s["num_blocks"])
        metric("mfx_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
               s["tokens_per_second"])
        for key, help_text in (("requests", "Requests accepted."), ("finished", "Requests finished."),
                               ("cancelled", "Requests cancelled (client gone)."),
                               ("rejected", "Requests refused with 503 (queue full)."),
                               ("prompt_tokens", "Prompt tokens prefilled."),
                               ("generated_tokens", "Tokens generated.")):
            metric(f"mfx_{key}_total", "counter", help_text, s[key])
        name = "mfx_time_to_first_token_seconds"
        for q in (0.5, 0.9, 0.99):
            metric(name, "summary", "Time from submission to the first token (last 1000 requests).",
                   float(np.quantile(ttft, q)) if ttft.size else float("nan"), f'{{quantile="{q}"}}')
        lines += [f"{name}_sum {float(ttft.sum())}", f"{name}_count {ttft.size}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        prompts = _prompt_list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt: at least one prompt is needed", "prompt")
        for p in prompts:
            bad = [t for t in p if not 0 <= t < vocab] if isinstance(p, list) else []
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the model's vocabulary (0 to {vocab - 1})",
                               "prompt")
        stop_ids: tuple = ()
        if body.suffix is not None:
            if fim_stops is None:
                raise APIError(400, f"suffix: the {served.family} family has no fill-in-the-middle tokens", "suffix")
            if body.echo:
                raise APIError(400, "echo: not supported together with suffix", "echo")
            if any(isinstance(p, list) for p in prompts):
                raise APIError(400, "suffix: fill-in-the-middle needs a text prompt, not token ids", "suffix")
            texts = [build_fim_prompt(p, body.suffix, served.family) for p in prompts]
            stop_ids = fim_stops
        else:
            texts = prompts
        encoded = [p if isinstance(p, list) else [int(t) for t in tokenizer(p, add_special_tokens=True)["input_ids"]]
                   for p in texts]
        max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default
        params = _sampling(body, served.defaults, vocab)
        stops = _stops(body.stop)
        reqs = []
        for ids in encoded:
            reqs.append(GenerationRequest(ids, check_common(body, max_tokens, len(ids)), params, body.seed, stops,
                                          stop_ids, body.logprobs, body.ignore_eos))
        _validate(params)
        collector = _Collector(mailbox())
        ids = submit(reqs, collector)
        created, cid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        prefix = [(tokenizer.decode(p, skip_special_tokens=True) if isinstance(p, list) else p) if body.echo else ""
                  for p in prompts]
        if body.stream:
            def chunk(index: int, event: Event) -> dict:
                text = prefix[index] + event.text
                prefix[index] = ""
                lp = logprobs_of([event], 0) if body.logprobs is not None else None
                return {"id": cid, "object": "text_completion", "created": created, "model": served.name,
                        "choices": [{"index": index, "text": text, "logprobs": lp,
                                     "finish_reason": event.finish_reason}]}
            include = bool((body.stream_options or {}).get("include_usage"))
            usage = (lambda u: {"id": cid, "object": "text_completion", "created": created, "model": served.name,
                                "choices": [], "usage": usage_of(*u)}) if include else None
            return StreamingResponse(stream(collector, ids, chunk, usage), media_type="text/event-stream")
        events = await collect(request, collector, ids)
        if not events:
            return JSONResponse({}, status_code=499)
        choices = []
        for index, evs in enumerate(events):
            text = prefix[index] + "".join(e.text for e in evs)
            lp = logprobs_of(evs, len(prefix[index])) if body.logprobs is not None else None
            choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": evs[-1].finish_reason})
        return {"id": cid, "object": "text_completion", "created": created, "model": served.name,
                "choices": choices, "usage": usage_of(sum(e[-1].prompt_tokens for e in events),
                                                       sum(e[-1].completion_tokens for e in events))}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            text = apply_chat_template(messages, tokenizer, family=served.family)
        except (KeyError, ValueError) as exc:
            raise APIError(400, f"messages: {exc}", "messages") from exc
        prompt_ids = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "max_completion_tokens: give max_tokens or max_completion_tokens, not both",
                           "max_completion_tokens")
        max_tokens = check_common(body, body.max_completion_tokens if body.max_tokens is None else body.max_tokens,
                                  len(prompt_ids))
        params = _sampling(body, served.defaults, vocab)
        _validate(params)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        req = GenerationRequest(prompt_ids, max_tokens, params, body.seed, _stops(body.stop), chat_stops,
                                (body.top_logprobs or 0) if body.logprobs else None, body.ignore_eos)
        collector = _Collector(mailbox())
        ids = submit([req], collector)
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            first = [True]

            def chunk(index: int, event: Event) -> dict:
                delta = {"content": event.text} if event.text else {}
                if first[0]:
                    delta = {"role": "assistant", **delta}
                    first[0] = False
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": served.name,
                        "choices": [{"index": index, "delta": delta, "finish_reason": event.finish_reason,
                                     "logprobs": chat_logprobs([event], body.logprobs)}]}
            include = bool((body.stream_options or {}).get("include_usage"))
            usage = (lambda u: {"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": served.name, "choices": [], "usage": usage_of(*u)}) if include else None
            return StreamingResponse(stream(collector, ids, chunk, usage), media_type="text/event-stream")
        events = await collect(request, collector, ids)
        if not events:
            return JSONResponse({}, status_code=499)
        evs = events[0]
        return {"id": cid, "object": "chat.completion", "created": created, "model": served.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(e.text for e in evs)},
                             "logprobs": chat_logprobs(evs, body.logprobs), "finish_reason": evs[-1].finish_reason}],
                "usage": usage_of(evs[-1].prompt_tokens, evs[-1].completion_tokens)}

    return app


def _validate(params: SamplingParams) -> None:
    try:
        params.validate()
    except ValueError as exc:
        raise APIError(400, str(exc), str(exc).split(" ", 1)[0]) from exc
