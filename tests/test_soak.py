"""A bounded soak: 200 requests from 32 concurrent clients against a small queue on 127.0.0.1.

Random tiny requests (/align, the job API, the OpenAI endpoints, streaming or not), random cancellations (DELETE of
jobs), deadlines (`timeout`) and disconnects (client-side timeouts). Every request must end in success, 429, 504 or
the cancellation or disconnect it asked for; afterwards nothing is queued or running, and the server's resident
memory has not grown across rounds beyond a tolerance. The figures are printed (docs/reliability.md quotes a run):
``.venv/bin/python -m pytest tests/test_soak.py -s``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import random
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server import serve_tiny
from tests.test_reliability import gauges, idle, wait_for

ROUNDS = 4
PER_ROUND = 50  # 200 requests in all
CLIENTS = 32
MAX_QUEUE = 4
RETRIES = 2  # after a 429 a client waits min(Retry-After, 1 s) and tries again, twice at most
RSS_TOLERANCE_MB = 40.0  # growth allowed between the first round (warm) and the last
SETTINGS = {"max_queue": MAX_QUEUE, "max_batch_chains": 16, "max_chains": 8, "max_steps": 2000, "max_tokens_limit": 64, "max_samples": 8,
            "default_steps": 2, "default_max_tokens": 4, "default_chains": 2, "request_timeout_seconds": 120, "job_ttl_seconds": 600}


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS, kB), in MB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def statuses_served(url: str) -> collections.Counter:
    """HTTP responses so far by status code, from the server's own sea_requests_total."""
    counts: collections.Counter = collections.Counter()
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "sea_requests_total" and sample.labels["route"] != "/metrics":
                counts[sample.labels["status"]] += int(sample.value)
    return counts


def sea_params(rng: random.Random) -> dict:
    method = rng.choice(["sea", "sea", "sea", "bon", "sample"])
    params = {"method": method, "max_tokens": rng.randint(1, 8), "steps": rng.randint(0, 6), "seed": rng.randint(0, 10**6)}
    params["chains" if method == "sea" else "samples"] = rng.randint(1, 4)
    return params


LONG = {"chains": 8, "max_tokens": 64, "steps": 2000}  # over ten seconds: only ever cancelled, timed out or abandoned


def post(client: httpx.Client, rng: random.Random, path: str, body: dict, **kwargs) -> httpx.Response:
    """POST, retrying a 429 after its Retry-After (capped so that the soak stays short)."""
    for _ in range(RETRIES):
        response = client.post(path, json=body, **kwargs)
        if response.status_code != 429:
            return response
        time.sleep(min(int(response.headers["retry-after"]), 1.0) * rng.uniform(0.5, 1.0))
    return client.post(path, json=body, **kwargs)


def one_request(url: str, index: int, seed: int) -> tuple[str, str, str | None]:
    """Run one random scenario; returns (scenario, outcome, job id or None)."""
    rng = random.Random(seed * 1000 + index)
    scenario = rng.choices(["align", "chat", "chat-stream", "job", "job-cancel", "deadline", "disconnect"],
                           weights=[6, 3, 2, 3, 3, 1, 2])[0]
    prompt = rng.choice(["tell me about the sun", "a dog in the park", "write about tea", "hi"])
    with httpx.Client(base_url=url, timeout=60) as client:
        if scenario == "align":
            response = post(client, rng, "/align", {"prompt": prompt, **sea_params(rng)})
            return scenario, str(response.status_code), None
        if scenario in ("chat", "chat-stream"):
            body = {"model": "sea", "messages": [{"role": "user", "content": prompt}], "max_tokens": rng.randint(1, 8),
                    "stream": scenario == "chat-stream", "sea": {"steps": rng.randint(0, 4), "chains": rng.randint(1, 3)}}
            response = post(client, rng, "/v1/chat/completions", body)
            if response.status_code == 200 and body["stream"]:
                assert response.text.endswith("data: [DONE]\n\n") and '"error"' not in response.text, response.text
            return scenario, str(response.status_code), None
        if scenario == "deadline":
            response = post(client, rng, "/align", {"prompt": prompt, **LONG, "timeout": 1})
            return scenario, str(response.status_code), None
        if scenario == "disconnect":
            try:
                response = post(client, rng, "/align", {"prompt": prompt, **LONG}, timeout=rng.uniform(0.2, 1.0))
            except httpx.ReadTimeout:
                return scenario, "disconnected", None
            return scenario, str(response.status_code), None
        # The job API: run to the end, or cancel after a while.
        body = {"prompt": prompt, **(LONG if scenario == "job-cancel" and rng.random() < 0.5 else sea_params(rng))}
        created = post(client, rng, "/jobs", body)
        if created.status_code != 202:
            return scenario, str(created.status_code), None
        job = created.json()["id"]
        if scenario == "job-cancel":
            time.sleep(rng.uniform(0, 0.5))
            status = client.delete(f"/jobs/{job}").json()["status"]
            if status == "running":  # DELETE waits 5 s for the next step boundary; a loaded machine may take longer
                status = wait_for(lambda: (s := client.get(f"/jobs/{job}").json()["status"]) != "running" and s, 60)
        else:
            status = wait_for(lambda: (s := client.get(f"/jobs/{job}").json()["status"]) not in ("queued", "running") and s, 60)
        return scenario, status, job


# What each scenario may end in: success, 429, 504, or the cancellation or disconnect it asked for.
ALLOWED = {
    "align": {"200", "429"},
    "chat": {"200", "429"},
    "chat-stream": {"200", "429"},
    "job": {"succeeded", "429"},
    "job-cancel": {"cancelled", "succeeded", "429"},  # a short job may finish before its DELETE
    "deadline": {"504", "429"},
    "disconnect": {"disconnected", "429"},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve_tiny(tmp_path_factory, **SETTINGS)


def test_soak_overload_cancellations_and_disconnects(server):
    started = time.monotonic()
    outcomes: collections.Counter = collections.Counter()
    jobs: list[str] = []
    served_before = statuses_served(server.url)
    rss = [rss_mb(server.process.pid)]
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        for round_ in range(ROUNDS):
            results = list(pool.map(one_request, [server.url] * PER_ROUND, range(PER_ROUND), [round_] * PER_ROUND))
            for scenario, outcome, job in results:
                outcomes[(scenario, outcome)] += 1
                assert outcome in ALLOWED[scenario], (scenario, outcome)
                if job:
                    jobs.append(job)
            wait_for(lambda: idle(server.url), 30)  # abandoned and cancelled chains leave the batch
            rss.append(rss_mb(server.process.pid))
    elapsed = time.monotonic() - started

    final = gauges(server.url)
    assert final["sea_queue_depth"] == 0 and final["sea_jobs_running"] == 0 and final["sea_chains_in_flight"] == 0
    with httpx.Client(base_url=server.url, timeout=30) as client:
        statuses = collections.Counter(client.get(f"/jobs/{job}").json()["status"] for job in jobs)
        assert client.get("/ready").status_code == 200
    assert not statuses.keys() & {"queued", "running"}, statuses

    served = statuses_served(server.url) - served_before
    growth = rss[-1] - rss[1]
    summary = {
        "requests": ROUNDS * PER_ROUND, "concurrency": CLIENTS, "max_queue": MAX_QUEUE, "seconds": round(elapsed, 1),
        "outcomes": {f"{scenario} {outcome}": n for (scenario, outcome), n in sorted(outcomes.items())},
        "http_responses_by_status": dict(sorted(served.items())), "jobs_final": dict(statuses), "rss_mb_before_and_after_each_round": [round(x, 1) for x in rss],
        "rss_growth_mb_after_warmup": round(growth, 1),
    }
    print("\nSOAK " + json.dumps(summary, indent=1))
    assert served["429"] > 0, "the queue never filled: not an overload test"
    assert not {status for status in served if status.startswith("5") and status != "504"}, served
    assert growth < RSS_TOLERANCE_MB, summary
