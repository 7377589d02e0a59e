"""Every Prometheus metric of the service, in one registry. Names carry the ``sea_`` prefix and a unit suffix."""

from __future__ import annotations

import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, disable_created_metrics

from app.engine.types import AlignResult
from app.service.jobs import ErrorKind

# From 1 ms: probes, scrapes and queue waits (the batching window is 10 ms) take a few ms; an /align up to minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)  # 32 chains take ~18 s a step on 2 CPU cores
# -0.01: a bucket that ends just below 0, so that gains of exactly 0 (Best-of-N, a chain never improved) read as 0 in
# histogram_quantile, not as a value interpolated across (-0.5, 0].
REWARD_BUCKETS = (-50, -20, -10, -5, -2, -1, -0.5, -0.01, 0, 0.25, 0.5, 0.75, 1, 2, 5, 10, 20, 50, 100)  # a keyword reward reaches 50
CHAIN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Every way a request ends on a replica: succeeded, or the error kind its job ends with (`requeued`: with a shared store)
JOB_OUTCOMES = ("succeeded", *(kind.value for kind in ErrorKind), "requeued")


class Metrics:
    def __init__(self) -> None:
        # No `<name>_created` series beside every counter and histogram: one more series each that dashboards never read.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sea_requests_total", "HTTP requests by method, route (path template) and status code.", ["method", "route", "status"],
                                registry=r)
        # By status too: a burst of fast 429s or 422s must not make the latency of the answers that ran look better.
        self.request_seconds = Histogram("sea_request_duration_seconds", "HTTP request duration by route (path template) and status code.",
                                         ["route", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("sea_queue_wait_seconds", "Time a request waited before the engine took it, or until it left the "
                                    "queue (cancelled, timed out).", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("sea_queue_depth", "Requests waiting for the engine.", registry=r)
        self.jobs_running = Gauge("sea_jobs_running", "Requests in the running batch or drawing their start to join it.", registry=r)
        self.chains_in_flight = Gauge("sea_chains_in_flight", "Chains in the running batch or drawing their start to join it.", registry=r)
        self.step_seconds = Histogram("sea_langevin_step_duration_seconds", "Duration of one batched engine step.", buckets=STEP_BUCKETS, registry=r)
        self.batch_chains = Histogram("sea_batch_chains", "Chains per engine step.", buckets=CHAIN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("sea_prompt_tokens_total", "Prompt tokens of finished requests.", registry=r)
        self.completion_tokens = Counter("sea_completion_tokens_total", "Completion tokens of finished requests.", registry=r)
        self.final_reward = Histogram("sea_final_reward", "Reward of the returned response.", ["method"], buckets=REWARD_BUCKETS, registry=r)
        self.reward_gain = Histogram("sea_reward_gain", "Returned chain's reward minus its initial sample's.", ["method"], buckets=REWARD_BUCKETS, registry=r)
        # The histograms above give quantiles but no `_sum` (prometheus_client leaves it out when a bucket is below 0,
        # since rate() reads a falling sum as a counter reset). The means come from each sum's positive and negative
        # parts, two counters: (rate(positive) - rate(negative)) / rate(<histogram>_count).
        self.final_reward_positive = Counter("sea_final_reward_positive_total", "Sum of the positive rewards of returned responses.",
                                             ["method"], registry=r)
        self.final_reward_negative = Counter("sea_final_reward_negative_total",
                                             "Sum of the negative rewards of returned responses, as a positive number.", ["method"], registry=r)
        self.reward_gain_positive = Counter("sea_reward_gain_positive_total", "Sum of the positive reward gains.", ["method"], registry=r)
        self.reward_gain_negative = Counter("sea_reward_gain_negative_total", "Sum of the negative reward gains, as a positive number.",
                                            ["method"], registry=r)
        self.jobs = Counter("sea_jobs_total", "Requests ended on this replica, by outcome: succeeded, or the error kind (cancelled, "
                            "timeout, engine, overloaded, shutdown, lost; requeued: handed back to the shared queue).", ["outcome"], registry=r)
        for outcome in JOB_OUTCOMES:  # at 0 from the start: increase() cannot see the first count of a series it never saw
            self.jobs.labels(outcome)
        self.model_info = Info("sea_model", "The served models.", registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, open files (Linux)

    def add_shared_queue_depth(self) -> Gauge:
        """The shared Redis queue's depth (a shared store sets it): registered only with a shared store, so that a
        dashboard or autoscaler query can tell the modes apart."""
        self.shared_queue_depth = Gauge("sea_shared_queue_depth",
                                        "Jobs waiting in the shared Redis queue (every replica reports the same value).", registry=self.registry)
        return self.shared_queue_depth

    def observe_result(self, result: AlignResult) -> None:
        self.prompt_tokens.inc(result.usage.prompt_tokens)
        self.completion_tokens.inc(result.usage.completion_tokens)
        gain = result.reward - result.chains[result.chosen].initial.reward
        self.final_reward.labels(result.method).observe(result.reward)
        self.reward_gain.labels(result.method).observe(gain)
        _add_signed(self.final_reward_positive, self.final_reward_negative, result.method, result.reward)
        _add_signed(self.reward_gain_positive, self.reward_gain_negative, result.method, gain)

    def observe_left_queue(self, job) -> None:
        """The queue wait of a job that leaves the queue without reaching the engine (cancelled, timed out, or failed at
        shutdown): the longest waits, which the engine's own observation never sees."""
        self.queue_wait.observe(time.monotonic() - job.enqueued)

    def count_job_end(self, job, outcome: str | None = None) -> None:
        """Count a job's ending by ``outcome``, by default its own: ``succeeded``, or its error kind."""
        self.jobs.labels(outcome or job.error_kind or job.status.value).inc()


def _add_signed(positive: Counter, negative: Counter, method: str, value: float) -> None:
    # Both series exist from the first value on: PromQL's `a - b` has no result where either is missing.
    above, below = positive.labels(method), negative.labels(method)
    if math.isfinite(value):
        (above if value >= 0 else below).inc(abs(value))
