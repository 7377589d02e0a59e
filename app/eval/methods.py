"""The methods ``sea eval`` compares: each name's engine settings, and the words the report describes it with."""

from __future__ import annotations

# Method variants: name -> SEAConfig overrides. The `sea-*` rows are the paper's ablations and ours.
VARIANTS: dict[str, dict] = {
    "sample": {"method": "sample"},
    "bon": {"method": "bon", "select": "reward"},
    "bon-energy": {"method": "bon", "select": "energy"},
    "args": {"method": "args", "temperature": 0.0},
    "cbs": {"method": "cbs"},
    "sea": {"method": "sea"},
    "sea-energy": {"method": "sea", "select": "energy"},  # returns its lowest-energy chain, as bon-energy does
    "sea-lm": {"method": "sea", "proposal": "lm"},
    "sea-1chain": {"method": "sea", "chains": 1},
    "sea-noreward": {"method": "sea", "use_reward": False},
    "sea-noref": {"method": "sea", "use_reference": False},
    "sea-nonoise": {"method": "sea", "noise": 0.0},
    "sea-random": {"method": "sea", "init": "random"},
    "sea-base": {"method": "sea", "init": "sample"},  # chains start from base samples, not guided ones
    "sea-energy-base": {"method": "sea", "select": "energy", "init": "sample"},
    "sea-logits": {"method": "sea", "update": "logits", "init": "sample"},  # the paper-literal update, start and all
}


# What each method is, in the report's words.
METHOD_WORDS = {
    "sample": "one sample of the reference model",
    "bon": "Best-of-N: N samples of the reference model (N as the budget buys), the one with the highest reward returned",
    "bon-energy": "Best-of-N: N samples of the reference model (N as the budget buys), the one with the lowest energy returned",
    "args": "ARGS: greedy reward-guided decoding, the top-k tokens (k as the budget buys) rescored by the reward at each position",
    "cbs": "chunk-level beam search: beams of sampled chunks kept by reward",
    "sea-logits": "SEA, the paper's update: Langevin steps over all logits from base samples, the highest-reward chain returned",
}


def describe(name: str) -> str:
    """A method's description for the report."""
    if name in METHOD_WORDS:
        return METHOD_WORDS[name]
    variant = VARIANTS.get(name, {})
    if variant.get("init") == "random":
        start = "chains started from random tokens"
    elif variant.get("init") == "sample" or variant.get("use_reward") is False:
        start = "chains started from the best of several samples of the reference model"
    else:
        start = "chains started from the best of several samples (guided by the reward's per-token terms where it has them)"
    ranked = "the reference model alone (no gradient)" if variant.get("proposal") == "lm" else "the energy's gradient"
    ablation = {"chains": " (one chain)", "use_reward": " (no reward term)", "use_reference": " (no reference term)",
                "noise": " (no noise in the choice of edits)"}
    changed = "".join(words for key, words in ablation.items() if key in variant)
    pick = "lowest energy" if variant.get("select") == "energy" else "highest reward"
    restarts = "" if variant.get("init") == "random" else "; stalled chains restarted from fresh samples"  # none to draw
    return (f"SEA: {start}, then token edits ranked by {ranked}, each kept when the exact energy drops{restarts}{changed}; "
            f"the chain with the {pick} returned")
