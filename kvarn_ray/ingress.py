"""OpenAIIngress: the app's entry point, over HTTP (FastAPI) and over Python handles.

    POST /v1/completions, POST /v1/chat/completions   OpenAI bodies; "stream": true -> SSE
    GET  /v1/models, GET /health
    generate(body)          handle API: the same bodies and response shapes; a body with
                            "stream": true returns chunks (call with stream=True)

A request: JSON -> ``protocol.parse_request`` (400 on anything malformed) -> tokenize
(chat template for chat) -> context-length and sampling checks (400) -> the decode
deployment's ``generate`` stream -> OpenAI objects. Every check runs before the
decode replica is called, so a rejected request allocates nothing. Overload (the
decode deployment's ``max_queued_requests`` reached, or a replica's own admission
queue full) is a 503 with Retry-After.
"""


import asyncio
import json
import logging
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from kvarn_ray.metrics import ingress_metrics
from kvarn_ray.protocol import (
    APIError,
    BadRequest,
    ResponseStreamer,
    ValidatedRequest,
    error_body,
    model_list,
    parse_request,
)

logger = logging.getLogger("ray.serve")

__all__ = ["OpenAIIngress", "fastapi_app"]

fastapi_app = FastAPI(title="kvarn-ray", description="OpenAI-compatible API of a kvarn-ray app")


@fastapi_app.exception_handler(HTTPException)
async def _http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown routes and wrong methods get OpenAI-style bodies too."""
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error"),
                        status_code=exc.status_code)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body, status_code=e.status_code, headers=e.headers)


def _event_error(ev: dict) -> APIError:
    return APIError(ev.get("status", 500), ev.get("message", "error"),
                    ev.get("error_type", "server_error"), ev.get("param"), ev.get("code"),
                    ev.get("retry_after_s"))


@serve.deployment
@serve.ingress(fastapi_app)
class OpenAIIngress:
    """Args:
        decode: DeploymentHandle to DecodeServer.
        model: what the tokenizer is loaded from (kvarn.models.resolve name or path).
        served_model_names: the names clients put in "model".
        max_model_len: the context limit (prompt + max_tokens).
        tokenizer: a tokenizer name/path when it differs from the model's.
    """

    def __init__(self, decode, model: str, served_model_names: list[str], max_model_len: int,
                 tokenizer: str | None = None):
        from transformers import AutoTokenizer

        from kvarn.models import resolve

        self._decode = decode.options(stream=True)
        self._names = tuple(served_model_names)
        self._max_model_len = int(max_model_len)
        self._created = int(time.time())
        src = tokenizer or (model[len("dummy:"):] if str(model).startswith("dummy:") else model)
        self._tokenizer = AutoTokenizer.from_pretrained(str(resolve(src)))
        self._vocab_size = len(self._tokenizer)
        self._metrics = ingress_metrics()

    # -- validation and tokenization ---------------------------------------------------

    def _prepare(self, kind: str, body) -> tuple[ValidatedRequest, dict]:
        from kvarn import SamplingParams

        req = parse_request(kind, body, self._names)
        if req.kind == "chat":
            try:
                text = self._tokenizer.apply_chat_template(req.messages, add_generation_prompt=True,
                                                           tokenize=False)
            except Exception as e:  # noqa: BLE001 - template errors are the client's messages
                raise BadRequest(f"The messages could not be rendered with the chat template: {e}",
                                 param="messages") from None
            ids = self._tokenizer(text, add_special_tokens=False).input_ids
        elif req.prompt_token_ids is not None:
            ids = req.prompt_token_ids
            if max(ids) >= self._vocab_size:
                raise BadRequest(f"Token id {max(ids)} is out of the vocabulary "
                                 f"(size {self._vocab_size}).", param="prompt")
        else:
            ids = self._tokenizer(req.prompt).input_ids
        if not ids:
            raise BadRequest("The prompt is empty after tokenization.", param="prompt",
                             code="empty_prompt")
        n = len(ids)
        max_tokens = req.sampling["max_tokens"]
        if max_tokens is None:
            max_tokens = self._max_model_len - n
        if n + max(max_tokens, 1) > self._max_model_len:
            raise BadRequest(
                f"This model's maximum context length is {self._max_model_len} tokens. However, "
                f"you requested {n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the "
                f"completion). Please reduce the prompt or max_tokens.",
                param="max_tokens" if req.sampling["max_tokens"] else "messages",
                code="context_length_exceeded")
        req.sampling["max_tokens"] = max_tokens
        try:
            SamplingParams(**req.sampling)
        except (TypeError, ValueError) as e:
            raise BadRequest(str(e)) from None
        internal = {"request_id": req.request_id, "prompt_token_ids": list(ids),
                    "sampling": req.sampling}
        return req, internal

    async def _start(self, internal: dict):
        """Call the decode deployment; returns (first event, the rest of the stream)."""
        gen = self._decode.generate.remote(internal)
        try:
            first = await gen.__anext__()
        except BackPressureError as e:
            gen.cancel()
            raise APIError(503, f"The server is overloaded: {e}", "service_unavailable",
                           code="overloaded", retry_after_s=getattr(e, "retry_after_s", None) or 2.0
                           ) from None
        except DeploymentUnavailableError as e:
            raise APIError(503, f"The decode deployment is unavailable: {e}",
                           "service_unavailable", code="unavailable", retry_after_s=5.0) from None
        except StopAsyncIteration:
            raise APIError(500, "The decode replica ended the request without output.",
                           "server_error") from None
        except asyncio.CancelledError:
            gen.cancel()
            raise
        if first.get("type") == "error":
            raise _event_error(first)
        return first, gen

    async def _events(self, first: dict, gen) -> AsyncIterator[dict]:
        """Every event of one request; cancels the decode call if the consumer goes away."""
        done = False
        try:
            yield first
            if first.get("finish_reason") is not None:
                done = True
                return
            async for ev in gen:
                if ev.get("type") == "error":
                    raise _event_error(ev)
                yield ev
                if ev.get("finish_reason") is not None:
                    done = True
                    return
        finally:
            if not done:
                gen.cancel()

    async def _complete(self, req: ValidatedRequest, first: dict, gen) -> dict:
        s = ResponseStreamer(req, self._created)
        async for ev in self._events(first, gen):
            s.absorb(ev)
        return s.final()

    async def _chunks(self, req: ValidatedRequest, first: dict, gen) -> AsyncIterator[dict]:
        s = ResponseStreamer(req)
        async for ev in self._events(first, gen):
            for c in s.chunks(ev):
                yield c

    # -- Python handle API -------------------------------------------------------------

    async def generate(self, body: dict):
        """A completion (``"prompt"``) or chat completion (``"messages"``) request.

        Returns the response dict, or, when the body has ``"stream": true``, an async
        generator of chunk dicts (call through ``handle.options(stream=True)``).
        Errors raise ``protocol.APIError`` (``.status_code``, ``.body``).
        """
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a dict.")
        kind = "chat" if "messages" in body else "completion"
        req, internal = self._prepare(kind, body)
        first, gen = await self._start(internal)
        if req.stream:
            return self._chunks(req, first, gen)
        return await self._complete(req, first, gen)

    # -- HTTP --------------------------------------------------------------------------

    async def _http(self, kind: str, request: Request) -> Response:
        route = request.url.path
        t0 = time.perf_counter()
        status = 200
        try:
            req, internal = self._prepare(kind, await request.body())
            first, gen = await self._start(internal)
            if not req.stream:
                return JSONResponse(await self._complete(req, first, gen))
            return StreamingResponse(self._sse(req, first, gen), media_type="text/event-stream")
        except APIError as e:
            status = e.status_code
            return _error_response(e)
        except Exception as e:  # noqa: BLE001 - a 500 with an OpenAI body, not a stack trace
            logger.exception("request failed")
            status = 500
            return _error_response(APIError(500, f"Internal error: {e}", "server_error"))
        finally:
            self._metrics.requests.inc(tags={"route": route, "status": str(status)})
            self._metrics.latency.observe(time.perf_counter() - t0, tags={"route": route})

    async def _sse(self, req: ValidatedRequest, first: dict, gen) -> AsyncIterator[str]:
        try:
            async for c in self._chunks(req, first, gen):
                yield f"data: {json.dumps(c, separators=(',', ':'))}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body)}\n\n"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - headers are gone: report in-band
            logger.exception("stream failed")
            yield f"data: {json.dumps(APIError(500, str(e), 'server_error').body)}\n\n"
        yield "data: [DONE]\n\n"

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._http("completion", request)

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._http("chat", request)

    @fastapi_app.get("/v1/models")
    async def models(self) -> dict:
        return model_list(self._names, self._max_model_len, self._created)

    @fastapi_app.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200)
