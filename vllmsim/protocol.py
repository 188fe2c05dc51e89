"""OpenAI-compatible request validation and vLLM-exact response/SSE formatting.

Kept apart from the HTTP server so the byte format (which gateways and clients parse)
can be tested and tuned on its own.  Streaming chunks are assembled from precomputed
string prefixes because json.dumps of a whole chunk per token would dominate the
simulator's CPU cost; key order matches the vLLM 0.32 fixtures exactly.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

from .tokenizer import PromptError, render_chat, tokenize

SYSTEM_FINGERPRINT = "vllm-0.32.0-vllmsim"

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 408: "RequestTimeoutError", 429: "RateLimitError",
                500: "InternalServerError", 502: "BadGatewayError", 503: "ServiceUnavailableError",
                504: "GatewayTimeoutError"}

FILLER = ("the", "model", "is", "simulated", "and", "tokens", "flow", "from", "a", "paged",
          "cache", "while", "requests", "wait", "in", "queue", "for", "their", "turn", "to",
          "decode", "one", "step", "at", "time", "with", "prefix", "blocks", "shared", "across",
          "similar", "prompts", "so", "that", "load", "balancing", "matters", "when", "servers",
          "are", "busy", "or", "idle", "each", "batch", "grows", "until", "limits", "reached",
          "then", "latency", "rises", "as", "expected", "by", "design", "of", "this", "small",
          "engine", "which", "never", "sleeps", "long")


class APIError(Exception):
    """An error answered as vLLM's JSON error object."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param)


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


@dataclass
class GenRequest:
    """A validated inference request."""

    kind: str  # "chat" | "completion"
    model: str  # model name to echo back (base model or LoRA adapter)
    lora: str | None
    token_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    kv_transfer_params: dict[str, Any] | None = None


def _opt_int(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(f"{key}: Input should be a valid integer", param=key)
    return v


def parse_request(body: Any, kind: str, *, served_model: str, loras: frozenset[str] | set[str],
                  default_max_tokens: int, max_model_len: int) -> GenRequest:
    """Validate a /v1/chat/completions or /v1/completions body like vLLM does."""
    if not isinstance(body, dict):
        raise APIError("Expected a JSON object as the request body")
    model = body.get("model")
    if model is None:
        model = served_model
    if not isinstance(model, str):
        raise APIError("model: Input should be a valid string", param="model")
    lora: str | None = None
    if model != served_model:
        if model in loras:
            lora = model
        else:
            raise APIError(f"The model `{model}` does not exist.", status=404, param="model")

    if kind == "chat":
        messages = body.get("messages")
        if messages is None:
            raise APIError("messages: Field required", param="messages")
        if not isinstance(messages, list) or not messages:
            raise APIError("messages: Input should be a non-empty list", param="messages")
        try:
            token_ids = tokenize(render_chat(messages))
        except PromptError as e:
            raise APIError(str(e), param="messages") from None
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise APIError("prompt: Field required", param="prompt")
        token_ids = _completion_tokens(prompt)
    if not token_ids:
        raise APIError("The prompt cannot be empty.", param="prompt")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError("stream: Input should be a valid boolean", param="stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise APIError("Stream options can only be defined when `stream=True`.",
                           param="stream_options")
        if not isinstance(opts, dict):
            raise APIError("stream_options: Input should be a valid dictionary",
                           param="stream_options")
        iu = opts.get("include_usage", False)
        if not isinstance(iu, (bool, type(None))):
            raise APIError("stream_options.include_usage: Input should be a valid boolean",
                           param="stream_options")
        include_usage = bool(iu)

    n = _opt_int(body, "n")
    if n is not None and n != 1:
        raise APIError("n != 1 is not supported by vllmsim", param="n")
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise APIError(f"{key}: Input should be a valid number", param=key)

    mt = _opt_int(body, "max_completion_tokens") if kind == "chat" else None
    if mt is None:
        mt = _opt_int(body, "max_tokens")
    prompt_len = len(token_ids)
    if prompt_len >= max_model_len:
        raise APIError(f"This model's maximum context length is {max_model_len} tokens. However, "
                       f"your request has {prompt_len} input tokens. Please reduce the length "
                       "of the input messages.", param="input_tokens")
    if mt is None:
        mt = min(default_max_tokens, max_model_len - prompt_len)
    elif mt < 1:
        raise APIError(f"max_tokens must be at least 1, got {mt}.", param="max_tokens")
    elif prompt_len + mt > max_model_len:
        raise APIError(f"'max_tokens' or 'max_completion_tokens' is too large: {mt}. This model's "
                       f"maximum context length is {max_model_len} tokens and your request has "
                       f"{prompt_len} input tokens ({mt} > {max_model_len} - {prompt_len}).",
                       param="max_tokens")
    kvp = body.get("kv_transfer_params")
    if kvp is not None and not isinstance(kvp, dict):
        raise APIError("kv_transfer_params: Input should be a valid dictionary",
                       param="kv_transfer_params")
    return GenRequest(kind, model, lora, token_ids, mt, stream, include_usage, kvp)


def _completion_tokens(prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        return tokenize(prompt)
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        if len(prompt) == 1:
            return _completion_tokens(prompt[0])
        if len(prompt) > 1:
            raise APIError("batched prompts are not supported by vllmsim", param="prompt")
    raise APIError("prompt: Input should be a string, a list of token ids or a list with one "
                   "string", param="prompt")


def filler_text(seed: int, start: int, end: int) -> str:
    """Deterministic output text for tokens ``start..end-1`` of a request."""
    n = len(FILLER)
    return "".join(" " + FILLER[(seed + k * 7) % n] for k in range(start, end))


def text_seed(request_id: str) -> int:
    return zlib.crc32(request_id.encode())


def _usage(prompt: int, completion: int) -> str:
    return (f'{{"prompt_tokens":{prompt},"total_tokens":{prompt + completion},'
            f'"completion_tokens":{completion}}}')


class StreamFormatter:
    """Byte-exact vLLM 0.32 SSE chunks for one request."""

    __slots__ = ("_head", "_chat", "_tok_tail", "_obj")

    def __init__(self, kind: str, rid: str, created: int, model: str) -> None:
        self._chat = kind == "chat"
        self._obj = "chat.completion.chunk" if self._chat else "text_completion"
        self._head = (f'data: {{"id":{json.dumps(rid)},"object":"{self._obj}",'
                      f'"created":{created},"model":{json.dumps(model)},')
        if self._chat:
            self._tok_tail = '},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
        else:
            self._tok_tail = ('"logprobs":null,"finish_reason":null,"stop_reason":null,'
                              '"prompt_token_ids":null,"token_ids":null}]}\n\n')

    def role(self) -> str:
        return (self._head + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                '"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}\n\n')

    def token(self, text: str) -> str:
        if self._chat:
            return self._head + '"choices":[{"index":0,"delta":{"content":' + json.dumps(text) + self._tok_tail
        return self._head + '"choices":[{"index":0,"text":' + json.dumps(text) + "," + self._tok_tail

    def final(self, text: str, reason: str) -> str:
        r = json.dumps(reason)
        if self._chat:
            return (self._head + '"choices":[{"index":0,"delta":{"content":' + json.dumps(text)
                    + f'}},"logprobs":null,"finish_reason":{r},"stop_reason":null,"token_ids":null}}],'
                    f'"system_fingerprint":"{SYSTEM_FINGERPRINT}"}}\n\n')
        return (self._head + '"choices":[{"index":0,"text":' + json.dumps(text)
                + f',"logprobs":null,"finish_reason":{r},"stop_reason":null,'
                '"prompt_token_ids":null,"token_ids":null}]}\n\n')

    def usage(self, prompt: int, completion: int) -> str:
        return (self._head + '"choices":[],"usage":' + _usage(prompt, completion)
                + f',"system_fingerprint":"{SYSTEM_FINGERPRINT}"}}\n\n')

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"


def full_response(kind: str, rid: str, created: int, model: str, text: str, reason: str,
                  prompt_tokens: int, completion_tokens: int,
                  kv_transfer_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Non-streaming answer body (vLLM 0.x field order)."""
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
             "completion_tokens": completion_tokens, "prompt_tokens_details": None}
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                        "audio": None, "function_call": None, "tool_calls": [],
                        "reasoning_content": None},
            "logprobs": None, "finish_reason": reason, "stop_reason": None, "token_ids": None}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "service_tier": None, "system_fingerprint": None,
                "usage": usage, "prompt_logprobs": None, "prompt_token_ids": None,
                "kv_transfer_params": kv_transfer_params}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason,
              "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
              "prompt_token_ids": None}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "service_tier": None, "system_fingerprint": None,
            "usage": usage, "kv_transfer_params": kv_transfer_params}
