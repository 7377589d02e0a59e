"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis), against the real server.

Every operation gets schema-valid and schema-invalid requests (bounded, fixed seed). All of schemathesis's checks
run: no 5xx, every status code and body documented, schema-valid data accepted, schema-invalid data rejected,
requests without the API key rejected (the document declares the bearer scheme). A few hand-written cases pin
down malformed JSON and wrongly typed fields.
"""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode

from app.main import create_app
from app.settings import Settings
from tests.server import serve_tiny
from tests.tiny import WORDS

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Small server limits, written into the document, keep every accepted request to a fraction of a second.
SETTINGS = {"api_keys": KEY, "max_chains": 4, "max_steps": 3, "max_tokens_limit": 6, "max_samples": 16, "max_batch_chains": 8,
            "max_queue": 16, "default_steps": 1, "default_max_tokens": 4, "default_chains": 2, "request_timeout_seconds": 20}
# Bounded for the suite; a deeper hunt: FUZZ_EXAMPLES=300 FUZZ_SEED=7 FUZZ_COVERAGE=1 .venv/bin/python -m pytest tests/test_fuzz.py
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))
SEED = int(os.environ.get("FUZZ_SEED", "1"))
# schemathesis's coverage phase (every boundary and wrong type of every field) sends about 4,000 requests here, five
# minutes of a 2-core machine; the suite's own tests below cover malformed and wrongly typed bodies field by field.
COVERAGE = os.environ.get("FUZZ_COVERAGE", "0") == "1"

# The document the server itself serves (same code, same settings), loaded without a running server at collection.
schema = schemathesis.openapi.from_dict(create_app(Settings(**SETTINGS)).openapi())
schema.config.seed = SEED
schema.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True)
schema.config.phases.update(phases=["examples", "fuzzing", *(["coverage"] if COVERAGE else [])])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    for proc in serve_tiny(tmp_path_factory, **SETTINGS):
        yield proc
    assert "Traceback" not in proc.log_path.read_text()


def _spellable_keywords(case) -> None:
    """Positive cases: keywords from the tiny model's word-level vocabulary.

    A keyword the model cannot spell is refused with 422 by design (tests/test_reliability.py checks it); a real
    byte-level BPE model spells any non-blank word, but the tiny test tokenizer knows only ``WORDS``.
    """
    body = case.body if isinstance(case.body, dict) else None
    if body is None or case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    for holder in (body, body.get("sea")):
        reward = holder.get("reward") if isinstance(holder, dict) else None
        if isinstance(reward, dict) and isinstance(reward.get("keywords"), list):
            reward["keywords"] = [WORDS[len(word) % len(WORDS)] for word in reward["keywords"]]


def _patient(case) -> None:
    """A generated `timeout` of 1 s is valid, and past it the right answer is 504: on a loaded machine even a tiny run
    can take that long. This test checks conformance, not speed, so client deadlines get the server's maximum."""
    body = case.body if isinstance(case.body, dict) else None
    if body is None or case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return  # a negative case must stay invalid
    for holder in (body, body.get("sea")):
        if isinstance(holder, dict) and isinstance(holder.get("timeout"), (int, float)) and not isinstance(holder["timeout"], bool):
            holder["timeout"] = max(holder["timeout"], SETTINGS["request_timeout_seconds"])


@schema.parametrize()
@hypothesis_settings(suppress_health_check=list(HealthCheck), deadline=None)
def test_api_conforms_to_its_openapi_document(case, server):
    _spellable_keywords(case)
    _patient(case)
    case.call_and_validate(base_url=server.url, headers=AUTH, timeout=30)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        yield client


@pytest.mark.parametrize("path, status", [("/align", 422), ("/jobs", 422), ("/v1/completions", 400), ("/v1/chat/completions", 400)])
@pytest.mark.parametrize("body", [b"{not json", b'{"prompt": "hi",}', b"\xff\xfe", b'{"prompt": NaN}'])
def test_malformed_json_is_rejected_with_the_documented_error(http, path, status, body):
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert response.headers["x-request-id"]


@pytest.mark.parametrize("path", ["/align", "/jobs", "/v1/completions"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded; charset=utf-8", None])
def test_a_body_not_sent_as_json_gets_415_naming_its_content_type(http, path, content_type):
    # curl -d without -H sends a form content type, requests.post(data=...) none: the body below is fine JSON, only its
    # label is wrong or missing (without one it was a 422 "Input should be a valid dictionary")
    response = http.post(path, content=b'{"prompt": "hi", "model": "sea"}', headers={"content-type": content_type} if content_type else {})
    assert response.status_code == 415, response.text
    assert f"(got {(content_type or 'none').split(';')[0]})" in response.json()["error"]["message"] and response.headers["x-request-id"]


def test_a_compressed_body_gets_415_naming_its_encoding(http):
    import gzip

    response = http.post("/align", content=gzip.compress(b'{"prompt": "hi"}'), headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert response.status_code == 415, response.text  # was 422 "not valid JSON (UTF-8)"
    assert response.json()["error"]["message"] == "compressed bodies are not accepted (Content-Encoding: gzip)"
    assert http.get("/health", headers={"content-encoding": "gzip"}).status_code == 200  # no body, nothing to refuse


@pytest.mark.parametrize("path, status", [("/align", 422), ("/v1/completions", 400)])
def test_an_empty_body_is_called_empty(http, path, status):
    response = http.post(path, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"] == "the request body is empty; send a JSON object"  # was "Field required"


@pytest.mark.parametrize("body, param", [({"prompt": ""}, "prompt"), ({"prompt": " \n\t"}, "prompt"),
                                         ({"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "  "}]}, "messages")])
def test_a_prompt_without_text_is_refused_naming_the_field(http, body, param):
    response = http.post("/align", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and "text" in error["message"]
    # one message with text is enough (a system turn may be empty)
    assert http.post("/align", json={"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}],
                                     "chains": 1, "steps": 1, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),  # not "should be a valid string"
    ("/v1/completions", {"prompt": ["a"] * 17}, "prompt", "at most 16"),
    ("/v1/completions", {"prompt": ""}, "prompt", "some text"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": [{"type": "text", "text": " "}]}]},
     "messages", "no message contains any text"),
    ("/v1/completions", {"prompt": "hi", "n": 100}, "n", "(server limit)"),  # one limit, whatever the value
    ("/v1/completions", {"prompt": "hi", "n": 2, "sea": {"method": "cbs"}}, "n", "needs method `sea` or `bon`"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2, "sea": {"method": "args"}}, "n", "not `args`"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type", "'text'"),
    ("/v1/completions", {"prompt": "hi", "sea": {"seed": 1}}, "sea.seed", "set `seed` with the OpenAI field"),
    ("/v1/responses", {"input": "hi", "sea": {"max_tokens": 3}}, "sea.max_tokens", "`max_output_tokens` on /v1/responses"),  # said `max_tokens`
    ("/align", {"chains": 2}, "prompt", "exactly one of `prompt` or `messages`"),
    ("/align", {"prompt": "hi", "reward": {"keywords": []}}, "reward.keywords", "at least 1"),
    ("/align", {"prompt": "hi", "reward": {"terms": {}}}, "reward.terms", "at least 1"),  # ran the server's reward
    ("/align", {"prompt": "hi", "reward": {"keywords_only": True}}, "reward", "needs `keywords`"),
    ("/align", {"prompt": "hi", "reward": {"keywords": ["zzzqqq"]}}, "reward.keywords", "can be spelled"),  # was `reward`
    ("/align", {"messages": [{"role": "user", "content": "hi " * 3000}]}, "messages", "the limit is 2048"),  # was `prompt`
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "sea": {"reward": {"keywords": ["zzzqqq"]}}},
     "sea.reward.keywords", "can be spelled"),
])
def test_errors_name_the_field_and_what_is_wrong_with_it(http, path, body, param, words):
    response = http.post(path, json={"model": "sea", **body} if path.startswith("/v1/") else body)
    assert response.status_code == (400 if path.startswith("/v1/") else 422), response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"] and "Value error" not in error["message"], error


def test_json_nested_too_deeply_is_a_malformed_body(http):
    response = http.post("/align", content=b"[" * 5000 + b"]" * 5000, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "json_invalid", response.text


def test_an_integer_past_python_s_digit_limit_is_a_malformed_body(http):
    """JSON has no bound on an integer's digits; Python's parser refuses past 4300, which answered 400 "There was an
    error parsing the body" on /align instead of the documented malformed-body error."""
    for path, status in (("/align", 422), ("/v1/completions", 400)):
        response = http.post(path, content=b'{"model": "sea", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}",
                             headers={"content-type": "application/json"})
        assert response.status_code == status and response.json()["error"]["code"] == "json_invalid", response.text


@pytest.mark.parametrize("field, value", [("steps", "3"), ("steps", 2.5), ("chains", True), ("use_reward", 1), ("alpha", "1.0"),
                                          ("prompt", 5), ("reward", {"terms": {"principle": "1"}}), ("seed", 2**63)])
def test_wrongly_typed_fields_are_rejected_naming_the_field(http, field, value):
    body = {"prompt": "hi", field: value} if field != "prompt" else {"prompt": value}
    response = http.post("/align", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"].split(".")[0] == field
    # The same parameter under /v1 (in the `sea` extra) answers 400, as OpenAI clients expect.
    if field != "prompt":
        openai = http.post("/v1/completions", json={"model": "sea", "prompt": "hi", "sea": {field: value}})
        assert openai.status_code == 400 and openai.json()["error"]["param"].startswith(f"sea.{field}")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 3, "sea": {"max_tokens": 3}}, "sea.max_tokens"),
    ("/v1/completions", {"prompt": "hi", "sea": {"seed": 2}}, "sea.seed"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "sea": {"temperature": 1.0}}, "sea.temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "max_completion_tokens": 3},
     "max_completion_tokens"),
])
def test_no_setting_can_be_given_twice_under_v1(http, path, body, param):
    """/v1 takes max_tokens, seed, temperature and top_p from its own fields only, and one of the two length fields."""
    response = http.post(path, json={"model": "sea", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and ("OpenAI field" in error["message"] or "not both" in error["message"]), error


def test_whole_numbers_are_integers(http):
    """JSON Schema counts 2.0 as an integer, so the server does too."""
    response = http.post("/align", json={"prompt": "hi", "steps": 1.0, "max_tokens": 2.0, "chains": 1})
    assert response.status_code == 200, response.text
    assert response.json()["timings"]["steps"] == 1


def test_the_fuzzed_document_is_the_one_the_server_serves(server):
    assert httpx.get(server.url + "/openapi.json", timeout=30).json() == schema.raw_schema
