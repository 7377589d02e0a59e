"""``sea eval``: every method on every prompt of a JSONL file, at equal compute, with the same seeds.

Compute is counted in forward token-passes with a backward pass weighted 2× (``Usage.compute``);
``--budget-samples N`` is the compute Best-of-N spends on N base samples (drawing and exactly
scoring each), the unit a Best-of-N user thinks in. Wall time is reported beside it.
"""
