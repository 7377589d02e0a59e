"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions (with ``stream``).

SEA parameters ride in an extra ``sea`` object (``extra_body={"sea": {...}}`` with the official client);
the response carries the reward and energy in an extra ``sea`` field. Fields that would change the
result but are not supported answer 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from app.api.routes import UNAUTHORIZED, built, client, client_gone, engine_config, error_responses, get_service, require_api_key
from app.api.schemas import (
    SEED_RANGE,
    TEXT_STRING,
    ErrorResponse,
    LimitError,
    PromptText,
    SEAParams,
    StrictRequest,
    chat_has_text,
)
from app.engine.sea import Engine
from app.engine.types import AlignResult, ChainResult, SEAConfig, TokenLogProb, ranked_chains
from app.errors import APIError, BadRequest, NotFound, Unprocessable
from app.service.jobs import Job
from app.service.service import AlignService
from models.lm import token_piece

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

MODEL_ALIASES = {"sea", "default"}
# OpenAI clients expect 400 for a bad parameter: under /v1 validation errors and server limits answer 400, not 422.
MODEL_NOT_FOUND = {404: {"model": ErrorResponse, "description": "The model is not served here."}}
V1_ERRORS = {**error_responses(400, 401), **MODEL_NOT_FOUND, **error_responses(413, 415, 429, 499, 500, 503, 504)}
V1_RESPONSES = {200: {"description": "The completion; with `stream`, Server-Sent Events (`data:` chunks, then `data: [DONE]`).",
                      "content": {"application/json": {}, "text/event-stream": {}}}, **V1_ERRORS}


def _only(*values: Any, schema: dict | None = None) -> dict:
    """OpenAPI for a field accepted for compatibility with one neutral value (or null): any other value answers 400."""
    allowed = [schema] if schema is not None else [{"const": value} for value in values]
    return {"anyOf": [*allowed, {"type": "null"}]}


MAX_PROMPTS = 16  # prompts of one completion request (each its own job: each counts against the queue and a key's share)
KEEP_ALIVE_SECONDS = 15.0  # a stream sends a comment at least this often while its job waits or starts (idle proxies cut it)
OPENAI_FIELDS = ("max_tokens", "seed", "temperature", "top_p")  # /align parameters that /v1 takes from its own fields only


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


def _null_is_default(cls, value, info: ValidationInfo):
    """OpenAI's clients type these fields as optional and send null for "not set": it means the default."""
    return cls.model_fields[info.field_name].default if value is None else value


class StreamOptions(StrictRequest):
    include_usage: bool | None = False
    include_obfuscation: bool | None = Field(None, description="Accepted and ignored (no obfuscation padding is sent).")

    null_usage = field_validator("include_usage", mode="before")(classmethod(_null_is_default))


# stream_options only with stream: true (OpenAI's rule too)
STREAM_OPTIONS_NEED_STREAM = {"if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
                              "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}}


class _OpenAIBase(StrictRequest):
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
    presence_penalty: float | None = Field(None, description="Only 0 (accepted for compatibility).", json_schema_extra=_only(0))
    frequency_penalty: float | None = Field(None, description="Only 0 (accepted for compatibility).", json_schema_extra=_only(0))
    logit_bias: dict[str, float] | None = Field(None, description="Only empty (accepted for compatibility).",
                                                json_schema_extra=_only(schema={"type": "object", "maxProperties": 0}))
    sea: SEAOptions | None = Field(None, description="SEA parameters (see POST /align).")

    null_n_or_stream = field_validator("n", "stream", mode="before")(classmethod(_null_is_default))

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
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def params(self, max_tokens: int | None, default_chains: int) -> SEAParams:
        params = sea_params(self.sea, max_tokens=max_tokens, seed=self.seed, temperature=self.temperature, top_p=self.top_p)
        if self.n > 1:
            if params.method not in ("sea", "bon"):  # sample, ARGS and beam search return fewer than n distinct answers
                raise BadRequest(f"n > 1 needs method `sea` or `bon` (not `{params.method}`)", param="n")
            params.chains = max(params.chains or default_chains, self.n) if params.method == "sea" else params.chains
            if self.n > params.samples:  # noqa: PLR1730 -- assign only when needed: an unset `samples` stays unset
                params.samples = self.n
        return params


class CompletionRequest(_OpenAIBase):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=f"A prompt with some text, or up to {MAX_PROMPTS} of them: each runs as its own job (prompt i's choices are "
                    "indexed from i × n; `sea` is then a list, one entry per prompt).")
    echo: bool | None = Field(False, description="Only false or null.", json_schema_extra=_only(False))
    logprobs: int | None = Field(None, ge=0, le=5, description="Return each token's log-prob under the reference model (at "
                                 "temperature 1: SEA's tokens come from its edits, not from a distribution it sampled), with "
                                 "this many of the reference's most likely tokens at each position.")
    best_of: int | None = Field(None, description="Only 1 or null (use `n` and the `sea` options).", json_schema_extra=_only(1))
    suffix: str | None = Field(None, description="Only empty or null.", json_schema_extra=_only(""))

    null_echo = field_validator("echo", mode="before")(classmethod(_null_is_default))

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


def _set_null_only_fields(body: StrictRequest) -> list[str]:
    return [name for name, field in type(body).model_fields.items() if field.json_schema_extra == NULL_ONLY and getattr(body, name) is not None]


class ChatCompletionRequest(_OpenAIBase, AcceptedAndIgnored):
    model_config = ConfigDict(json_schema_extra={**_OpenAIBase.model_config["json_schema_extra"],
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
    tools: list[dict] | None = Field(None, description="Only empty (no tool calls).", json_schema_extra=_only(schema={"type": "array", "maxItems": 0}))
    tool_choice: Any = Field(None, description="Only `none` or null.", json_schema_extra=_only("none"))
    response_format: dict | None = Field(None, description="Only `{\"type\": \"text\"}` or null.", json_schema_extra=_only(
        schema={"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}}))
    modalities: list[str] | None = Field(None, description="Only `[\"text\"]` or null.", json_schema_extra=_only(
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


def _check_model(model: str, service: AlignService) -> None:
    """404 unless ``model`` names the served model (its id, or an alias such as `sea`)."""
    if model != service.model_name and model.lower() not in MODEL_ALIASES:
        raise NotFound(f"the model {model!r} is not served here; use {service.model_name!r}", param="model", code="model_not_found")


def _check(body, service: AlignService) -> None:
    """Refuse what ``body`` (a completions, chat or responses request) asks past this server's support or limits."""
    for name in body.unsupported():
        raise BadRequest(f"`{name}` is not supported by this server", param=name, code="unsupported_parameter")
    for name in _set_null_only_fields(body):
        why = type(body).model_fields[name].description.removeprefix("Only null: ")
        raise BadRequest(f"`{name}` is not supported by this server ({why.rstrip('.')})", param=name, code="unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise BadRequest("`stream_options` is only for streamed requests (`stream: true`)", param="stream_options")
    _check_model(body.model, service)
    limits = service.settings.limits()
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens", "n"):
        if (getattr(body, name, None) or 0) > limits[name]:
            raise Unprocessable(f"{name} must be at most {limits[name]} (server limit), got {getattr(body, name)}", param=name)
    if body.sea is not None:  # the `sea` values obey the server limits too
        try:
            body.sea.to_config(service.settings)
        except LimitError as exc:
            raise Unprocessable(str(exc), param=f"sea.{exc.field}") from None


def _generated(chain: ChainResult, stops: list[str], engine: Engine) -> tuple[str, int, str, int]:
    """A chain as one choice: its text up to the first stop string, the tokens generated to get there (with the
    end-of-turn token or the tokens that spell the stop string, as a server that stopped there would have generated),
    the finish reason, and the tokens that spell the text itself."""
    text, counted, stopped = engine.text_of(chain.tokens)
    found = [(i, s) for s in stops if (i := text.find(s)) >= 0]
    if not found:
        return text, counted, "stop" if stopped else "length", counted - stopped
    cut, stop = min(found)
    ids = chain.tokens[: counted - stopped]

    def tokens_reaching(characters: int) -> int:  # the fewest tokens that spell at least this many characters in full
        low, high = 0, len(ids)
        while low < high:
            middle = (low + high) // 2
            if _characters(engine, ids[:middle], text) >= characters:
                high = middle
            else:
                low = middle + 1
        return low

    return text[:cut], tokens_reaching(cut + len(stop)), "stop", tokens_reaching(cut)


def _characters(engine: Engine, ids: list[int], text: str) -> int:
    """Characters of ``text`` (what the whole response decodes to) that its first tokens ``ids`` spell in full: a
    character whose UTF-8 bytes the last of them only begin (an emoji, a CJK character split over tokens) decodes as
    U+FFFD, unlike the text, and is not counted yet (an invalid byte that the text holds as U+FFFD too is)."""
    return len(os.path.commonprefix([engine.lm.tokenizer.decode(ids, skip_special_tokens=True), text]))


def _finite(value: float) -> float | None:
    """JSON has no NaN or Infinity: a non-finite score (a failed evaluation) is sent as null, as /align does."""
    return value if math.isfinite(value) else None


def _sea_extra(job: Job, result: AlignResult, stops: list[str], engine: Engine) -> dict:
    """The ``sea`` extension: the run's figures; each chain's text cut at the stops like the choices', its scores those
    of the chain as sampled."""
    return {
        "method": result.method,
        "reward": _finite(result.reward),
        "log_prob_ref": _finite(result.log_prob_ref),
        "energy": _finite(result.energy),
        "energy_per_token": _finite(result.energy_per_token),
        "chosen": result.chosen,
        "seed": result.seed,  # the request's, or the one drawn for it: sent back as `seed`, it repeats the run
        "chains": [{"text": _generated(c, stops, engine)[0], "reward": _finite(c.reward), "energy": _finite(c.energy),
                    "log_prob_ref": _finite(c.log_prob_ref)} for c in result.chains],
        "timings": {"queue": job.queue_seconds, "init": result.timings.init, "langevin": result.timings.langevin,
                    "total": result.timings.total, "steps": result.timings.steps},
        "forward_token_passes": result.usage.forward_token_passes,
        "backward_token_passes": result.usage.backward_token_passes,
        "compute": result.usage.budgeted,  # what `max_compute` bounds
    }


def _usage(prompt: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}


def _choices(result: AlignResult, n: int, select: str, stops: list[str], chat: bool, engine: Engine) -> tuple[list[dict], int]:
    """The n best chains as choices, and the tokens generated for them all (OpenAI's ``completion_tokens``)."""
    choices, generated = [], 0
    for index, chain_index in enumerate(ranked_chains(result.chains, result.chosen, n, select)):
        chain = result.chains[chain_index]
        text, tokens, finish, text_tokens = _generated(chain, stops, engine)
        generated += tokens
        log_probs = None
        if chain.token_log_probs is not None:
            entries = chain.token_log_probs[:text_tokens]
            log_probs = _chat_log_probs(entries, engine) if chat else _completion_log_probs(entries, engine)
        if chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": log_probs})
        else:
            choices.append({"index": index, "text": text, "finish_reason": finish, "logprobs": log_probs})
    return choices, generated


def _chat_log_probs(entries: list[TokenLogProb], engine: Engine) -> dict:
    def listed(token: int, log_prob: float) -> dict:
        text, raw = token_piece(engine.lm.tokenizer, token)
        return {"token": text, "logprob": log_prob, "bytes": list(raw)}

    return {"content": [{**listed(e.token, e.log_prob), "top_logprobs": [listed(t, p) for t, p in e.top]} for e in entries],
            "refusal": None}


def _completion_log_probs(entries: list[TokenLogProb], engine: Engine) -> dict:
    """The legacy completions' shape: parallel lists; each position's most likely tokens and the token returned (as
    OpenAI, up to ``logprobs`` + 1 of them); each token's offset in the returned text (the characters it spells in
    full before it)."""
    tokenizer = engine.lm.tokenizer
    ids = [e.token for e in entries]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return {"tokens": [token_piece(tokenizer, token)[0] for token in ids],
            "token_logprobs": [e.log_prob for e in entries],
            "top_logprobs": [{token_piece(tokenizer, t)[0]: p for t, p in [*e.top, (e.token, e.log_prob)]} for e in entries],
            "text_offset": [_characters(engine, ids[:i], text) for i in range(len(ids))]}


async def _respond(body: _OpenAIBase, conversations: list[list[dict[str, str]]], max_tokens: int | None, request: Request,
                   service: AlignService, chat: bool):
    """Run each conversation (a chat's one, or a completion's prompts) as its own job, with the same settings."""
    _check(body, service)
    params = body.params(max_tokens, service.settings.default_chains)
    stops = body.stops()
    config = engine_config(params, service, logprobs=body.log_prob_alternatives(), logprob_chains=body.n)
    _check_prompts(len(conversations), config, service, client(request))
    listed = isinstance(getattr(body, "prompt", None), list)  # a completion's prompts sent as a list
    jobs = []
    try:
        for index, messages in enumerate(conversations):
            where = "messages" if chat else f"prompt.{index}" if listed else "prompt"
            jobs.append(await service.submit(config, messages, params.reward_options(), params.timeout, prompt_param=where,
                                             owner=client(request), also=len(conversations) - index - 1))
    except BaseException as exc:
        service.cancel_all(jobs, "another prompt of its request was refused")  # its prompts run together or not at all
        if isinstance(exc, APIError):
            raise named_as_sent(exc, ("prompt", "messages", *OPENAI_FIELDS)) from None
        raise
    answer = _Answer(jobs, body, config.select, stops, chat, service, listed=listed)
    if not body.stream:
        for result in await service.wait_all(jobs, client_gone(request)):  # a failure ends the wait (and the others) at once
            answer.add(result)
        # Returned as JSON here: FastAPI's own encoding of a plain dict walks it in Python (a second with 16 choices'
        # log-probs).
        choices = [choice for index in range(len(jobs)) for choice in await answer.choices(index)]
        return JSONResponse({"id": answer.id, "object": answer.object, "created": answer.created, "model": jobs[0].model,
                             "choices": choices, "usage": answer.usage(), "system_fingerprint": service.fingerprint,
                             **answer.tier, "sea": answer.sea()})
    return StreamingResponse(_stream(answer), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _check_prompts(count: int, config: SEAConfig, service: AlignService, owner: str | None) -> None:
    """Refuse, before any runs, a request of ``count`` prompts that could never run whole: more jobs than the queue or
    the API key's share holds (a 429 would say to retry), or more log-probs in all than one request may list."""
    settings = service.settings
    room = settings.max_queue + max(1, settings.max_batch_chains // config.batch_rows)  # queued, and joining an idle batch
    if count > room:
        raise BadRequest(f"{count} prompts are more requests than the batch and the queue hold ({room}); send fewer", param="prompt")
    if owner is not None and settings.max_jobs_per_key and count > settings.max_jobs_per_key:
        raise BadRequest(f"{count} prompts are more requests than one API key may have in flight ({settings.max_jobs_per_key}); "
                         "send fewer", param="prompt")
    if config.logprobs is not None:
        listed = count * (config.logprobs + 1) * config.max_tokens * config.logprob_chains
        if listed > settings.max_listed_log_probs:
            raise Unprocessable(f"logprobs would list {listed} log-probs over {count} prompts; the server lists at most "
                                f"{settings.max_listed_log_probs} in one request (ask for fewer alternatives, prompts or tokens)",
                                param="logprobs")


class _Answer:
    """A completion's pieces from its jobs' results: prompt i's choices are indexed from i × n, as OpenAI's."""

    def __init__(self, jobs: list[Job], body: _OpenAIBase, select: str, stops: list[str], chat: bool, service: AlignService,
                 listed: bool = False):
        self.jobs, self.body, self.select, self.stops, self.chat, self.service = jobs, body, select, stops, chat, service
        self.listed = listed  # the request's prompts came as a list: `sea` is a list too
        self.results: list[AlignResult] = []
        self.completion_tokens = 0
        self.object = "chat.completion" if chat else "text_completion"
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.tier = {"service_tier": "default"} if chat else {}

    def add(self, result: AlignResult) -> None:
        self.results.append(result)

    async def choices(self, index: int) -> list[dict]:
        """Prompt ``index``'s choices (its result added), counting their tokens into the usage."""
        job, result, engine = self.jobs[index], self.results[index], self.service.runtime.engine
        choices, tokens = await built(job, lambda: _choices(result, self.body.n, self.select, self.stops, self.chat, engine))
        self.completion_tokens += tokens
        for choice in choices:
            choice["index"] += index * self.body.n
        return choices

    def usage(self) -> dict:
        return _usage(sum(result.usage.prompt_tokens for result in self.results), self.completion_tokens)

    def sea(self) -> dict | list[dict]:
        """The `sea` extension: the run's figures; a list of each prompt's for a list of prompts (of one too)."""
        engine = self.service.runtime.engine
        extras = [_sea_extra(job, result, self.stops, engine) for job, result in zip(self.jobs, self.results)]
        return extras if self.listed else extras[0]


async def progress_comments(past: list[dict], queue: asyncio.Queue):
    """SSE comments while a job waits and runs (each step, and a keep-alive at least every ``KEEP_ALIVE_SECONDS``, which
    idle proxies need), until its end: ``past`` and ``queue`` are its events (``Job.subscribe``)."""
    pending = list(past)
    while True:
        if pending:
            event = pending.pop(0)
        else:
            try:
                event = await asyncio.wait_for(queue.get(), KEEP_ALIVE_SECONDS)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
                continue
        if event["event"] == "end":
            return
        if event["event"] == "step":
            yield f": step {event['step']}/{event['steps']}\n\n"


async def _stream(answer: _Answer):
    """OpenAI SSE chunks: progress as comments while the chains run, then each prompt's text in turn, then ``[DONE]``."""
    body, chat, service = answer.body, answer.chat, answer.service
    with_usage = body.stream_options is not None and body.stream_options.include_usage
    model = answer.jobs[0].model

    def chunk(choices: list[dict], **extra) -> str:
        payload = {"id": answer.id, "object": answer.object + (".chunk" if chat else ""), "created": answer.created, "model": model,
                   "choices": choices, "system_fingerprint": service.fingerprint, **answer.tier,
                   **({"usage": None} if with_usage else {}), **extra}
        return f"data: {json.dumps(payload, allow_nan=False)}\n\n"

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(body.n)])
        for index, job in enumerate(answer.jobs):
            past, queue = job.subscribe()
            try:
                async for comment in progress_comments(past, queue):
                    yield comment
            finally:
                job.unsubscribe(queue)
            try:
                answer.add(service.outcome(job))
            except Exception as exc:  # noqa: BLE001 -- the stream has started: report any failure in-band, as OpenAI does
                service.end_with(answer.jobs, job)
                error = {"message": getattr(exc, "message", "internal error"), "type": getattr(exc, "type", "server_error"),
                         "param": getattr(exc, "param", None), "code": getattr(exc, "code", None)}
                yield f"data: {json.dumps({'error': error})}\n\n"
                yield "data: [DONE]\n\n"
                return
            for choice in await answer.choices(index):
                number, finish = choice["index"], choice["finish_reason"]
                if chat:
                    text = choice["message"]["content"]
                    yield chunk([{"index": number, "delta": {"content": text}, "logprobs": choice["logprobs"], "finish_reason": None}])
                    yield chunk([{"index": number, "delta": {}, "finish_reason": finish}])
                else:
                    yield chunk([{"index": number, "text": choice["text"], "finish_reason": finish, "logprobs": choice["logprobs"]}])
        if with_usage:
            yield chunk([], usage=answer.usage(), sea=answer.sea())
        yield "data: [DONE]\n\n"
    finally:
        for job in answer.jobs:
            if not job.status.finished:  # the client went away mid-stream, or another prompt's job failed
                service.cancel(job)


def _model(service: AlignService) -> dict:
    return {"id": service.model_name, "object": "model", "created": service.serving_since, "owned_by": "sea-serve"}


@router.get("/models", responses=UNAUTHORIZED, summary="The served model.")
async def list_models(service: AlignService = Depends(get_service)) -> dict:
    return {"object": "list", "data": [_model(service)]}


@router.get("/models/{model:path}", responses={**UNAUTHORIZED, **MODEL_NOT_FOUND}, summary="The served model, by its id or `sea`.")
async def retrieve_model(model: str, service: AlignService = Depends(get_service)) -> dict:
    _check_model(model, service)
    return _model(service)


@router.post("/completions", responses=V1_RESPONSES, summary="OpenAI-compatible text completion, aligned with SEA.")
async def completions(body: CompletionRequest, request: Request, service: AlignService = Depends(get_service)):
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    return await _respond(body, [[{"role": "user", "content": prompt}] for prompt in prompts], body.max_tokens, request, service, chat=False)


@router.post("/chat/completions", responses=V1_RESPONSES, summary="OpenAI-compatible chat completion, aligned with SEA.")
async def chat_completions(body: ChatCompletionRequest, request: Request, service: AlignService = Depends(get_service)):
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise BadRequest("give `max_completion_tokens` or `max_tokens` (its older name), not both", param="max_completion_tokens")
    max_tokens = body.max_completion_tokens or body.max_tokens
    return await _respond(body, [[m.as_dict() for m in body.messages]], max_tokens, request, service, chat=True)
