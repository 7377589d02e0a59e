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

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.api.openai_protocol import (
    OPENAI_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIRequest,
    named_as_sent,
    set_null_only_fields,
)
from app.api.outputs import ErrorResponse
from app.api.routes import (
    UNAUTHORIZED,
    build_answer,
    client,
    client_gone,
    engine_config,
    error_responses,
    get_service,
    require_api_key,
)
from app.api.schemas import LimitError
from app.engine.types import AlignResult, ChainResult, SEAConfig, TokenLogProb, ranked_chains
from app.errors import APIError, BadRequest, NotFound, Unprocessable
from app.service.jobs import Job
from app.service.service import AlignService
from models.tokens import TokenText

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

MODEL_ALIASES = {"sea", "default"}
# OpenAI clients expect 400 for a bad parameter: under /v1 validation errors and server limits answer 400, not 422.
MODEL_NOT_FOUND = {404: {"model": ErrorResponse, "description": "The model is not served here."}}
V1_ERRORS = {**error_responses(400, 401), **MODEL_NOT_FOUND, **error_responses(413, 415, 429, 499, 500, 503, 504)}
V1_RESPONSES = {200: {"description": "The completion; with `stream`, Server-Sent Events (`data:` chunks, then `data: [DONE]`).",
                      "content": {"application/json": {}, "text/event-stream": {}}}, **V1_ERRORS}
KEEP_ALIVE_SECONDS = 15.0  # a stream sends a comment at least this often while its job waits or starts (idle proxies cut it)


def _check_model(model: str, service: AlignService) -> None:
    """404 unless ``model`` names the served model (its id, or an alias such as `sea`)."""
    if model != service.model_name and model.lower() not in MODEL_ALIASES:
        raise NotFound(f"the model {model!r} is not served here; use {service.model_name!r}", param="model", code="model_not_found")


def check_request(body, service: AlignService) -> None:
    """Refuse what ``body`` (a completions, chat or responses request) asks past this server's support or limits."""
    for name in body.unsupported():
        raise BadRequest(f"`{name}` is not supported by this server", param=name, code="unsupported_parameter")
    for name in set_null_only_fields(body):
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


def _generated(chain: ChainResult, stops: list[str], text_of: TokenText) -> tuple[str, int, str, int]:
    """A chain as one choice: its text up to the first stop string, the tokens generated to get there (with the
    end-of-turn token or the tokens that spell the stop string, as a server that stopped there would have generated),
    the finish reason, and the tokens that spell the text itself."""
    text, counted, stopped = text_of.response(chain.tokens)
    found = [(i, s) for s in stops if (i := text.find(s)) >= 0]
    if not found:
        return text, counted, "stop" if stopped else "length", counted - stopped
    cut, stop = min(found)
    ids = chain.tokens[: counted - stopped]

    def tokens_reaching(characters: int) -> int:  # the fewest tokens that spell at least this many characters in full
        low, high = 0, len(ids)
        while low < high:
            middle = (low + high) // 2
            if _characters(text_of, ids[:middle], text) >= characters:
                high = middle
            else:
                low = middle + 1
        return low

    return text[:cut], tokens_reaching(cut + len(stop)), "stop", tokens_reaching(cut)


def _characters(text_of: TokenText, ids: list[int], text: str) -> int:
    """Characters of ``text`` (what the whole response decodes to) that its first tokens ``ids`` spell in full: a
    character whose UTF-8 bytes the last of them only begin (an emoji, a CJK character split over tokens) decodes as
    U+FFFD, unlike the text, and is not counted yet (an invalid byte that the text holds as U+FFFD too is)."""
    return len(os.path.commonprefix([text_of.decode(ids), text]))


def _finite(value: float) -> float | None:
    """JSON has no NaN or Infinity: a non-finite score (a failed evaluation) is sent as null, as /align does."""
    return value if math.isfinite(value) else None


def sea_extra(job: Job, result: AlignResult, stops: list[str], text_of: TokenText) -> dict:
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
        "chains": [{"text": _generated(c, stops, text_of)[0], "reward": _finite(c.reward), "energy": _finite(c.energy),
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


def build_choices(result: AlignResult, n: int, select: str, stops: list[str], chat: bool, text_of: TokenText) -> tuple[list[dict], int]:
    """The n best chains as choices, and the tokens generated for them all (OpenAI's ``completion_tokens``)."""
    choices, generated = [], 0
    for index, chain_index in enumerate(ranked_chains(result.chains, result.chosen, n, select)):
        chain = result.chains[chain_index]
        text, tokens, finish, text_tokens = _generated(chain, stops, text_of)
        generated += tokens
        log_probs = None
        if chain.token_log_probs is not None:
            entries = chain.token_log_probs[:text_tokens]
            log_probs = _chat_log_probs(entries, text_of) if chat else _completion_log_probs(entries, text_of)
        if chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": log_probs})
        else:
            choices.append({"index": index, "text": text, "finish_reason": finish, "logprobs": log_probs})
    return choices, generated


def _chat_log_probs(entries: list[TokenLogProb], text_of: TokenText) -> dict:
    def listed(token: int, log_prob: float) -> dict:
        text, raw = text_of.piece(token)
        return {"token": text, "logprob": log_prob, "bytes": list(raw)}

    return {"content": [{**listed(e.token, e.log_prob), "top_logprobs": [listed(t, p) for t, p in e.top]} for e in entries],
            "refusal": None}


def _completion_log_probs(entries: list[TokenLogProb], text_of: TokenText) -> dict:
    """The legacy completions' shape: parallel lists; each position's most likely tokens and the token returned (as
    OpenAI, up to ``logprobs`` + 1 of them); each token's offset in the returned text (the characters it spells in
    full before it)."""
    ids = [e.token for e in entries]
    text = text_of.decode(ids)
    return {"tokens": [text_of.piece(token)[0] for token in ids],
            "token_logprobs": [e.log_prob for e in entries],
            "top_logprobs": [{text_of.piece(t)[0]: p for t, p in [*e.top, (e.token, e.log_prob)]} for e in entries],
            "text_offset": [_characters(text_of, ids[:i], text) for i in range(len(ids))]}


async def _respond(body: OpenAIRequest, conversations: list[list[dict[str, str]]], max_tokens: int | None, request: Request,
                   service: AlignService, chat: bool):
    """Run each conversation (a chat's one, or a completion's prompts) as its own job, with the same settings."""
    check_request(body, service)
    params = body.params(max_tokens, service.settings.default_chains)
    stops = body.stops()
    config = engine_config(params, service, logprobs=body.log_prob_alternatives(), logprob_chains=body.n)
    _refuse_what_cannot_run_whole(len(conversations), config, service, client(request))
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


def _refuse_what_cannot_run_whole(count: int, config: SEAConfig, service: AlignService, owner: str | None) -> None:
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

    def __init__(self, jobs: list[Job], body: OpenAIRequest, select: str, stops: list[str], chat: bool, service: AlignService,
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
        job, result, text_of = self.jobs[index], self.results[index], self.service.runtime.text
        choices, tokens = await build_answer(job, lambda: build_choices(result, self.body.n, self.select, self.stops, self.chat, text_of))
        self.completion_tokens += tokens
        for choice in choices:
            choice["index"] += index * self.body.n
        return choices

    def usage(self) -> dict:
        return _usage(sum(result.usage.prompt_tokens for result in self.results), self.completion_tokens)

    def sea(self) -> dict | list[dict]:
        """The `sea` extension: the run's figures; a list of each prompt's for a list of prompts (of one too)."""
        extras = [sea_extra(job, result, self.stops, self.service.runtime.text) for job, result in zip(self.jobs, self.results)]
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
