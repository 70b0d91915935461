"""OpenAI's API shapes: the request bodies this server accepts, its errors, and the stop strings of an answer.

Requests are checked strictly, as OpenAI's API checks them: a field of the wrong type ("temperature": "hot",
"stream": "yes") is an error, not coerced, and a field this server does not know is refused by name rather
than silently ignored.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)


class ApiError(Exception):
    """An error the client caused (or a server fault), answered as OpenAI's error object with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        """A field sent as null is left out, as OpenAI reads it (clients send `"n": null` for an argument unset)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(Strict):
    include_usage: bool = False  # a last chunk with the usage counts (and no choices)


class RequestBody(Strict):
    """The fields both endpoints take. None means the server's default (eval_model.py's flags)."""
    model: str | None = None  # one model is served; any name is accepted
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # OpenAI's range
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = 1  # one answer per request
    user: str | None = None  # an end-user id for the caller's records; not used here
    # OpenAI's fields for what this server does not do: their neutral values are accepted (some clients send them
    # on every request), any other is refused by name.
    presence_penalty: float | int = 0
    frequency_penalty: float | int = 0
    logit_bias: dict[str, float | int] | None = None
    logprobs: bool | int | None = None  # chat: a bool; completions: how many, 0 = none

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias", "logprobs")
    @classmethod
    def _neutral(cls, value: Any) -> Any:
        if value:
            raise ValueError("is not supported by this server: leave it out (or at its default, 0 / null / false)")
        return value

    @field_validator("n")
    @classmethod
    def _one_answer(cls, n: int) -> int:
        if n != 1:
            raise ValueError("this server gives one answer per request: send n requests instead (concurrent requests "
                             "share the batch)")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stop

    @field_validator("stream_options")
    @classmethod
    def _streamed(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):  # stream is checked first (it comes first)
            raise ValueError("is only allowed when stream is true")
        return options

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]

    def as_chat(self) -> dict[str, str]:
        """{"role", "content"} as the chat template takes it."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(RequestBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens

    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(RequestBody):
    # OpenAI's forms of one prompt: a text, a list of one text, or token ids (evaluation harnesses send those)
    prompt: str | list[str] | list[int]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        texts = isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)
        ids = isinstance(prompt, list) and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt)
        if not (isinstance(prompt, str) or (prompt and (texts or ids))):
            raise ValueError("must be a string, a list of one string, or a non-empty list of token ids")
        if texts and len(prompt) > 1:
            raise ValueError("takes one prompt per request: send the others as requests of their own (concurrent "
                             "requests share the batch)")
        return prompt

    def text_or_ids(self) -> str | list[int]:
        """The prompt's text, or its token ids."""
        return self.prompt[0] if isinstance(self.prompt, list) and isinstance(self.prompt[0], str) else self.prompt

    def answer_tokens(self) -> int | None:
        return self.max_tokens


_FIELD_NAMES = {name for model in (ChatRequest, CompletionRequest, StreamOptions, Message, TextPart)
                for name in model.model_fields}


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def parse_body(body: bytes, schema: type[Strict]) -> Any:
    """The request body as `schema`, or an ApiError (400) saying in one line what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not UTF-8: byte 0x{body[e.start]:02x} at position {e.start}; "
                       f"send JSON encoded as UTF-8") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError, or NaN / Infinity
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ApiError(400, f"the request body is not valid JSON: {getattr(e, 'msg', e)}{where}") from None
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a "\ud800" escape decodes to an unpaired surrogate, which no text contains
        raise ApiError(400, "the request holds an unpaired surrogate escape (such as \\ud800), which is not a "
                       "character; fix the JSON string escapes") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "extra_forbidden":
            loc = ".".join(str(part) for part in first["loc"])
            raise ApiError(400, f"unrecognized request argument: {loc}", param=loc) from None
        # the field's path, without pydantic's names for the type it tried ("content.str", "presence_penalty.float")
        loc = ".".join(str(part) for part in first["loc"] if isinstance(part, int) or part in _FIELD_NAMES)
        message = first["msg"].removeprefix("Value error, ")
        if not loc:
            raise ApiError(400, f"the request body must be a JSON object ({message})") from None
        raise ApiError(400, f"{loc}: {message}", param=loc) from None


class StopStrings:
    """Cut an answer at the first of its stop strings, while it streams.

    Text that could be the start of a stop string is held back until it is clear that it is not (or it is
    dropped, when it is), so the stop string never reaches the client, even when it is split over tokens.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached: the answer ends there)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        """What is still held back when the answer ends without a stop string."""
        out, self.pending = self.pending, ""
        return out
