"""The OpenAI-compatible HTTP API over an :class:`~kvforge.serve.engine.Engine` (FastAPI).

``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` sends server-sent events in the
OpenAI chunk shape, ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``, and
the prefix store: ``POST /v1/kv/prefixes`` (store a prefix ahead of traffic, pinned), ``GET /v1/kv/prefixes``
(entries with tokens, bytes, hits), ``DELETE /v1/kv/prefixes/{id}`` (unpin). A request may carry
``cache_salt`` (vLLM's field): prefixes are shared only between requests with the same salt.
Every error is an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status
(5xx only for the server's own failures), and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Event, Overloaded, RequestTooLarge, SamplingParams
from .engine import Request as EngineRequest
from .text import NoChatTemplate, chat_prompt_ids

MAX_STOP = 4


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ServerInfo:
    model_name: str  # the name clients send as "model"
    spec: str
    default_max_tokens: int = 512  # chat requests that give no max_tokens: up to this many (and the context)
    created: int = 0
    require_cache_salt: bool = False  # refuse requests without a cache_salt (tenant isolation enforced)


# ------------------------------------------------------------------------------------------ validation
def _type_name(v) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(v), type(v).__name__)


def _get(body: dict, name: str, kinds: tuple, default=None, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise APIError(400, f"you must provide '{name}'", param=name, code="missing_required_parameter")
        return default
    v = body[name]
    ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
    if not ok:
        want = " or ".join(_type_name(k()) if k is not type(None) else "null" for k in kinds)
        raise APIError(400, f"'{name}' must be {want}, got {_type_name(v)} {json.dumps(v)[:40]}", param=name,
                       code="invalid_type")
    return v


def _sampling(body: dict, prompt_tokens: int, context: int, default_max: int, names=("max_tokens",)) -> SamplingParams:
    max_tokens, param = None, names[0]
    for name in names:
        v = _get(body, name, (int,))
        if v is not None:
            max_tokens, param = v, name
    if max_tokens is None:
        max_tokens = max(1, min(default_max, context - prompt_tokens))
    if max_tokens < 1:
        raise APIError(400, f"'{param}' must be at least 1, got {max_tokens}", param=param, code="invalid_value")
    if prompt_tokens >= context:
        raise APIError(400, f"the maximum context length here is {context} tokens (the model's, or its cache's size), but the prompt has "
                       f"{prompt_tokens} tokens; shorten the prompt", param="messages" if "messages" in body else "prompt",
                       code="context_length_exceeded")
    if prompt_tokens + max_tokens > context:
        raise APIError(400, f"the maximum context length here is {context} tokens (the model's, or its cache's size), but {prompt_tokens + max_tokens} "
                       f"were requested ({prompt_tokens} in the prompt, {max_tokens} in '{param}'); lower '{param}'",
                       param=param, code="context_length_exceeded")
    temperature = float(_get(body, "temperature", (int, float), 1.0))
    if not 0 <= temperature <= 2:
        raise APIError(400, f"'temperature' must be between 0 and 2, got {temperature}", param="temperature",
                       code="invalid_value")
    top_p = float(_get(body, "top_p", (int, float), 1.0))
    if not 0 <= top_p <= 1:
        raise APIError(400, f"'top_p' must be between 0 and 1, got {top_p}", param="top_p", code="invalid_value")
    if top_p == 0:  # only the most likely token, as OpenAI reads it: greedy
        temperature, top_p = 0.0, 1.0
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", param="stop",
                       code="invalid_value")
    seed = _get(body, "seed", (int,))
    for name in ("n", "best_of"):
        if _get(body, name, (int,), 1) != 1:
            raise APIError(400, f"'{name}' must be 1: this server returns one choice per request", param=name,
                           code="unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), 0) != 0:
            raise APIError(400, f"'{name}' is not supported (must be 0)", param=name, code="unsupported_value")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise APIError(400, "'logprobs' is not supported by this server", param="logprobs", code="unsupported_value")
    for name in ("tools", "functions", "logit_bias"):
        if body.get(name):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_value")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise APIError(400, "'response_format' other than {'type': 'text'} is not supported by this server",
                       param="response_format", code="unsupported_value")
    if body.get("echo") or body.get("suffix"):
        name = "echo" if body.get("echo") else "suffix"
        raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_value")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)


def _salt(body: dict, required: bool) -> str | None:
    salt = _get(body, "cache_salt", (str,))
    if salt == "":
        raise APIError(400, "'cache_salt' must be a non-empty string", param="cache_salt", code="invalid_value")
    if salt is None and required:
        raise APIError(400, "this server requires a 'cache_salt' on every request (it keeps tenants' prefixes apart)",
                       param="cache_salt", code="missing_required_parameter")
    return salt


def _stream_options(body: dict) -> bool:
    opts = _get(body, "stream_options", (dict,), {})
    return bool(opts.get("include_usage", False))


def _messages(body: dict) -> list[dict]:
    msgs = _get(body, "messages", (list,), required=True)
    if not msgs:
        raise APIError(400, "'messages' must hold at least one message", param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"'messages[{i}]' must be an object with a string 'role'", param=f"messages[{i}]",
                           code="invalid_type")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text can be read by a text model
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"'messages[{i}].content' parts must be {{'type': 'text', 'text': ...}}",
                                   param=f"messages[{i}].content", code="invalid_value")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"'messages[{i}].content' must be a string or a list of text parts, got "
                           f"{_type_name(content)}", param=f"messages[{i}].content", code="invalid_type")
        out.append({"role": m["role"], "content": content})
    return out


def _prompt_ids(body: dict, tokenizer) -> list[int]:
    prompt = _get(body, "prompt", (str, list), required=True)
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        elif not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise APIError(400, "'prompt' must be a string, a list of token ids, or a list holding one of those "
                           "(one prompt per request)", param="prompt", code="invalid_value")
    if isinstance(prompt, str):
        ids = list(tokenizer(prompt).input_ids)
        if not ids:
            raise APIError(400, "'prompt' is empty: there is nothing to continue from", param="prompt",
                           code="invalid_value")
        return ids
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    if not prompt or any((not isinstance(t, int) or isinstance(t, bool) or t < 0 or (vocab and t >= vocab)) for t in prompt):
        raise APIError(400, "'prompt' token ids must be non-empty integers within the vocabulary", param="prompt",
                       code="invalid_value")
    return list(prompt)


# ------------------------------------------------------------------------------------------ the app
def create_app(engine: Engine, info: ServerInfo) -> FastAPI:
    """The FastAPI app serving ``engine`` under the model name ``info.model_name``."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.stop()  # the server is going away: end the engine's thread (waiting requests get an error)

    app = FastAPI(title="kvforge", docs_url=None, redoc_url=None, lifespan=lifespan)
    info.created = info.created or int(time.time())
    metrics = engine.metrics
    metrics.set("kv_bytes_budget", engine.max_kv_bytes or 0)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if exc.status < 500 or exc.status == 503:  # server failures were counted by the engine
            metrics.inc("requests_total", status="rejected" if exc.status == 503 else "invalid")
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type_="invalid_request_error",
                        code="not_found" if exc.status_code == 404 else None).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return APIError(400, f"invalid request: {exc.errors()}").response()

    async def read_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {_type_name(body)}", code="invalid_json")
        model = _get(body, "model", (str,), required=True)
        if model != info.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{info.model_name}'",
                           param="model", code="model_not_found")
        _get(body, "stream", (bool,), False)
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": info.model_name, "cache": info.spec,
                "running": len(engine.running) + len(engine.prefilling), "waiting": len(engine.waiting),
                "kv_bytes_held": engine.kv_bytes_held, "max_kv_bytes": engine.max_kv_bytes}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": info.model_name, "object": "model", "created": info.created,
                                            "owned_by": "kvforge", "cache": info.spec,
                                            "context_length": engine.capacity,
                                            "max_model_len": engine.capacity}]}

    @app.get("/metrics")
    async def prometheus():
        if engine.store is not None:
            metrics.set("prefix_store_bytes", engine.store.nbytes())
            metrics.set("prefix_store_entries", len(engine.store))
        metrics.set("kv_bytes_held", engine.kv_bytes_held)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        ids = _prompt_ids(body, engine.tokenizer)
        params = _sampling(body, len(ids), engine.capacity, 16)
        return await _serve(request, body, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        try:
            ids = chat_prompt_ids(engine.tokenizer, _messages(body))
        except NoChatTemplate as e:
            raise APIError(400, str(e), param="messages", code="chat_template_missing") from None
        params = _sampling(body, len(ids), engine.capacity, info.default_max_tokens,
                           names=("max_tokens", "max_completion_tokens"))
        return await _serve(request, body, ids, params, chat=True)

    async def _serve(request: Request, body: dict, ids: list[int], params: SamplingParams, chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        req = EngineRequest(ids, params, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e),
                            cache_salt=_salt(body, info.require_cache_salt))
        try:
            engine.submit(req)
        except RequestTooLarge as e:
            raise APIError(400, str(e), param="max_tokens", code="kv_budget_exceeded") from None
        except Overloaded as e:
            raise APIError(503, str(e), type_="server_overloaded", code="overloaded", headers={"Retry-After": "1"}) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.get("stream"):
            return StreamingResponse(_sse(req, queue, rid, created, chat, _stream_options(body)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _collect(request, req, queue, rid, created, chat)

    @app.post("/v1/kv/prefixes")
    async def store_prefix(request: Request):
        """Store a prefix ahead of traffic (``prompt``: text or token ids; ``cache_salt``; ``pin``, default true)."""
        body = await read_body(request)
        ids = _prompt_ids(body, engine.tokenizer)
        salt = _salt(body, info.require_cache_salt)
        pin = _get(body, "pin", (bool,), True)
        try:
            entry = await asyncio.get_running_loop().run_in_executor(None, lambda: engine.store_prefix(ids, salt, pin))
        except ValueError as e:
            raise APIError(400, str(e), param="prompt", code="invalid_value") from None
        return {"object": "kv.prefix", **entry}

    @app.get("/v1/kv/prefixes")
    async def list_prefixes():
        entries = [] if engine.store is None else engine.store.entries()
        return {"object": "list", "data": [{"object": "kv.prefix", **e} for e in entries]}

    @app.delete("/v1/kv/prefixes/{key}")
    async def unpin_prefix(key: str):
        if engine.store is None or not engine.store.set_pinned(key, False):
            raise APIError(404, f"no stored prefix '{key}'", param="id", code="not_found")
        return {"object": "kv.prefix", "id": key, "pinned": False}

    async def _collect(request: Request, req: EngineRequest, queue, rid: str, created: int, chat: bool) -> Response:
        pieces = []
        checked = time.monotonic()
        try:
            while True:
                try:
                    e = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    e = None
                if time.monotonic() - checked >= 0.5:  # has the client gone? (events may never pause)
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        engine.cancel(req)
                        return Response(status_code=499)
                if e is None:
                    continue
                if e.error:
                    raise APIError(500, f"generation failed: {e.error}", type_="server_error")
                pieces.append(e.text)
                if e.finish_reason:
                    break
        except asyncio.CancelledError:
            engine.cancel(req)
            raise
        text = "".join(pieces)
        base = {"id": rid, "created": created, "model": info.model_name, "system_fingerprint": info.spec}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": e.finish_reason}
            return JSONResponse({**base, "object": "chat.completion", "choices": [choice], "usage": e.usage})
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": e.finish_reason}
        return JSONResponse({**base, "object": "text_completion", "choices": [choice], "usage": e.usage})

    async def _sse(req: EngineRequest, queue, rid: str, created: int, chat: bool, include_usage: bool):
        base = {"id": rid, "created": created, "model": info.model_name, "system_fingerprint": info.spec,
                "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            payload = {**base, "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                e = await queue.get()
                if e.error:
                    err = {"error": {"message": f"generation failed: {e.error}", "type": "server_error",
                                     "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                if e.text:
                    yield chunk(e.text, None)
                if e.finish_reason:
                    yield chunk(None, e.finish_reason)
                    if include_usage:
                        yield f"data: {json.dumps({**base, 'choices': [], 'usage': e.usage})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not req.done:  # the client went away mid-stream: free its slot and cache now
                engine.cancel(req)

    return app
