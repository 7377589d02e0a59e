"""OpenAI's Responses API (`POST /v1/responses`), the official client's `client.responses.create`: one SEA run, its
best chain as the output message; streamed as the API's typed events. Nothing is stored: `previous_response_id`,
conversations, stored prompts, background runs and reasoning settings are refused as unsupported fields (send the
conversation as `input`); the neutral values the Response object echoes (`background: false`, `reasoning: null`) are
accepted."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from app.api.openai import V1_RESPONSES, build_choices, check_request, progress_comments, sea_extra
from app.api.openai_protocol import (
    A_MESSAGE_HAS_TEXT_PART,
    STREAM_OPTIONS_NEED_STREAM,
    AcceptedAndIgnored,
    MessageIn,
    SEAOptions,
    StreamOptions,
    TextOrRefusal,
    accepts_only,
    named_as_sent,
    null_is_default,
    null_only,
    sea_params,
)
from app.api.routes import build_answer, client, client_gone, engine_config, get_service, require_api_key
from app.api.schemas import SEED_RANGE, PromptText, SEAParams, chat_has_text
from app.engine.types import AlignResult, SEAConfig
from app.errors import APIError
from app.service.jobs import Job
from app.service.service import AlignService

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

LOG_PROBS_INCLUDE = "message.output_text.logprobs"


class InputPart(TextOrRefusal):
    """An input or a replayed output's text part, or a replayed refusal."""

    model_config = ConfigDict(extra="ignore")  # a replayed output part's `annotations` and `logprobs`
    type: Literal["input_text", "output_text", "refusal"]


class InputMessage(MessageIn):
    model_config = ConfigDict(extra="ignore")  # a replayed output message's `id` and `status`
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputPart]

    @model_validator(mode="before")
    @classmethod
    def _a_message(cls, item):
        """An item of another type (a tool call's output, a reasoning item) is named as such, not as a message that
        lacks its `role`."""
        if isinstance(item, dict) and item.get("type", "message") not in ("message", None):
            raise ValueError(f"input items of type `{item['type']}` are not supported: send messages (text only)")
        return item


class ResponseRequest(AcceptedAndIgnored):
    model_config = ConfigDict(json_schema_extra={"allOf": [STREAM_OPTIONS_NEED_STREAM]})

    model: str = Field(description="The served model id (see /v1/models), or `sea`.", examples=["sea"])
    input: PromptText | Annotated[list[InputMessage], Field(min_length=1, max_length=64, json_schema_extra=A_MESSAGE_HAS_TEXT_PART),
                                  AfterValidator(chat_has_text)] = Field(
        description="A user prompt, or the conversation's messages (text only).")
    instructions: str | None = Field(None, description="A system message put before the input.")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, description="Temperature of the base samples.")
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="Nucleus of the base samples (0: the most likely token).")
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1], description="Not an OpenAI field (send it in `extra_body`): the same seed, the same output.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    include: list[str] | None = Field(None, description=f"`{LOG_PROBS_INCLUDE}` lists each output token's log-prob under the "
                                      "reference model (temperature 1); other values are accepted and add nothing.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description=f"With `include: [\"{LOG_PROBS_INCLUDE}\"]`: this many of the "
                                     "reference's most likely tokens at each position.")
    tools: list[dict] | None = Field(None, description="Only empty (no tool calls).", json_schema_extra=accepts_only(schema={"type": "array", "maxItems": 0}))
    tool_choice: Any = Field(None, description="Only `none`, `auto` (with no tools) or null.", json_schema_extra=accepts_only(
        schema={"enum": ["none", "auto"]}))
    text: dict | None = Field(None, description="Only a `text` format (or none), and no `verbosity` (the answer's length is `max_output_tokens`).", json_schema_extra=accepts_only(schema={
        "type": "object", "properties": {"format": {"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}}}}))
    background: bool | None = Field(None, description="Only false or null (a response is answered when it is done).",
                                    json_schema_extra=accepts_only(False))
    reasoning: dict | None = Field(None, description="Only null or empty (the model does not reason).",
                                   json_schema_extra=accepts_only(schema={"type": "object", "maxProperties": 0}))
    previous_response_id: Any = null_only("nothing is stored; send the conversation as `input`")
    conversation: Any = null_only("nothing is stored; send the conversation as `input`")
    prompt: Any = null_only("no stored prompts; send the text as `input`")
    context_management: Any = null_only("the conversation is sent whole")
    access_programs: Any = null_only("not implemented")
    background_options: Any = null_only("no background runs")
    image: Any = null_only("the answer is text")
    moderation: Any = null_only("no moderation")
    # Accepted and ignored too (besides AcceptedAndIgnored's)
    user: str | None = None
    max_tool_calls: int | None = None
    truncation: Literal["auto", "disabled"] | None = None
    sea: SEAOptions | None = Field(None, description="SEA parameters (see POST /align).")

    null_stream = field_validator("stream", mode="before")(classmethod(null_is_default))

    def unsupported(self) -> dict[str, Any]:
        """Fields set to values that would change the result in ways this server does not implement."""
        bad = {}
        if self.tools:
            bad["tools"] = self.tools
        if self.tool_choice not in (None, "none", "auto"):
            bad["tool_choice"] = self.tool_choice
        if self.background:
            bad["background"] = self.background
        if self.reasoning:
            bad["reasoning"] = self.reasoning
        if self.text is not None and "format" in self.text and not (isinstance(self.text["format"], dict) and self.text["format"].get("type") == "text"):
            bad["text"] = self.text
        elif self.text is not None and self.text.get("verbosity") is not None:  # as chat's `verbosity`
            bad["text.verbosity"] = self.text["verbosity"]
        return bad

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return [*system, {"role": "user", "content": self.input}]
        return [*system, *(message.as_dict() for message in self.input)]

    def params(self) -> SEAParams:
        return sea_params(self.sea, max_tokens=self.max_output_tokens, seed=self.seed, temperature=self.temperature, top_p=self.top_p)

    def log_prob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if LOG_PROBS_INCLUDE in (self.include or []) else None

    def echoed(self, config: SEAConfig) -> dict[str, Any]:
        """The settings the response ran with (``config``: its engine configuration) as a Response object repeats them."""
        return {"instructions": self.instructions, "max_output_tokens": config.max_tokens, "temperature": config.temperature,
                "top_p": config.top_p, "top_logprobs": self.top_logprobs, "metadata": self.metadata or {}, "user": self.user,
                "max_tool_calls": self.max_tool_calls, "parallel_tool_calls": False, "tool_choice": self.tool_choice or "none",
                "tools": [], "text": {"format": {"type": "text"}},
                "truncation": "disabled", "store": False, "background": False, "previous_response_id": None, "reasoning": None,
                "service_tier": "default"}


class _Run:
    """One response's ids and the pieces of its Response object."""

    def __init__(self, body: ResponseRequest, job: Job, service: AlignService):
        self.body, self.job, self.service = body, job, service
        self.id = "resp_" + uuid.uuid4().hex
        self.message_id = "msg_" + uuid.uuid4().hex
        self.created_at = int(time.time())

    def response(self, status: str, result: AlignResult | None = None, text: str = "", log_probs: list | None = None,
                 completion_tokens: int = 0, error: dict | None = None) -> dict[str, Any]:
        output = [] if status in ("in_progress", "failed") else [self.message(status, text, log_probs)]
        response = {"id": self.id, "object": "response", "created_at": self.created_at, "status": status, "model": self.job.model,
                    "output": output, "error": error,
                    "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                    **self.body.echoed(self.job.work.config), "usage": None,
                    "completed_at": int(time.time()) if status == "completed" else None}
        if result is not None:
            prompt = result.usage.prompt_tokens
            response["usage"] = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                                 "output_tokens": completion_tokens,
                                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + completion_tokens}
            response["sea"] = sea_extra(self.job, result, [], self.service.runtime.text)
        return response

    def message(self, status: str, text: str, log_probs: list | None) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [self.part(text, log_probs)] if status != "in_progress" else []}

    @staticmethod
    def part(text: str, log_probs: list | None) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": log_probs or []}

    async def finished(self, result: AlignResult) -> dict[str, Any]:
        """The finished Response: the best chain's text; `incomplete` when it ran to `max_output_tokens`."""
        text_of = self.service.runtime.text
        choices, completion_tokens = await build_answer(self.job, lambda: build_choices(result, 1, self.job.work.config.select, [], True, text_of))
        choice = choices[0]
        status = "incomplete" if choice["finish_reason"] == "length" else "completed"
        log_probs = choice["logprobs"]["content"] if choice["logprobs"] is not None else None
        return self.response(status, result, choice["message"]["content"], log_probs, completion_tokens)


@router.post("/responses", responses=V1_RESPONSES, summary="OpenAI Responses API: one SEA run, its best chain as the output message.")
async def create_response(body: ResponseRequest, request: Request, service: AlignService = Depends(get_service)):
    check_request(body, service)
    params = body.params()
    config = engine_config(params, service, logprobs=body.log_prob_alternatives(), logprob_chains=1)
    try:
        job = await service.submit(config, body.messages(), params.reward_options(), params.timeout, prompt_param="input",
                                   owner=client(request))
    except APIError as exc:
        raise named_as_sent(exc, tuple(ResponseRequest.model_fields)) from None
    run = _Run(body, job, service)
    if not body.stream:
        return JSONResponse(await run.finished(await service.wait(job, client_gone(request))))
    return StreamingResponse(_events(run), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(run: _Run):
    """The Responses API's stream: created and in_progress, progress comments while the chains run, then the output
    message's events and `response.completed` (`incomplete` at the token limit, `failed` on an error)."""
    sequence = 0

    def event(kind: str, **fields) -> str:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, allow_nan=False)}\n\n"

    job, service = run.job, run.service
    past, queue = job.subscribe()
    try:
        yield event("response.created", response=run.response("in_progress"))
        yield event("response.in_progress", response=run.response("in_progress"))
        async for comment in progress_comments(past, queue):
            yield comment
        try:
            result = service.outcome(job)
        except Exception as exc:  # noqa: BLE001 -- the stream has started: report any failure in-band, as OpenAI does
            # OpenAI's clients type the code as a Literal of OpenAI's own failures: ours are all `server_error`, and the
            # message says what happened (the request's timeout, out of memory, a replica's shutdown).
            error = {"code": "server_error", "message": getattr(exc, "message", "internal error")}
            yield event("response.failed", response=run.response("failed", error=error))
            return
        final = await run.finished(result)
        item = final["output"][0]
        part = item["content"][0]
        where = {"item_id": run.message_id, "output_index": 0, "content_index": 0}
        yield event("response.output_item.added", output_index=0, item=run.message("in_progress", "", None))
        yield event("response.content_part.added", **where, part=run.part("", None))
        yield event("response.output_text.delta", **where, delta=part["text"], logprobs=part["logprobs"])
        yield event("response.output_text.done", **where, text=part["text"], logprobs=part["logprobs"])
        yield event("response.content_part.done", **where, part=part)
        yield event("response.output_item.done", output_index=0, item=item)
        yield event(f"response.{final['status']}", response=final)
    finally:
        job.unsubscribe(queue)
        if not job.status.finished:  # the client went away mid-stream
            service.cancel(job)
