"""Where the time of one SEA step goes: reference LM, reward, straight-through parts; with and without the prompt cache.

    .venv/bin/python benchmarks/step_time.py [--model PATH] [--chains 4] [--max-tokens 24] [--repeats 5] [--out bench.json]

Prints a table and writes JSON (a benchmark, never a test: figures depend on the machine and its load).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from app.engine.energy import RowSpec, evaluate
from models.lm import encode_prefix, render_prompt, stop_token_ids
from models.loading import load_lm
from models.rewards import PrincipleReward, Prompt
from models.ste import ResponseBatch

PROMPT = "My neighbour's dog barks all night and I can't sleep. What can I do about it without starting a fight?"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - tick)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="Model (default: the embedded SmolLM2-135M-Instruct).")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_lm(args.model or None)
    messages = [{"role": "user", "content": PROMPT}]
    prompt = Prompt(messages, render_prompt(lm.tokenizer, messages))
    principle = PrincipleReward(lm)
    stop = torch.tensor(stop_token_ids(lm.tokenizer, lm.model))
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1000, 20000, (args.chains, args.max_tokens), generator=generator)
    logits = torch.randn(args.chains, args.max_tokens, vocab, generator=generator)

    def spec(with_reward: bool, prefix=None) -> RowSpec:
        terms = [(principle, 1.0, principle.prepare(prompt))] if with_reward else []
        return RowSpec(prefix or encode_prefix(lm.model, prompt.ids), terms, 1.0, True, True, args.max_tokens, args.chains)

    cached_full, cached_ref = spec(True), spec(False)
    weight = lm.model.get_input_embeddings().weight

    def step_cached():
        evaluate(lm, [cached_full], stop, tokens, logits)

    principled_ids = render_prompt(lm.tokenizer, messages, system=principle.principle)

    def step_uncached():
        """The same energy and gradient with no cache: prompt + response through both LM passes, every step."""
        y = logits.clone().requires_grad_(True)
        probs = torch.softmax(y, -1)
        response = ResponseBatch(tokens=tokens, mask=torch.ones(tokens.shape), probs=probs)
        embeds = response.embed(weight)
        total = 0
        for ids in (prompt.ids, principled_ids):
            prompt_embeds = weight[torch.tensor(ids)].expand(args.chains, -1, -1)
            out = lm.model(inputs_embeds=torch.cat([prompt_embeds, embeds], 1)).logits[:, len(ids) - 1 : -1].float()
            total = total + response.pick(torch.log_softmax(out, -1)).sum()
        total.backward()

    def reference_only():
        evaluate(lm, [cached_ref], stop, tokens, logits)

    def softmax_part():
        y = logits.clone().requires_grad_(True)
        torch.softmax(y, -1).sum().backward()

    def straight_through_backward():
        probs = torch.softmax(logits, -1).requires_grad_(True)
        ResponseBatch(tokens=tokens, mask=torch.ones(tokens.shape), probs=probs).embed(weight).sum().backward()

    def candidates_exact():  # the discrete update's exact scoring of 8 edits per chain (forward only)
        many = tokens.repeat(8, 1)
        with torch.no_grad():
            evaluate(lm, [RowSpec(cached_full.prefix, cached_full.reward_terms, 1.0, True, True, args.max_tokens, many.shape[0])], stop, many)

    figures = {
        "step, prompt cached": timed(step_cached, args.repeats),
        "step, no prompt cache": timed(step_uncached, args.repeats),
        "reference LM forward + backward": timed(reference_only, args.repeats),
        "softmax over L×V, forward + backward": timed(softmax_part, args.repeats),
        "straight-through backward g @ Wᵀ": timed(straight_through_backward, args.repeats),
        "exact scoring of 8 edits per chain (forward)": timed(candidates_exact, args.repeats),
    }
    figures["reward (principle) forward + backward"] = figures["step, prompt cached"] - figures["reference LM forward + backward"]
    print(f"{lm.name}, {args.chains} chains, L = {args.max_tokens}, prompt {len(prompt.ids)} tokens, {torch.get_num_threads()} threads")
    print(f"{'part':<48} {'seconds':>8}")
    for name, seconds in figures.items():
        print(f"{name:<48} {seconds:8.3f}")
    ratio = figures["step, prompt cached"] / figures["step, no prompt cache"]
    print(f"cached / uncached step: {ratio:.2f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"model": lm.name, "chains": args.chains, "max_tokens": args.max_tokens, "threads": torch.get_num_threads(),
                       "seconds": figures, "cached_over_uncached": ratio}, handle, indent=1)


if __name__ == "__main__":
    main()
