"""The OpenAI wire protocol: request models, validation, response and chunk builders.

What flows through this module:

    JSON bytes / dict ──parse_request()──▶ ValidatedRequest
        (kind "completion" | "chat", prompt text or messages, SamplingParams kwargs,
         stream flags)                                     │ ingress tokenizes, checks
                                                           ▼ the context length
    DecodeServer events (dicts, see decode_server.py) ──▶ completion_response() /
                                                           ResponseStreamer.chunks()
                                                           ▼
                                               OpenAI-shaped dicts (JSON-ready)

Every rejection is an ``APIError`` carrying the HTTP status and the OpenAI error body
``{"error": {"message", "type", "param", "code"}}``; the ingress returns it as is
(HTTP) or raises it (Python handle API). Nothing here touches an engine: a request
that fails here has allocated nothing.

Accepted beyond the OpenAI fields (vLLM's extensions, same names): ``top_k``,
``ignore_eos``, ``stop_token_ids``. Accepted and ignored: ``user``, ``metadata``,
``store``, ``service_tier``, ``parallel_tool_calls``. Refused with 400 because the
engine cannot honour them: ``n``/``best_of`` other than 1, ``echo``, ``suffix``,
non-zero ``presence_penalty``/``frequency_penalty``, ``logit_bias``, ``tools``,
non-text ``response_format``, batched prompts.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

__all__ = [
    "APIError",
    "BadRequest",
    "ServiceUnavailable",
    "CompletionRequest",
    "ChatCompletionRequest",
    "ValidatedRequest",
    "parse_request",
    "error_body",
    "model_list",
    "completion_response",
    "ResponseStreamer",
]

Number = Union[StrictInt, float]


# --------------------------------------------------------------------------- errors


class APIError(Exception):
    """An OpenAI-style error: ``status_code`` plus the JSON ``body``.

    Raised through Ray handles as is (its args pickle), so a Python caller can
    ``except APIError as e: e.status_code, e.body``.
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(status_code, message, type, param, code, retry_after_s)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    @property
    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    @property
    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, int(round(self.retry_after_s))))}

    def __str__(self) -> str:
        return f"{self.status_code} {self.type}: {self.message}"


def BadRequest(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def ServiceUnavailable(message: str, retry_after_s: float = 1.0) -> APIError:
    return APIError(503, message, "service_unavailable", None, "overloaded", retry_after_s)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    # strict: "16" is not an int and 1 is not a bool, as in the OpenAI API; unknown
    # fields pass (clients send fields we do not use).
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _SamplingFields(_Strict):
    model: str
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    top_k: Optional[StrictInt] = None
    n: Optional[StrictInt] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[StrictInt]] = None
    seed: Optional[StrictInt] = None
    ignore_eos: Optional[StrictBool] = False
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[dict[str, Number]] = None
    user: Optional[str] = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[StrictInt]]
    logprobs: Optional[StrictInt] = None
    echo: Optional[StrictBool] = False
    best_of: Optional[StrictInt] = None
    suffix: Optional[str] = None


class _ContentPart(_Strict):
    type: str
    text: Optional[str] = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[_ContentPart]]] = None
    name: Optional[str] = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[StrictInt] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None


@dataclass
class ValidatedRequest:
    """A request that passed every check that needs no tokenizer.

    ``sampling`` holds ``kvarn.SamplingParams`` keyword arguments; ``max_tokens`` is
    None when the client left it open (chat): the ingress fills in the rest of the
    context once it knows the prompt length.
    """

    kind: Literal["completion", "chat"]
    model: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None
    sampling: dict = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0          # alternatives per token (logprobs=N, chat's top_logprobs)
    request_id: str = ""


def _first_error(exc: ValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    err = errs[0]
    # loc mixes field names, list indices and (for unions) member tags like "int".
    fields = [str(x) for x in err.get("loc", ()) if not isinstance(x, int)]
    param = fields[0] if fields else None
    if err.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param
    same_field = [e for e in errs if e.get("loc", (None,))[0] == err.get("loc", (None,))[0]]
    if len(same_field) > 1:  # a union: no single member's message is the useful one
        return f"Invalid type for '{param}': got {err.get('input')!r}.", param
    return f"Invalid value for '{param}': {err.get('msg', 'invalid value')}.", param


def parse_request(kind: Literal["completion", "chat"], body: bytes | str | dict,
                  served_model_names: tuple[str, ...]) -> ValidatedRequest:
    """Bytes or dict in, a ``ValidatedRequest`` out, or ``APIError`` (400)."""
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"We could not parse the JSON body of your request: {e}.",
                             code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    model_cls = CompletionRequest if kind == "completion" else ChatCompletionRequest
    try:
        req = model_cls.model_validate(body)
    except ValidationError as e:
        msg, param = _first_error(e)
        raise BadRequest(msg, param=param) from None

    if req.model not in served_model_names:
        raise APIError(400, f"The model '{req.model}' does not exist. Served models: "
                       f"{', '.join(served_model_names)}.", "invalid_request_error", "model",
                       "model_not_found")
    if req.n not in (None, 1):
        raise BadRequest("Only n=1 is supported.", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise BadRequest(f"'{name}' is not supported (must be 0).", param=name)
    if req.logit_bias:
        raise BadRequest("'logit_bias' is not supported.", param="logit_bias")

    max_tokens = req.max_tokens
    out = ValidatedRequest(kind=kind, model=req.model, stream=bool(req.stream))
    out.include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if kind == "completion":
        if req.best_of not in (None, 1):
            raise BadRequest("Only best_of=1 is supported.", param="best_of")
        if req.echo:
            raise BadRequest("'echo' is not supported.", param="echo")
        if req.suffix:
            raise BadRequest("'suffix' is not supported.", param="suffix")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise BadRequest("Batched prompts are not supported: send one prompt per "
                                 "request.", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise BadRequest("The prompt is empty.", param="prompt", code="empty_prompt")
            out.prompt = prompt
        else:
            if not prompt:
                raise BadRequest("The prompt is empty.", param="prompt", code="empty_prompt")
            if any(t < 0 for t in prompt):
                raise BadRequest("Token ids must be non-negative.", param="prompt")
            out.prompt_token_ids = list(prompt)
        if req.logprobs is not None:
            if not 0 <= req.logprobs <= 5:
                raise BadRequest("'logprobs' must be between 0 and 5.", param="logprobs")
            out.logprobs = True
            out.top_logprobs = req.logprobs
        if max_tokens is None:
            max_tokens = 16  # the OpenAI completions default
    else:
        if req.tools:
            raise BadRequest("'tools' are not supported.", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise BadRequest("Only response_format type 'text' is supported.",
                             param="response_format")
        if req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
            raise BadRequest("'top_logprobs' must be between 0 and 20.", param="top_logprobs")
        if req.top_logprobs and not req.logprobs:
            raise BadRequest("'logprobs' must be true when 'top_logprobs' is set.",
                             param="top_logprobs")
        out.logprobs = bool(req.logprobs)
        out.top_logprobs = (req.top_logprobs or 0) if req.logprobs else 0
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                if any(p.type != "text" for p in content):
                    raise BadRequest("Only text content parts are supported.",
                                     param=f"messages.{i}.content")
                content = "".join(p.text or "" for p in content)
            messages.append({"role": m.role, "content": content or ""})
        if not any(m["content"] for m in messages):
            raise BadRequest("The messages are empty.", param="messages", code="empty_prompt")
        out.messages = messages

    if max_tokens is not None and max_tokens < 1:
        raise BadRequest("'max_tokens' must be at least 1.", param="max_tokens")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop is not None and any(not s for s in stop):
        raise BadRequest("Stop strings must be non-empty.", param="stop")
    sampling = {
        "temperature": 1.0 if req.temperature is None else float(req.temperature),
        "top_p": 1.0 if req.top_p is None else float(req.top_p),
        "top_k": -1 if req.top_k is None else req.top_k,
        "seed": req.seed,
        "max_tokens": max_tokens,
        "stop": stop or None,
        "stop_token_ids": req.stop_token_ids or None,
        "ignore_eos": bool(req.ignore_eos),
        "logprobs": out.top_logprobs if out.logprobs else None,
    }
    # Cheap range checks here; kvarn.SamplingParams has the final word (the ingress
    # builds one before anything is sent to a decode replica).
    if not 0.0 <= sampling["temperature"] <= 2.0:
        raise BadRequest("'temperature' must be between 0 and 2.", param="temperature")
    if not 0.0 < sampling["top_p"] <= 1.0:
        raise BadRequest("'top_p' must be in (0, 1].", param="top_p")
    if sampling["top_k"] < -1:
        raise BadRequest("'top_k' must be -1 or 0 (off), or at least 1.", param="top_k")
    out.sampling = sampling
    out.request_id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
    return out


# --------------------------------------------------------------------------- responses


def model_list(names: tuple[str, ...], max_model_len: int, created: int) -> dict:
    return {
        "object": "list",
        "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "kvarn",
             "max_model_len": max_model_len}
            for n in names
        ],
    }


def _usage(num_prompt: int, num_generated: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_generated,
            "total_tokens": num_prompt + num_generated}


def _completion_logprobs(tokens: list[str], lps: list[float], tops: list | None) -> dict:
    """Completions' shape: per token a {text: logprob} dict of the N most likely tokens,
    best first, plus the sampled token when it is not among them (OpenAI's "up to
    logprobs + 1"; logprobs=0 gives just the sampled token). text_offset is not computed."""
    top_logprobs = []
    for i, (t, lp) in enumerate(zip(tokens, lps)):
        d: dict[str, float] = {}
        for alt, alt_lp in (tops[i] if tops and i < len(tops) else ()):
            d.setdefault(alt, alt_lp)     # two ids with the same text: the likelier one
        d.setdefault(t, lp)
        top_logprobs.append(d)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top_logprobs,
            "text_offset": None}


def _chat_logprobs(tokens: list[str], lps: list[float], tops: list | None) -> dict:
    """Chat's shape: per token its logprob and the top_logprobs=N most likely tokens."""
    def entry(t: str, lp: float) -> dict:
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {"content": [
        {**entry(t, lp),
         "top_logprobs": [entry(a, alp) for a, alp in (tops[i] if tops and i < len(tops) else ())]}
        for i, (t, lp) in enumerate(zip(tokens, lps))
    ]}


class ResponseStreamer:
    """Turns DecodeServer events of one request into OpenAI objects.

    Events (dicts from ``DecodeServer.generate``):
        {"type": "delta", "text": str, "token_ids": [int], "logprobs": [float] | None,
         "tokens": [str] | None, "top_logprobs": [[[str, float], ...]] | None,
         "finish_reason": str | None,
         "num_prompt_tokens": int, "num_generated_tokens": int, "kvarn": dict | None}

    ``chunks(event)`` gives the stream chunks for one event; ``final()`` the
    non-streaming response after the last event.
    """

    def __init__(self, req: ValidatedRequest, created: int | None = None):
        self.req = req
        self.created = created or int(time.time())
        self.text: list[str] = []
        self.tokens: list[str] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list] = []
        self.finish_reason: str | None = None
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.kvarn: dict | None = None
        self._sent_role = False

    def _base(self, obj: str) -> dict:
        return {"id": self.req.request_id, "object": obj, "created": self.created,
                "model": self.req.model}

    def _absorb(self, ev: dict) -> None:
        self.text.append(ev.get("text", ""))
        if ev.get("logprobs") is not None:
            self.logprobs.extend(ev["logprobs"])
            self.tokens.extend(ev.get("tokens") or [])
            self.top_logprobs.extend(ev.get("top_logprobs") or [])
        self.finish_reason = ev.get("finish_reason") or self.finish_reason
        self.num_prompt_tokens = ev.get("num_prompt_tokens", self.num_prompt_tokens)
        self.num_generated_tokens = ev.get("num_generated_tokens", self.num_generated_tokens)
        if ev.get("kvarn"):
            self.kvarn = ev["kvarn"]

    def chunks(self, ev: dict) -> list[dict]:
        self._absorb(ev)
        finish = ev.get("finish_reason")
        lp = None
        if self.req.logprobs and ev.get("logprobs") is not None:
            builder = _completion_logprobs if self.req.kind == "completion" else _chat_logprobs
            lp = builder(ev.get("tokens") or [], ev["logprobs"], ev.get("top_logprobs"))
        out = []
        if self.req.kind == "completion":
            c = self._base("text_completion")
            c["choices"] = [{"index": 0, "text": ev.get("text", ""), "logprobs": lp,
                             "finish_reason": finish}]
        else:
            c = self._base("chat.completion.chunk")
            delta: dict[str, Any] = {"content": ev.get("text", "")}
            if not self._sent_role:
                delta = {"role": "assistant", **delta}
                self._sent_role = True
            c["choices"] = [{"index": 0, "delta": delta, "logprobs": lp,
                             "finish_reason": finish}]
        if self.req.include_usage:
            c["usage"] = None
        if finish is not None and self.kvarn is not None:
            c["kvarn"] = self.kvarn
        out.append(c)
        if finish is not None and self.req.include_usage:
            u = self._base("text_completion" if self.req.kind == "completion"
                           else "chat.completion.chunk")
            u["choices"] = []
            u["usage"] = _usage(self.num_prompt_tokens, self.num_generated_tokens)
            out.append(u)
        return out

    def absorb(self, ev: dict) -> None:
        self._absorb(ev)

    def final(self) -> dict:
        text = "".join(self.text)
        lp = None
        if self.req.logprobs:
            builder = _completion_logprobs if self.req.kind == "completion" else _chat_logprobs
            lp = builder(self.tokens, self.logprobs, self.top_logprobs)
        if self.req.kind == "completion":
            r = self._base("text_completion")
            r["choices"] = [{"index": 0, "text": text, "logprobs": lp,
                             "finish_reason": self.finish_reason}]
        else:
            r = self._base("chat.completion")
            r["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": lp, "finish_reason": self.finish_reason}]
        r["usage"] = _usage(self.num_prompt_tokens, self.num_generated_tokens)
        if self.kvarn is not None:
            r["kvarn"] = self.kvarn
        return r


def completion_response(req: ValidatedRequest, events: list[dict]) -> dict:
    s = ResponseStreamer(req)
    for ev in events:
        s.absorb(ev)
    return s.final()
