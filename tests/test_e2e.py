"""End to end: the real uvicorn server on a tiny model, real HTTP clients, the official `openai` client."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from httpx_sse import connect_sse
from prometheus_client.parser import text_string_to_metric_families

from app.api.openai import _chat_log_probs, _completion_log_probs, _generated, sea_extra
from app.engine.types import AlignResult, ChainResult, SEAConfig, StepStats, Timings, TokenLogProb, Usage
from app.runtime import Runtime
from app.settings import Settings
from models.defaults import KEYWORD_WEIGHT
from models.tokens import TokenText, render_prompt
from tests.server import ServerProcess, wait_for
from tests.tiny import byte_level_tokenizer, save_tiny_lm, tiny_lm


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = save_tiny_lm(tiny_lm(), tmp_path_factory.mktemp("model") / "tiny-llama")
    proc = ServerProcess(str(folder), tmp_path_factory.mktemp("logs") / "server.log", max_queue=64, default_steps=3, default_max_tokens=6)
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_health_ready_and_models(http):
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").json()["status"] == "ready"
    assert http.head("/health").status_code == http.head("/ready").status_code == 200  # probes that use HEAD
    assert http.head("/metrics").status_code == 200  # a scrape target's check (was 405)
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny-llama"
    assert time.time() - 3600 < models["data"][0]["created"] <= time.time()  # since when it is served (a Unix time, not 0)


def test_align_returns_text_chains_traces_usage_and_timings(http):
    response = http.post("/align", json={"prompt": "tell me about the sun", "chains": 3, "steps": 4, "max_tokens": 6, "seed": 5,
                                         "return_trace": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["x-request-id"]
    assert body["text"] == body["chains"][body["chosen"]]["text"]
    steps = body["timings"]["steps"]
    assert 1 <= steps <= 4  # the discrete update stops early when no edit is predicted to help
    assert len(body["chains"]) == 3 and all(len(c["trace"]) == steps for c in body["chains"])
    assert body["usage"]["prompt_tokens"] > 0 and 0 < body["usage"]["completion_tokens"] <= 6
    assert body["usage"]["backward_token_passes"] > 0
    assert body["timings"]["total"] >= body["timings"]["langevin"] > 0
    assert body["energy"] == pytest.approx(-(body["log_prob_ref"] + 1.0 * body["reward"]), abs=1e-3)


def test_align_with_messages_keywords_and_baselines(http):
    chat = {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "write about a dog"}], "max_tokens": 5, "seed": 1}
    sea = http.post("/align", json={**chat, "reward": {"keywords": ["penguin"], "keywords_only": True}, "alpha": 5}).json()
    assert sea["reward"] in (0.0, KEYWORD_WEIGHT)  # keyword coverage only (one word), at the server's default weight
    assert sea["energy"] == pytest.approx(-(sea["log_prob_ref"] + 5 * sea["reward"]), abs=1e-3)
    bon = http.post("/align", json={**chat, "method": "bon", "samples": 6}).json()
    assert bon["method"] == "bon" and len(bon["chains"]) == 6
    assert bon["reward"] == max(c["reward"] for c in bon["chains"])
    sample = http.post("/align", json={**chat, "method": "sample"}).json()
    assert sample["method"] == "sample" and len(sample["chains"]) == 1


def test_sea_runs_at_the_compute_a_best_of_n_request_spent(http):
    """`max_compute` bounds SEA's work in the token-passes `usage.compute` reports: set to what Best-of-N spent, SEA
    takes the steps that fit (not the 200 asked for) and spends no more."""
    request = {"prompt": "write about a dog", "max_tokens": 6, "seed": 3}
    bon = http.post("/align", json={**request, "method": "bon", "samples": 24}).json()
    usage = bon["usage"]
    assert usage["compute"] == usage["forward_token_passes"] + 2 * usage["backward_token_passes"] - usage["prompt_token_passes"] > 0
    sea = http.post("/align", json={**request, "chains": 2, "steps": 200, "max_compute": usage["compute"]}).json()
    assert 1 <= sea["timings"]["steps"] < 200
    assert sea["usage"]["compute"] <= usage["compute"]


def test_same_seed_same_text_alone_or_among_concurrent_requests(http, server):
    request = {"prompt": "sing a song about the moon", "chains": 2, "steps": 3, "max_tokens": 6, "seed": 11}
    alone = http.post("/align", json=request).json()

    def post(body):
        with httpx.Client(base_url=server.url, timeout=60) as client:
            return client.post("/align", json=body).json()

    others = [{"prompt": f"write {i} words about a river", "chains": 3, "steps": 5, "max_tokens": 8, "seed": i} for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(post, body) for body in others[:2]] + [pool.submit(post, request)] + [pool.submit(post, b) for b in others[2:]]
        together = futures[2].result()
        [f.result() for f in futures]
    assert [c["text"] for c in together["chains"]] == [c["text"] for c in alone["chains"]]
    assert together["energy"] == pytest.approx(alone["energy"], abs=1e-3)


def test_a_run_without_a_seed_returns_the_one_it_drew_and_that_seed_repeats_it(http):
    """Without a seed a good answer could not be had again (and the playground's "same seed" reference was not)."""
    request = {"prompt": "sing a song about the moon", "chains": 2, "steps": 2, "max_tokens": 6}
    drawn = http.post("/align", json=request).json()
    assert isinstance(drawn["seed"], int) and 0 <= drawn["seed"] < 2**53
    again = http.post("/align", json={**request, "seed": drawn["seed"]}).json()
    assert again["seed"] == drawn["seed"] and [c["text"] for c in again["chains"]] == [c["text"] for c in drawn["chains"]]
    assert http.post("/align", json={**request, "method": "bon", "samples": 2, "seed": 5}).json()["seed"] == 5


def test_job_lifecycle_with_server_sent_events(http):
    created = http.post("/jobs", json={"prompt": "what is tea", "chains": 2, "steps": 4, "max_tokens": 5, "seed": 3})
    assert created.status_code == 202
    location = created.headers["location"]
    assert location == f"/jobs/{created.json()['id']}"
    steps, result = [], None
    with connect_sse(http, "GET", location + "/events") as source:
        for event in source.iter_sse():
            if event.event == "step":
                steps.append(json.loads(event.data))
            elif event.event == "result":
                result = json.loads(event.data)
                break
    run_steps = result["result"]["timings"]["steps"]  # the discrete update may converge before `steps`
    assert 1 <= run_steps <= 4
    assert [s["step"] for s in steps] == list(range(run_steps + 1))
    assert all(len(s["chains"]) == 2 and "energy" in s["chains"][0] and "text" in s["chains"][0] for s in steps)
    assert result["status"] == "succeeded"
    chosen = result["result"]["chains"][result["result"]["chosen"]]
    assert chosen["best_step"] <= 4 and result["result"]["text"] == chosen["text"]
    job = http.get(location).json()
    assert job["status"] == "succeeded" and job["result"]["timings"]["steps"] == run_steps

    # A replay of the ended job: the same steps and texts, token pieces only where a replay marks them.
    with connect_sse(http, "GET", location + "/events") as source:
        replay = [json.loads(event.data) for event in source.iter_sse() if event.event == "step"]
    assert [[c["text"] for c in s["chains"]] for s in replay] == [[c["text"] for c in s["chains"]] for s in steps]
    assert_light(replay, [chain["best_step"] for chain in result["result"]["chains"]])


def assert_light(steps: list[dict], best_steps: list[int]) -> None:
    """An ended job's stored step events: each chain's token pieces at its best step and in the last event only."""
    stripped = 0
    for index, event in enumerate(steps):
        for chain, entry in enumerate(event["chains"]):
            kept = index == len(steps) - 1 or event["step"] == best_steps[chain]
            assert ("pieces" in entry) == ("changed_positions" in entry) == kept, (event["step"], chain, best_steps)
            stripped += not kept
    assert stripped > 0, "pick a run whose chains have steps other than their best and the last"


def test_cancelling_a_long_job(http):
    created = http.post("/jobs", json={"prompt": "write a long story", "chains": 4, "steps": 200, "max_tokens": 32, "seed": 3}).json()
    cancelled = http.delete(f"/jobs/{created['id']}").json()
    # DELETE waits up to 5 s for the chains to leave the batch at the next step; a loaded machine may take longer.
    assert cancelled["status"] in ("cancelled", "running")
    assert wait_for(lambda: http.get(f"/jobs/{created['id']}").json()["status"] != "running", 60) is True
    assert http.get(f"/jobs/{created['id']}").json()["status"] == "cancelled"
    # The worker keeps serving.
    assert http.post("/align", json={"prompt": "hi", "steps": 1, "max_tokens": 3}).status_code == 200


def test_errors_name_the_field(http):
    over = http.post("/align", json={"prompt": "hi", "chains": 1000})
    assert over.status_code == 422 and over.json()["error"]["param"] == "chains"
    unknown = http.post("/align", json={"prompt": "hi", "chainz": 2})
    assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "chainz"
    neither = http.post("/align", json={"steps": 2})
    assert neither.status_code == 422
    reward = http.post("/align", json={"prompt": "hi", "reward": {"terms": {"nope": 1}}})
    assert reward.status_code == 422 and reward.json()["error"]["param"] == "reward.terms"
    bad_json = http.post("/align", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 422
    assert http.get("/jobs/job-doesnotexist").status_code == 404
    too_big = http.post("/align", content=b"x" * 2_000_000, headers={"content-type": "application/json"})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"


def test_official_openai_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve("tiny-llama").id == client.models.retrieve("sea").id == client.models.list().data[0].id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    completion = client.completions.create(model="tiny-llama", prompt="the dog", max_tokens=5, seed=2, extra_body={"sea": {"steps": 2, "chains": 2}})
    assert completion.choices[0].text == completion.model_extra["sea"]["chains"][completion.model_extra["sea"]["chosen"]]["text"]
    assert completion.usage.completion_tokens <= 5 and completion.usage.prompt_tokens > 0
    assert completion.model_extra["sea"]["seed"] == 2
    # Without a seed the server draws one and names it: sent back, it repeats the run (a /v1 answer did not name it).
    drawn = client.completions.create(model="sea", prompt="the dog", max_tokens=5, extra_body={"sea": {"steps": 2, "chains": 2}})
    again = client.completions.create(model="sea", prompt="the dog", max_tokens=5, seed=drawn.model_extra["sea"]["seed"],
                                      extra_body={"sea": {"steps": 2, "chains": 2}})
    assert [c["text"] for c in again.model_extra["sea"]["chains"]] == [c["text"] for c in drawn.model_extra["sea"]["chains"]]

    chat = client.chat.completions.create(model="sea", messages=[{"role": "user", "content": "hello"}], max_tokens=4, seed=1, n=2,
                                          extra_body={"sea": {"steps": 2, "alpha": 2.0, "chains": 2}})
    assert len(chat.choices) == 2 and chat.choices[0].message.role == "assistant"
    one = client.chat.completions.create(model="sea", messages=[{"role": "user", "content": "hello"}], max_tokens=4, seed=1, n=1,
                                         extra_body={"sea": {"steps": 2, "alpha": 2.0, "chains": 2}})
    assert one.choices[0].message.content == chat.choices[0].message.content  # the same two chains, n = 2 returns both
    assert chat.usage.completion_tokens > one.usage.completion_tokens  # the usage counts every choice's tokens
    assert chat.model_extra["sea"]["energy"] == pytest.approx(-(chat.model_extra["sea"]["log_prob_ref"] + 2.0 * chat.model_extra["sea"]["reward"]), abs=1e-3)

    stream = client.chat.completions.create(model="sea", messages=[{"role": "user", "content": "hello"}], max_tokens=4, seed=1,
                                            stream=True, stream_options={"include_usage": True}, extra_body={"sea": {"steps": 2}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    alone = client.chat.completions.create(model="sea", messages=[{"role": "user", "content": "hello"}], max_tokens=4, seed=1,
                                           extra_body={"sea": {"steps": 2}})
    assert text == alone.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert all("usage" in c.model_fields_set for c in chunks)  # null until the last, as OpenAI's stream with include_usage
    # OpenAI's details and fingerprint, which client code reads without checking for None
    assert chat.usage.prompt_tokens_details.cached_tokens == 0 and chat.usage.completion_tokens_details.reasoning_tokens == 0
    assert chat.system_fingerprint.startswith("fp_") and {c.system_fingerprint for c in chunks} == {chat.system_fingerprint}
    assert completion.system_fingerprint == chat.system_fingerprint and chat.service_tier == "default"
    parts = client.chat.completions.create(model="sea", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Translate to French:"}, {"type": "text", "text": "Hello"}]}], max_tokens=1, extra_body={"sea": {"steps": 0}})
    lines = client.chat.completions.create(model="sea", messages=[{"role": "user", "content": "Translate to French:\nHello"}],
                                           max_tokens=1, extra_body={"sea": {"steps": 0}})
    assert parts.usage.prompt_tokens == lines.usage.prompt_tokens  # a line each: the parts do not run into one word

    streamed = client.completions.create(model="sea", prompt="hi", max_tokens=3, stream=True, extra_body={"sea": {"steps": 1}})
    assert len([c for c in streamed if c.choices]) == 1

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="sea", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    assert bad.value.body["param"] == "top_logprobs"  # needs logprobs: true, as OpenAI's
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-5", prompt="hi")
    with pytest.raises(openai.BadRequestError) as unknown:
        client.completions.create(model="sea", prompt="hi", extra_body={"sea": {"stepz": 1}})
    assert unknown.value.body["param"] == "sea.stepz"


def test_the_openai_client_s_null_and_neutral_fields_and_the_fields_its_errors_name(server):
    """What the official client sends besides the core fields: null for "not set", fields that change nothing here,
    and fields this server does not know; and errors that name the field as the request spells it."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    hello, sea = [{"role": "user", "content": "hello"}], {"sea": {"steps": 1}}
    chat = client.chat.completions.create(model="sea", messages=hello, max_tokens=None, max_completion_tokens=3, n=None, stream=None,
                                          seed=1, extra_body=sea)
    assert len(chat.choices) == 1 and chat.usage.completion_tokens <= 3
    text = client.completions.create(model="sea", prompt="hi", max_tokens=3, echo=None, n=None, stream=None, seed=1, extra_body=sea)
    assert len(text.choices) == 1
    same = client.chat.completions.create(model="sea", messages=hello, max_completion_tokens=3, seed=1, metadata={"team": "a"},
                                          store=False, service_tier="auto", prompt_cache_key="k", safety_identifier="u-1",
                                          parallel_tool_calls=False, extra_body=sea)
    assert same.choices[0].message.content == chat.choices[0].message.content
    streamed = client.chat.completions.create(model="sea", messages=hello, max_completion_tokens=3, seed=1, stream=True,
                                              stream_options={"include_usage": None, "include_obfuscation": False}, extra_body=sea)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert all(c.usage is None for c in chunks)

    # n raises the server's default chains (4) to n, never lowers it: asking for two answers searches no less.
    two = client.chat.completions.create(model="sea", messages=hello, max_tokens=3, n=2, seed=1, extra_body=sea)
    assert len(two.choices) == 2 and len(two.model_extra["sea"]["chains"]) == 4
    # OpenAI takes any 64-bit seed (tools send -1); each repeats its answer, and the run echoes it as given
    for seed in (-1, -(2**63), 2**63 - 1):
        runs = [client.completions.create(model="sea", prompt="the cat", max_tokens=4, seed=seed, extra_body=sea) for _ in range(2)]
        assert runs[0].choices[0].text == runs[1].choices[0].text and runs[0].model_extra["sea"]["seed"] == seed
    with pytest.raises(openai.BadRequestError) as past_int64:
        client.completions.create(model="sea", prompt="the cat", max_tokens=4, seed=2**63)
    assert past_int64.value.param == "seed"
    greedy = [client.completions.create(model="sea", prompt="the dog", max_tokens=4, top_p=0, seed=seed,
                                        extra_body={"sea": {"method": "sample"}}).choices[0].text for seed in (1, 2)]
    assert greedy[0] == greedy[1], "top_p 0 keeps only the most likely token, whatever the seed"

    # OpenAI arguments this server does not implement, left unset: the client sends them as null (was 400)
    unset = client.chat.completions.create(model="sea", messages=hello, max_completion_tokens=3, seed=1, reasoning_effort=None,
                                           verbosity=None, audio=None, prediction=None, web_search_options=None, modalities=["text"],
                                           prompt_cache_retention="24h", extra_body=sea)
    assert unset.choices[0].message.content == chat.choices[0].message.content
    assert client.responses.create(model="sea", input="hello", previous_response_id=None, conversation=None, prompt=None,
                                   context_management=None, max_output_tokens=3, extra_body={"seed": 1, **sea}).output_text
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="sea", messages=hello, reasoning_effort="high")
    assert (unknown.value.code, unknown.value.param) == ("unsupported_parameter", "reasoning_effort")
    assert "does not reason" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as audio:
        client.chat.completions.create(model="sea", messages=hello, modalities=["text", "audio"])
    assert audio.value.param == "modalities"
    with pytest.raises(openai.BadRequestError) as previous:
        client.responses.create(model="sea", input="hello", previous_response_id="resp_1")
    assert previous.value.param == "previous_response_id" and "send the conversation as `input`" in previous.value.message
    with pytest.raises(openai.BadRequestError) as stranger:
        client.chat.completions.create(model="sea", messages=hello, extra_body={"no_such_field": None})
    assert stranger.value.param == "no_such_field"  # a field OpenAI does not have either is refused, even as null
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model="sea", messages=[{"role": "user", "content": "the dog " * 2000}], max_tokens=3)
    assert (long.value.code, long.value.param) == ("context_length_exceeded", "messages")
    with pytest.raises(openai.BadRequestError) as reward:
        client.chat.completions.create(model="sea", messages=hello, max_tokens=3, extra_body={"sea": {"reward": {"terms": {"nope": 1}}}})
    assert reward.value.param == "sea.reward.terms"
    with pytest.raises(openai.BadRequestError) as ids:
        client.completions.create(model="sea", prompt=[1, 2, 3], max_tokens=3)
    assert ids.value.param == "prompt" and "token ids are not supported" in ids.value.message


def test_metrics_count_the_calls(http):
    before = metric_samples(http.get("/metrics").text)
    aligned = http.post("/align", json={"prompt": "hi", "steps": 2, "max_tokens": 3})
    assert aligned.status_code == 200
    assert http.post("/align", json={"prompt": "hi", "chains": 1000}).status_code == 422
    # answered by the body limit before routing (the declared length is over it): still counted under its path
    assert http.post("/align", content=b"x" * 2_000_000, headers={"content-type": "application/json"}).status_code == 413
    assert http.request("PROPFIND", "/align").status_code == 405  # a method no route takes: counted as "other"
    assert http.get("/openapi.json").status_code == 200  # a route outside FastAPI's own: labelled all the same
    assert http.get("/v1/models/no/such/model").status_code == 404  # the template, not the route's `{model:path}`
    after = metric_samples(http.get("/metrics").text)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("sea_requests_total", method="POST", route="/align", status="200") == 1
    assert delta("sea_requests_total", method="POST", route="/align", status="422") == 1
    assert delta("sea_requests_total", method="POST", route="/align", status="413") == 1
    assert delta("sea_requests_total", method="other", route="/align", status="405") == 1
    assert delta("sea_requests_total", method="GET", route="/openapi.json", status="200") == 1
    assert delta("sea_requests_total", method="GET", route="/v1/models/{model}", status="404") == 1
    # durations by status too: fast refusals must not hide how long the answers took
    assert [delta("sea_request_duration_seconds_count", route="/align", status=s) for s in ("200", "422", "413", "405")] == [1] * 4
    assert delta("sea_request_duration_seconds_bucket", route="/align", status="200", le="0.001") == 0
    assert delta("sea_final_reward_count", method="sea") == 1
    assert delta("sea_reward_gain_count", method="sea") == 1
    # the means' sums, as their positive and negative parts (counters never fall; rate() reads a fall as a reset)
    returned = aligned.json()
    reward_sum = delta("sea_final_reward_positive_total", method="sea") - delta("sea_final_reward_negative_total", method="sea")
    assert reward_sum == pytest.approx(returned["reward"], abs=1e-6)
    gain = returned["reward"] - returned["chains"][returned["chosen"]]["initial"]["reward"]
    assert delta("sea_reward_gain_positive_total", method="sea") - delta("sea_reward_gain_negative_total", method="sea") == pytest.approx(gain, abs=1e-6)
    assert delta("sea_jobs_total", outcome="succeeded") == 1
    assert delta("sea_langevin_step_duration_seconds_count") >= 1
    assert delta("sea_completion_tokens_total") > 0 and delta("sea_prompt_tokens_total") > 0
    assert after[("sea_queue_depth", ())] == 0
    assert not [name for name, _ in after if name.endswith("_created")]  # no creation-time series beside each counter
    assert ("sea_model_info", (("device", "cpu"), ("dtype", "float32"), ("model", "tiny-llama"), ("rewards", "principle"))) in after


def test_a_completion_of_several_prompts_runs_each_as_its_own_job(server):
    """OpenAI's completions take a list of prompts (evaluation harnesses send them in batches): it answered 400."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    sea, prompts = {"sea": {"steps": 2, "chains": 3}}, ["the dog", "hello", "the sun"]
    alone = [client.completions.create(model="sea", prompt=prompt, max_tokens=4, n=2, seed=5, extra_body=sea) for prompt in prompts]
    together = client.completions.create(model="sea", prompt=prompts, max_tokens=4, n=2, seed=5, extra_body=sea)
    assert [c.index for c in together.choices] == list(range(6))
    assert [c.text for c in together.choices] == [c.text for one in alone for c in one.choices]
    assert together.usage.prompt_tokens == sum(one.usage.prompt_tokens for one in alone)
    assert together.usage.completion_tokens == sum(one.usage.completion_tokens for one in alone)
    texts = lambda extra: [chain["text"] for chain in extra["chains"]]  # the scores repeat to float32's noise beside batch mates
    assert [texts(extra) for extra in together.model_extra["sea"]] == [texts(one.model_extra["sea"]) for one in alone]
    chunks = list(client.completions.create(model="sea", prompt=prompts, max_tokens=4, n=2, seed=5, stream=True,
                                            stream_options={"include_usage": True}, extra_body=sea))
    streamed = {c.choices[0].index: c.choices[0].text for c in chunks if c.choices}
    assert [streamed[i] for i in range(6)] == [c.text for c in together.choices]
    assert chunks[-1].usage.completion_tokens == together.usage.completion_tokens

    def cancelled() -> float:
        return metric_samples(httpx.get(server.url + "/metrics").text).get(("sea_jobs_total", (("outcome", "cancelled"),)), 0.0)

    before = cancelled()
    with pytest.raises(openai.BadRequestError) as long:  # the first prompt's job was submitted before the second failed
        client.completions.create(model="sea", prompt=["the dog", "the dog " * 3000], max_tokens=4, extra_body=sea)
    assert (long.value.param, long.value.code) == ("prompt.1", "context_length_exceeded")  # which prompt
    wait_for(lambda: cancelled() == before + 1, 30)  # a request's prompts run together or not at all


def test_a_completion_s_prompts_are_checked_together_against_a_key_s_share_the_queue_and_the_log_prob_bound(tmp_path):
    """Each prompt's job counted the earlier ones as the key's requests in flight: two prompts with a share of two (or
    one) answered 429 "retry", forever; the log-prob bound held per prompt, not per request."""
    folder = save_tiny_lm(tiny_lm(), tmp_path / "tiny-llama")
    proc = ServerProcess(str(folder), tmp_path / "server.log", api_keys="k1", max_jobs_per_key=2, max_queue=3, max_batch_chains=4,
                         default_chains=2, max_listed_log_probs=30, default_steps=1, default_max_tokens=4)
    try:
        proc.wait_ready()
        client = openai.OpenAI(base_url=proc.url + "/v1", api_key="k1", max_retries=0)
        two = client.completions.create(model="sea", prompt=["the dog", "hello"], max_tokens=4, seed=1)
        assert len(two.choices) == 2
        for prompts, words in ((["a"] * 3, "one API key may have in flight (2)"), (["a"] * 6, "the batch and the queue hold (5)")):
            with pytest.raises(openai.BadRequestError) as refused:  # never possible: not a 429 to retry
                client.completions.create(model="sea", prompt=prompts, max_tokens=4)
            assert refused.value.param == "prompt" and words in refused.value.message
        assert len(client.completions.create(model="sea", prompt=["the dog"], max_tokens=4, logprobs=5).choices) == 1  # 24 listed
        with pytest.raises(openai.BadRequestError) as listed:  # 48 in all
            client.completions.create(model="sea", prompt=["the dog", "hello"], max_tokens=4, logprobs=5)
        assert listed.value.param == "logprobs"
        one = client.completions.create(model="sea", prompt=["the dog"], max_tokens=4, seed=1)
        assert isinstance(one.model_extra["sea"], list) and len(one.model_extra["sea"]) == 1  # a list of prompts: a list
        assert isinstance(client.completions.create(model="sea", prompt="the dog", max_tokens=4).model_extra["sea"], dict)
    finally:
        assert proc.stop() == 0


def test_the_openai_client_s_histories_stops_and_fields_that_need_others(server):
    """A replayed assistant turn may have no content (OpenAI's tool-call turns); `sea`'s chains are cut at the stops like
    the choices; and `stream_options` needs `stream`."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": None}, {"role": "user", "content": "the dog"}]
    replayed = client.chat.completions.create(model="sea", messages=history, max_tokens=3, extra_body={"sea": {"steps": 1}})
    assert replayed.choices[0].message.content is not None
    refused = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
               {"role": "user", "content": "the dog"}]  # a refusal part, replayed as it came (was 400)
    assert client.chat.completions.create(model="sea", messages=refused, max_tokens=3, extra_body={"sea": {"steps": 1}}).choices
    with pytest.raises(openai.BadRequestError) as no_content:
        client.chat.completions.create(model="sea", messages=[{"role": "user", "content": None}], max_tokens=3)
    assert no_content.value.param == "messages.0.content"

    stopped = client.completions.create(model="sea", prompt="the dog", max_tokens=6, seed=3, stop=" ",
                                        extra_body={"sea": {"steps": 1, "chains": 4}})
    chains = stopped.model_extra["sea"]["chains"]
    assert all(" " not in chain["text"] for chain in chains)
    assert stopped.choices[0].text == chains[stopped.model_extra["sea"]["chosen"]]["text"]

    with pytest.raises(openai.BadRequestError) as options:
        client.chat.completions.create(model="sea", messages=history, max_tokens=3, stream_options={"include_usage": True})
    assert options.value.param == "stream_options"


def test_the_openai_client_s_responses_api(server):
    """`client.responses.create`, the official client's first example, answered 404."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    sea = {"seed": 3, "sea": {"steps": 2, "chains": 2}}
    response = client.responses.create(model="sea", instructions="Be brief.", input="the dog", max_output_tokens=5, extra_body=sea)
    chat = client.chat.completions.create(model="sea", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the dog"}],
                                          max_tokens=5, seed=3, extra_body={"sea": sea["sea"]})
    assert response.output_text == chat.choices[0].message.content and response.output[0].role == "assistant"
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert response.usage.input_tokens == chat.usage.prompt_tokens and response.usage.output_tokens == chat.usage.completion_tokens
    assert response.model_extra["sea"]["seed"] == 3 and response.id.startswith("resp_")
    history = [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": [{"type": "output_text", "text": "a cat"}]},
               {"role": "user", "content": [{"type": "input_text", "text": "and the sun"}]}]
    assert client.responses.create(model="sea", input=history, max_output_tokens=3, extra_body=sea).output_text
    refusal = {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't say."}]}  # replayed as it came (was 400)
    refused = client.responses.create(model="sea", input=[history[0], refusal, history[2]], max_output_tokens=3, extra_body=sea)
    chat_refused = client.chat.completions.create(model="sea", messages=[history[0], refusal, {"role": "user", "content": "and the sun"}],
                                                  max_tokens=3, seed=3, extra_body={"sea": sea["sea"]})
    assert refused.usage.input_tokens == chat_refused.usage.prompt_tokens  # the refusal's words are the turn's text

    events = list(client.responses.create(model="sea", instructions="Be brief.", input="the dog", max_output_tokens=5, stream=True,
                                          extra_body=sea))
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
                                        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
                                        "response.output_item.done", f"response.{response.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[4].delta == response.output_text and events[-1].response.output_text == response.output_text
    with client.responses.stream(model="sea", instructions="Be brief.", input="the dog", max_output_tokens=5, extra_body=sea) as stream:
        *_, last = stream  # the client's own accumulation of the events
    assert last.response.output_text == response.output_text

    listed = client.responses.create(model="sea", input="the dog", max_output_tokens=5, include=["message.output_text.logprobs"],
                                     top_logprobs=2, extra_body=sea).output[0].content[0].logprobs
    assert listed and all(len(token.top_logprobs) == 2 and token.bytes for token in listed)
    assert client.responses.create(model="sea", input="the dog", max_output_tokens=3, background=False, reasoning=None,
                                   text={"format": {"type": "text"}, "verbosity": None}, extra_body=sea).output_text  # neutral values
    with pytest.raises(openai.BadRequestError) as verbose:  # as chat's `verbosity`: the answer's length is max_output_tokens
        client.responses.create(model="sea", input="the dog", text={"verbosity": "low"})
    assert verbose.value.body["param"] == "text.verbosity"
    for refused, value in (("previous_response_id", "resp_x"), ("tools", [{"type": "web_search"}]), ("text", {"format": {"type": "json_object"}}),
                           ("max_output_tokens", 10_000), ("background", True), ("reasoning", {"effort": "high"})):
        with pytest.raises(openai.BadRequestError) as bad:
            client.responses.create(model="sea", input="the dog", **{refused: value})
        assert bad.value.body["param"] == refused
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-5", input="the dog")
    defaults = client.responses.create(model="sea", input="the dog", extra_body=sea)  # echoes the settings it ran with
    assert (defaults.max_output_tokens, defaults.temperature, defaults.top_p) == (6, 1.0, 1.0)  # the server's default_max_tokens
    assert (defaults.completed_at is not None) == (defaults.status == "completed")
    with pytest.raises(openai.BadRequestError) as tool_output:  # was "input.0.role: Field required"
        client.responses.create(model="sea", input=[{"type": "function_call_output", "call_id": "c", "output": "4"}])
    assert tool_output.value.body["param"] == "input.0" and "`function_call_output` are not supported" in tool_output.value.message
    for stored in (lambda: client.responses.retrieve(response.id), lambda: client.responses.delete(response.id),
                   lambda: client.chat.completions.retrieve("chatcmpl-1"), lambda: client.chat.completions.list()):  # list: was 405
        with pytest.raises(openai.NotFoundError) as missing:
            stored()
        assert missing.value.code == "not_found" and "stores no responses" in missing.value.message


def _sse_data(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def test_every_v1_answer_validates_as_the_official_client_s_types(http):
    """The openai client builds its objects without validating them, so a required field left out or a value outside
    one of its Literals reaches typed code as a missing attribute or a stray string (a response's usage lacked
    `input_tokens_details.cache_write_tokens`): every answer and stream event of each endpoint, with log-probs and
    usage, validates against the client's own types."""
    from openai.types import Completion, Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    sea, hello = {"sea": {"steps": 2, "chains": 2}, "seed": 1, "max_tokens": 4}, [{"role": "user", "content": "hello"}]
    for model in http.get("/v1/models").json()["data"]:
        Model.model_validate(model)
    chat = {"model": "sea", "messages": hello, "logprobs": True, "top_logprobs": 2, "n": 2, **sea}
    ChatCompletion.model_validate(http.post("/v1/chat/completions", json=chat).json())
    streamed = http.post("/v1/chat/completions", json={**chat, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [ChatCompletionChunk.model_validate(chunk) for chunk in _sse_data(streamed)]
    assert chunks[-1].usage is not None
    completion = {"model": "sea", "prompt": ["the dog", "a cat"], "logprobs": 2, **sea}
    Completion.model_validate(http.post("/v1/completions", json=completion).json())
    for chunk in _sse_data(http.post("/v1/completions", json={**completion, "stream": True, "stream_options": {"include_usage": True}})):
        Completion.model_validate(chunk)
    sea.pop("max_tokens")
    response = {"model": "sea", "input": hello, "max_output_tokens": 4, "include": ["message.output_text.logprobs"], "top_logprobs": 2,
                **sea}
    assert Response.model_validate(http.post("/v1/responses", json=response).json()).usage.input_tokens_details.cache_write_tokens == 0
    events = TypeAdapter(list[ResponseStreamEvent]).validate_python(_sse_data(http.post("/v1/responses", json={**response, "stream": True})))
    assert events[-1].type in ("response.completed", "response.incomplete")


def test_logprobs_are_the_reference_model_s_for_each_returned_token(server):
    """OpenAI's `logprobs` (chat: with `top_logprobs`; completions: an int) were refused: they list each returned
    token's log-prob under the reference model and its most likely tokens, for every choice, streamed or not."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    hello, sea = [{"role": "user", "content": "hello"}], {"sea": {"steps": 2, "chains": 3}}
    chat = client.chat.completions.create(model="sea", messages=hello, max_tokens=5, seed=4, n=2, logprobs=True, top_logprobs=3,
                                          extra_body=sea)
    extra = chat.model_extra["sea"]
    for choice in chat.choices:
        content = choice.logprobs.content
        assert content and all(len(token.top_logprobs) == 3 for token in content)
        for token in content:
            best = [alternative.logprob for alternative in token.top_logprobs]
            assert best == sorted(best, reverse=True) and token.logprob <= best[0] + 1e-5 and token.bytes
    # The chosen chain's log pi_ref sums its tokens' (and the end-of-turn token's, which is not listed)
    listed = sum(token.logprob for token in chat.choices[0].logprobs.content)
    log_prob_ref = extra["chains"][extra["chosen"]]["log_prob_ref"]
    if chat.choices[0].finish_reason == "length":
        assert listed == pytest.approx(log_prob_ref, abs=1e-3)
    else:
        assert listed >= log_prob_ref - 1e-3
    plain = client.chat.completions.create(model="sea", messages=hello, max_tokens=5, seed=4, extra_body=sea)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content

    stream = client.chat.completions.create(model="sea", messages=hello, max_tokens=5, seed=4, n=2, logprobs=True, top_logprobs=3,
                                            stream=True, extra_body=sea)
    streamed = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    assert [s.content for s in streamed] == [choice.logprobs.content for choice in chat.choices]

    completion = client.completions.create(model="sea", prompt="the dog", max_tokens=5, seed=4, logprobs=2, extra_body=sea)
    log_probs = completion.choices[0].logprobs
    assert len(log_probs.tokens) == len(log_probs.token_logprobs) == len(log_probs.top_logprobs) == len(log_probs.text_offset) > 0
    assert log_probs.text_offset[0] == 0 and log_probs.text_offset == sorted(log_probs.text_offset)
    assert all(token in top and 0 < len(top) <= 3 for token, top in zip(log_probs.tokens, log_probs.top_logprobs))  # 2 + the token
    with pytest.raises(openai.BadRequestError) as too_many:
        client.completions.create(model="sea", prompt="the dog", max_tokens=5, logprobs=6, extra_body=sea)
    assert too_many.value.body["param"] == "logprobs"


def test_a_prompt_and_response_past_the_model_s_context_answer_context_length_exceeded(server, http, lm):
    """The tiny model has 256 positions: a prompt under the server's prompt limit ran past them without a word (a
    rotary model reads positions it never saw; one with learned positions fails)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model="sea", messages=[{"role": "user", "content": "the dog " * 120}], max_tokens=6)
    assert (long.value.code, long.value.param) == ("context_length_exceeded", "messages") and "context is 256" in long.value.message
    assert http.post("/align", json={"prompt": "the dog " * 120, "max_tokens": 6}).json()["error"]["param"] == "prompt"
    assert http.post("/align", json={"prompt": "the dog " * 60, "max_tokens": 6, "steps": 1}).status_code == 200

    # the principle's prompt, with the principle first, is the longest sequence a request runs
    runtime = Runtime.from_lm(lm, Settings())
    job = runtime.job([{"role": "user", "content": "the dog"}], SEAConfig(max_tokens=6))
    principle = render_prompt(lm.tokenizer, job.prompt.messages, system=Settings().principle)
    assert runtime.context_check(job) == (len(principle) + 6, 256) and len(principle) > len(job.prompt.ids)


def test_non_finite_scores_reach_v1_clients_as_null(engine, lm):
    """A failed evaluation leaves NaN scores (/align sends null): /v1 answered 500 ("Out of range float values are not
    JSON compliant") and its stream wrote a bare NaN, which is not JSON."""
    nan = float("nan")
    ids = lm.tokenizer("the dog", add_special_tokens=False)["input_ids"]
    chain = ChainResult("the dog", ids, nan, nan, nan, 0, StepStats(nan, nan, nan, 0.0, False))
    result = AlignResult("sea", "the dog", nan, nan, nan, nan, 0, [chain], Usage(3, 2), Timings(total=0.01), "length")
    extra = sea_extra(SimpleNamespace(queue_seconds=0.0), result, [], engine.text)
    json.dumps(extra, allow_nan=False)
    assert extra["reward"] is None and extra["energy_per_token"] is None and extra["chains"][0]["energy"] is None


def test_a_choice_counts_the_tokens_generated_up_to_where_it_stops(engine, lm):
    ids = lm.tokenizer("the dog , the cat", add_special_tokens=False)["input_ids"]
    end = int(engine.stop_ids[0])

    def chain(tokens):
        return ChainResult("", tokens, 0.0, 0.0, 0.0, 0, StepStats(0.0, 0.0, 0.0, 0.0, True))

    text = lm.tokenizer.decode(ids, skip_special_tokens=True)
    # the tokens generated (the end-of-turn token counts), and those that spell the text (for `logprobs`)
    assert _generated(chain(ids + [end, end]), [], engine.text) == (text, len(ids) + 1, "stop", len(ids))
    assert _generated(chain(ids), [], engine.text) == (text, len(ids), "length", len(ids))
    cut = text.find(",")
    assert _generated(chain(ids + [end, end]), [",", "cat"], engine.text) == (text[:cut], 3, "stop", 2)  # "the", "dog", ","


def test_align_lists_every_chain_s_tokens_with_their_log_probs(http):
    """/align and the job API take `logprobs` too: every chain's (or Best-of-N sample's) counted tokens, each with its
    log-prob under the reference, which sum to the chain's log_prob_ref."""
    for body in ({"method": "sea", "chains": 2, "steps": 2}, {"method": "bon", "samples": 3}):
        answer = http.post("/align", json={"prompt": "the dog", "max_tokens": 5, "seed": 3, "logprobs": 2, **body})
        assert answer.status_code == 200, answer.text
        chains = answer.json()["chains"]
        assert len(chains) == (2 if body["method"] == "sea" else 3)
        for chain in chains:
            assert chain["tokens"] and all(len(token["top"]) == 2 and isinstance(token["text"], str) for token in chain["tokens"])
            assert sum(token["log_prob"] for token in chain["tokens"]) == pytest.approx(chain["log_prob_ref"], abs=1e-3)
    plain = http.post("/align", json={"prompt": "the dog", "max_tokens": 5, "seed": 3, "chains": 2, "steps": 2}).json()
    assert all(chain["tokens"] is None for chain in plain["chains"])
    created = http.post("/jobs", json={"prompt": "the dog", "max_tokens": 5, "seed": 3, "chains": 2, "steps": 2, "logprobs": 0})
    job = http.get(created.headers["location"]).json()
    while job["status"] not in ("succeeded", "failed"):
        time.sleep(0.1)
        job = http.get(created.headers["location"]).json()
    assert all(chain["tokens"] and chain["tokens"][0]["top"] == [] for chain in job["result"]["chains"])
    assert http.post("/align", json={"prompt": "the dog", "logprobs": 21}).json()["error"]["param"] == "logprobs"


def test_log_probs_and_stops_count_characters_split_over_tokens_whole():
    """With a byte-level tokenizer an emoji or a CJK character takes several tokens: the listed tokens left out the last
    bytes of such a character before a stop string, the tokens counted for usage stopped inside one, and the text
    offsets counted half a character as one; a special token in a response had bytes the text leaves out."""
    tokenizer = byte_level_tokenizer()
    text_of = TokenText(tokenizer, frozenset())  # no stop token: the stop strings end these

    def chain(text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ChainResult("", ids, 0.0, 0.0, 0.0, 0, StepStats(0.0, 0.0, 0.0, 0.0, True)), ids

    emoji, ids = chain("ab 😀こ end")
    text, generated, finish, spelled = _generated(emoji, ["こ"], text_of)
    assert (text, finish) == ("ab 😀", "stop")
    assert tokenizer.decode(ids[:spelled]) == "ab 😀" and tokenizer.decode(ids[:generated]) == "ab 😀こ"
    entries = [TokenLogProb(token, -1.0, [(token, -1.0)]) for token in ids[:spelled]]
    listed = _chat_log_probs(entries, text_of)["content"]
    assert b"".join(bytes(entry["bytes"]) for entry in listed) == "ab 😀".encode()
    assert any(entry["token"].startswith("bytes:\\x") for entry in listed)  # a token holding part of the emoji
    offsets = _completion_log_probs(entries, text_of)["text_offset"]
    assert offsets[:3] == [0, 1, 2] and set(offsets[3:]) == {3}  # "a", "b", " ", then every byte of the emoji
    # an invalid byte the model wrote (a lone lead byte) is a character of the text: it counts
    ids = tokenizer.convert_tokens_to_ids(["a", "\u00e3", "b", "c"])  # "ã" is byte 0xE3 in the byte-level alphabet
    assert tokenizer.decode(ids) == "a\ufffdbc"
    assert _completion_log_probs([TokenLogProb(token, -1.0, []) for token in ids], text_of)["text_offset"] == [0, 1, 2, 3]
    _, ids = chain("ab<|endoftext|>cd")
    listed = _chat_log_probs([TokenLogProb(token, -1.0, []) for token in ids], text_of)["content"]
    assert b"".join(bytes(entry["bytes"]) for entry in listed) == b"abcd" and "<|endoftext|>" in [e["token"] for e in listed]


def test_every_series_the_dashboard_and_the_autoscaler_query_is_served(http):
    assert http.post("/align", json={"prompt": "hi", "steps": 1, "max_tokens": 3}).status_code == 200
    text = http.get("/metrics").text
    served = {name for name, _ in metric_samples(text)} | {family.name for family in text_string_to_metric_families(text)}
    root = Path(__file__).parents[1]
    queried = set()
    for path in [*root.glob("docker/grafana/**/*.json"), *root.glob("deploy/**/*.yaml")]:
        queried |= set(re.findall(r"\bsea_[a-z_]+", path.read_text()))
    queried -= {"sea_shared_queue_depth"}  # registered by the shared Redis store (tests/test_shared_store.py)
    assert queried and queried <= served, sorted(queried - served)
