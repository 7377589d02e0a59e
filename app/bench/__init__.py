"""``sea bench``: step-time breakdown, FLOP/s against the machine's matmul peak, memory per chain, and
throughput and latency against concurrent requests through the real server. Prints figures and each
target with PASS/MISS, and writes JSON; a benchmark, never a test (figures depend on the machine and its load).

The command: :mod:`app.bench.command`. Parts: :mod:`app.bench.steps` (one step and its parts, FLOP count, matmul peak), :mod:`app.bench.memory`
(peak memory in a fresh process), :mod:`app.bench.serving` (``sea serve`` in a subprocess, concurrent ``/align``).
"""
