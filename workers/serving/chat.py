"""/v1/chat/completions: its request and response bodies (OpenAI's shapes, the subset this model
serves) and the chat template that renders messages into the prompt a completion continues.

The template (workers/serving/config.py ``ChatTemplate``) is plain text with two slots, ``{role}``
and ``{content}``, replaced in one pass (a message's content holding ``{role}`` stays as written);
no template language is evaluated, so neither a spec nor a message can run anything. A deployment
takes its spec's template, else the checkpoint's ``chat_template.json`` (the same fields), else the
default transcript ``"user: Hi\\nassistant:"``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from workers import confine
from workers.serving.config import ChatTemplate
from workers.serving.schemas import MAX_TOP_LOGPROBS, Body, Sampling, Usage

TEMPLATE_FILE = "chat_template.json"  # in a checkpoint folder, optional
# Messages in one request (their text is bounded by the body's size and the model's context).
MAX_MESSAGES = 1024
_SLOT = re.compile(r"\{(role|content)\}")


class TextPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or OpenAI's list of parts (text parts only: this model reads text).
    content: str | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)]
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # needs logprobs: true

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def render(template: ChatTemplate, messages: list[ChatMessage]) -> str:
    """The prompt text: each message through ``template.message``, then the generation prompt."""
    def one(m: ChatMessage) -> str:
        return _SLOT.sub(lambda s: m.role if s.group(1) == "role" else m.text(), template.message)

    return "".join(one(m) for m in messages) + template.generation_prompt


def checkpoint_template(folder: Path, also: tuple[Path, ...] = ()) -> ChatTemplate | None:
    """The template stored with a checkpoint (``chat_template.json``), opened under the job's data
    roots; None when there is none. A malformed one fails the replica's start, naming the file."""
    path = folder / TEMPLATE_FILE
    if not path.is_file():
        return None
    with confine.open_file(path, also=also) as f:
        try:
            return ChatTemplate.model_validate(json.loads(f.read()))
        except ValueError as e:
            raise ValueError(f"{path}: not a chat template: {e}") from None


class TopLogprob(BaseModel):
    token: str
    bytes: list[int] | None
    logprob: float


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
