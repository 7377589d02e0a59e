"""The OpenAI request models of /v1/completions and /v1/chat/completions (and the parts /v1/responses shares).

Each field OpenAI defines is either implemented, accepted with the one value that changes nothing (any other answers 400
naming it), or null-only; SEA's own parameters ride in the ``sea`` extra. ``OpenAIRequest.params`` turns a request into
/align's parameters.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from app.api.schemas import SEED_RANGE, TEXT_STRING, PromptText, SEAParams, StrictRequest, chat_has_text
from app.errors import APIError, BadRequest

MAX_PROMPTS = 16  # prompts of one completion request (each its own job: each counts against the queue and a key's share)
OPENAI_FIELDS = ("max_tokens", "seed", "temperature", "top_p")  # /align parameters that /v1 takes from its own fields only


def accepts_only(*values: Any, schema: dict | None = None) -> dict:
    """OpenAPI for a field accepted for compatibility with one neutral value (or null): any other value answers 400."""
    allowed = [schema] if schema is not None else [{"const": value} for value in values]
    return {"anyOf": [*allowed, {"type": "null"}]}


def _without_openai_fields(schema: dict) -> None:
    for name in OPENAI_FIELDS:
        schema["properties"].pop(name, None)


class SEAOptions(SEAParams):
    """The ``sea`` extra: every /align parameter except the prompt and those the OpenAI fields of the same names carry
    (max_tokens, seed, temperature, top_p), so that no setting can be given twice."""

    model_config = ConfigDict(json_schema_extra=_without_openai_fields)

    @field_validator(*OPENAI_FIELDS, mode="before")
    @classmethod
    def _set_by_the_openai_field(cls, value, info: ValidationInfo):
        if info.field_name == "max_tokens":  # the Responses API names it otherwise
            raise ValueError("set the length with the request's own OpenAI field (`max_tokens` or `max_completion_tokens`; "
                             "`max_output_tokens` on /v1/responses), not in `sea`")
        raise ValueError(f"set `{info.field_name}` with the OpenAI field of that name, not in `sea`")


def sea_params(sea: SEAOptions | None, **openai_fields) -> SEAParams:
    """An OpenAI request's /align parameters: its ``sea`` extra, and the OpenAI fields that carry the others (those not
    None)."""
    options = (sea or SEAOptions()).model_dump(exclude_unset=True)
    options.update({name: value for name, value in openai_fields.items() if value is not None})
    return SEAParams(**options)


def named_as_sent(error: APIError, own_fields: tuple[str, ...]) -> APIError:
    """``error``, raised on the /align parameters of an OpenAI request, naming its field as the request spells it: in
    `sea`, unless it is one of the request's ``own_fields``."""
    if error.param is not None and error.param.split(".")[0] not in own_fields:
        error.param = f"sea.{error.param}"
    return error


def null_is_default(cls, value, info: ValidationInfo):
    """OpenAI's clients type these fields as optional and send null for "not set": it means the default."""
    return cls.model_fields[info.field_name].default if value is None else value


class StreamOptions(StrictRequest):
    include_usage: bool | None = False
    include_obfuscation: bool | None = Field(None, description="Accepted and ignored (no obfuscation padding is sent).")

    null_usage = field_validator("include_usage", mode="before")(classmethod(null_is_default))


# stream_options only with stream: true (OpenAI's rule too)
STREAM_OPTIONS_NEED_STREAM = {"if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
                              "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}}


class OpenAIRequest(StrictRequest):
    model_config = ConfigDict(
        # n > 1 needs several chains or samples: method `sample` draws one (see `params`).
        json_schema_extra={"allOf": [
            {"if": {"required": ["sea"], "properties": {"sea": {"type": "object", "required": ["method"],
                                                                "properties": {"method": {"const": "sample"}}}}},
             "then": {"properties": {"n": {"const": 1}}}},
            STREAM_OPTIONS_NEED_STREAM]},
    )

    model: str = Field(description="The served model id (see /v1/models), or `sea`.", examples=["sea"])
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(1, ge=1, description="Choices: the n best chains of one run (`sea` runs at least n chains, `bon` draws at least n samples); 1 with methods `sample`, `args` and `cbs`.")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(None, description="Up to 4 strings; the text ends before the first one.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, description="Temperature of the base samples.")
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="Nucleus of the base samples (0: the most likely token).")
    user: str | None = None
    presence_penalty: float | None = Field(None, description="Only 0 (accepted for compatibility).", json_schema_extra=accepts_only(0))
    frequency_penalty: float | None = Field(None, description="Only 0 (accepted for compatibility).", json_schema_extra=accepts_only(0))
    logit_bias: dict[str, float] | None = Field(None, description="Only empty (accepted for compatibility).",
                                                json_schema_extra=accepts_only(schema={"type": "object", "maxProperties": 0}))
    sea: SEAOptions | None = Field(None, description="SEA parameters (see POST /align).")

    null_n_or_stream = field_validator("n", "stream", mode="before")(classmethod(null_is_default))

    def unsupported(self) -> dict[str, Any]:
        """Fields set to values that would change the result in ways this server does not implement."""
        bad = {}
        if self.presence_penalty:
            bad["presence_penalty"] = self.presence_penalty
        if self.frequency_penalty:
            bad["frequency_penalty"] = self.frequency_penalty
        if self.logit_bias:
            bad["logit_bias"] = self.logit_bias
        return bad

    def log_prob_alternatives(self) -> int | None:
        """None: no log-probs; else how many of the reference's most likely tokens to list at each position."""
        return None

    def stops(self) -> list[str]:
        """The non-empty stop strings."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def params(self, max_tokens: int | None, default_chains: int) -> SEAParams:
        """The request as /align's parameters: its ``sea`` extra and OpenAI fields; with ``n`` > 1, at least n chains
        (`sea`) and n samples (`sea`, `bon`), since the n choices are the n best of one run."""
        params = sea_params(self.sea, max_tokens=max_tokens, seed=self.seed, temperature=self.temperature, top_p=self.top_p)
        if self.n > 1:
            if params.method not in ("sea", "bon"):  # sample, ARGS and beam search return fewer than n distinct answers
                raise BadRequest(f"n > 1 needs method `sea` or `bon` (not `{params.method}`)", param="n")
            params.chains = max(params.chains or default_chains, self.n) if params.method == "sea" else params.chains
            if self.n > params.samples:  # noqa: PLR1730 -- assign only when needed: an unset `samples` stays unset
                params.samples = self.n
        return params


class CompletionRequest(OpenAIRequest):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=f"A prompt with some text, or up to {MAX_PROMPTS} of them: each runs as its own job (prompt i's choices are "
                    "indexed from i × n; `sea` is then a list, one entry per prompt).")
    echo: bool | None = Field(False, description="Only false or null.", json_schema_extra=accepts_only(False))
    logprobs: int | None = Field(None, ge=0, le=5, description="Return each token's log-prob under the reference model (at "
                                 "temperature 1: SEA's tokens come from its edits, not from a distribution it sampled), with "
                                 "this many of the reference's most likely tokens at each position.")
    best_of: int | None = Field(None, description="Only 1 or null (use `n` and the `sea` options).", json_schema_extra=accepts_only(1))
    suffix: str | None = Field(None, description="Only empty or null.", json_schema_extra=accepts_only(""))

    null_echo = field_validator("echo", mode="before")(classmethod(null_is_default))

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_not_token_ids(cls, value):
        if isinstance(value, list) and value and all(isinstance(item, (int, list)) for item in value):
            raise ValueError("token ids are not supported: send the prompt as text")
        return value

    def log_prob_alternatives(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> dict[str, Any]:
        bad = super().unsupported()
        for name in ("echo", "suffix"):
            if getattr(self, name):
                bad[name] = getattr(self, name)
        if self.best_of not in (None, 1):
            bad["best_of"] = self.best_of
        return bad


class TextOrRefusal(StrictRequest):
    """A content part whose words are its `text`, or its `refusal` when it is a replayed assistant turn's refusal (sent
    back as it came)."""

    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"type": {"const": "refusal"}}},
        "then": {"required": ["refusal"], "properties": {"refusal": {"type": "string"}}},
        "else": {"required": ["text"], "properties": {"text": {"type": "string"}}}})
    type: str
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _has_its_text(self) -> TextOrRefusal:
        field = "refusal" if self.type == "refusal" else "text"
        if getattr(self, field) is None:
            raise ValueError(f"a `{self.type}` part needs `{field}`")
        return self

    @property
    def words(self) -> str:
        return (self.refusal if self.type == "refusal" else self.text) or ""


class ContentPart(TextOrRefusal):
    """A text part, or a replayed assistant turn's refusal (sent back as it came)."""

    type: Literal["text", "refusal"]


class MessageIn(StrictRequest):
    """A chat message's rendering: its role (a developer message is the system's) and its text, the parts' words a line
    each (vLLM's rendering too: "Translate to French:" and "Hello" do not run into one word)."""

    role: str
    content: Any

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "\n".join(part.words for part in self.content)

    def as_dict(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text}


class ChatMessageIn(MessageIn):
    model_config = ConfigDict(
        extra="ignore",  # e.g. `name`, or a returned message's `refusal` and `tool_calls`, which do not change the rendering
        json_schema_extra={"if": {"not": {"properties": {"role": {"const": "assistant"}}}},
                           "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}}})
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = Field(None, validate_default=True, description="Null or left out only in an "
                                                    "assistant message (a replayed history's tool-call turn): empty text.")

    @field_validator("content")
    @classmethod
    def _content_unless_assistant(cls, value, info: ValidationInfo):
        if value is None and info.data.get("role", "assistant") != "assistant":
            raise ValueError("only an assistant message may have no content")
        return value


# The JSON Schema of `chat_has_text` here: some message's content is text, or parts of which one is text
def _a_message_has_text(part_with_text: dict) -> dict:
    return {"contains": {"type": "object", "required": ["content"], "properties": {"content": {"anyOf": [
        TEXT_STRING, {"type": "array", "contains": part_with_text}]}}}}


def _a_part_has_text(text_types: list[str]) -> dict:
    return {"type": "object", "anyOf": [  # a refusal's words count as its turn's text
        {"required": ["type", "text"], "properties": {"type": {"enum": text_types}, "text": TEXT_STRING}},
        {"required": ["type", "refusal"], "properties": {"type": {"const": "refusal"}, "refusal": TEXT_STRING}}]}


A_MESSAGE_HAS_TEXT = _a_message_has_text(_a_part_has_text(["text"]))
A_MESSAGE_HAS_TEXT_PART = _a_message_has_text(_a_part_has_text(["input_text", "output_text"]))  # the Responses API's parts


class AcceptedAndIgnored(StrictRequest):
    """OpenAI fields that do not change the answer here (nothing is stored, there is one service tier, no tool calls)."""

    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None


NULL_ONLY = {"type": "null"}


def null_only(why: str) -> Any:
    """An OpenAI field this server does not implement: null (OpenAI's "not set", which clients send for an unset
    optional argument) is accepted, any value answers 400 saying ``why``."""
    return Field(None, description=f"Only null: {why}.", json_schema_extra=NULL_ONLY)


def set_null_only_fields(body: StrictRequest) -> list[str]:
    return [name for name, field in type(body).model_fields.items() if field.json_schema_extra == NULL_ONLY and getattr(body, name) is not None]


class ChatCompletionRequest(OpenAIRequest, AcceptedAndIgnored):
    model_config = ConfigDict(json_schema_extra={**OpenAIRequest.model_config["json_schema_extra"],
                                                 "not": {"required": ["max_tokens", "max_completion_tokens"],
                                                         "properties": {"max_tokens": {"type": "integer"},
                                                                        "max_completion_tokens": {"type": "integer"}}}})

    messages: Annotated[list[ChatMessageIn], AfterValidator(chat_has_text)] = Field(
        min_length=1, max_length=64, description="The chat; some message must hold text.", json_schema_extra=A_MESSAGE_HAS_TEXT)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = Field(None, description="Return each token's log-prob under the reference model (at temperature 1: "
                                  "SEA's tokens come from its edits, not from a distribution it sampled).")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With `logprobs`: this many of the reference's most likely "
                                     "tokens at each position.")
    tools: list[dict] | None = Field(None, description="Only empty (no tool calls).", json_schema_extra=accepts_only(schema={"type": "array", "maxItems": 0}))
    tool_choice: Any = Field(None, description="Only `none` or null.", json_schema_extra=accepts_only("none"))
    response_format: dict | None = Field(None, description="Only `{\"type\": \"text\"}` or null.", json_schema_extra=accepts_only(
        schema={"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}}))
    modalities: list[str] | None = Field(None, description="Only `[\"text\"]` or null.", json_schema_extra=accepts_only(
        schema={"type": "array", "items": {"const": "text"}}))
    audio: Any = null_only("the answer is text")
    function_call: Any = null_only("no tool calls")
    functions: Any = null_only("no tool calls")
    moderation: Any = null_only("no moderation")
    prediction: Any = null_only("no predicted outputs")
    reasoning_effort: Any = null_only("the model does not reason")
    verbosity: Any = null_only("the answer's length is `max_tokens`")
    web_search_options: Any = null_only("no web search")

    def log_prob_alternatives(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise BadRequest("`top_logprobs` needs `logprobs: true`", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> dict[str, Any]:
        bad = super().unsupported()
        if self.tools:
            bad["tools"] = self.tools
        if self.tool_choice not in (None, "none"):
            bad["tool_choice"] = self.tool_choice
        if self.response_format is not None and self.response_format.get("type") != "text":
            bad["response_format"] = self.response_format
        if any(modality != "text" for modality in self.modalities or []):
            bad["modalities"] = self.modalities
        return bad
