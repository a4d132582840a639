"""Request bodies: the OpenAI fields the service honours, strictly typed (a string where a number
belongs is a 400, not a guess). Unknown fields are ignored, as OpenAI clients send many."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TOKENS = 1024  # per request: a bound on the time one request may hold the batch
DEFAULT_MAX_TOKENS = 256
MAX_TEXTS = 1024  # documents per /v1/read
MAX_STOPS = 4


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class Sampling(Body):
    model: str | None = None  # any name: the API key, not the model, selects the adapter
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # 0: greedy; None: 1, as OpenAI
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    ignore_eos: bool = False  # vLLM's extension: always max_tokens tokens (benchmarks)
    stream: bool = False
    stream_options: dict | None = None

    @property
    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    @property
    def sampling(self) -> tuple[float, float]:
        """(temperature, top_p), OpenAI's defaults for what the request leaves out."""
        return (1.0 if self.temperature is None else self.temperature), (self.top_p or 1.0)

    @property
    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    @model_validator(mode="after")
    def _few_stops(self) -> Sampling:
        if len(self.stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        return self


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=256)


class CompletionRequest(Sampling):
    prompt: str | list[str]

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("prompt: give one string (batches of prompts are not supported)")
        return self

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ReadRequest(Body):
    text: str | None = None
    texts: list[str] | None = Field(None, min_length=1, max_length=MAX_TEXTS)

    @model_validator(mode="after")
    def _exactly_one(self) -> ReadRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        if any(not t.strip() for t in self.all()):
            raise ValueError("texts must not be empty")
        return self

    def all(self) -> list[str]:
        return [self.text] if self.text is not None else list(self.texts or [])
