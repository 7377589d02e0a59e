"""Discrete proposals: ranking by the straight-through gradient, move semantics."""

from __future__ import annotations

import math

import pytest
import torch

from app.engine.host import to_host
from app.engine.proposals import Move, apply, edit_scores, propose, propose_chains


def test_the_edit_the_gradient_favours_comes_first():
    grad = torch.zeros(4, 10)
    grad[2, 7] = -5.0  # putting token 7 at position 2 lowers the energy by ~5
    tokens = torch.tensor([1, 2, 3, 4])
    scores = edit_scores(grad, None, tokens)
    moves = propose(scores, tokens, counted=4, budget=4, temperature=0.0, generator=torch.Generator().manual_seed(0), tried=set())
    assert moves[0] == Move("swap", 2, (7,), -5.0)
    assert len(moves) == 4 and len(set(moves)) == 4
    assert {m.kind for m in moves} == {"swap", "pair", "insert"}


def test_tried_moves_are_not_proposed_again_and_only_counted_positions_move():
    grad = torch.randn(6, 12, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([1, 2, 3, 4, 5, 6])
    scores = edit_scores(grad, None, tokens)
    first = propose(scores, tokens, counted=3, budget=6, temperature=0.0, generator=torch.Generator(), tried=set())
    second = propose(scores, tokens, counted=3, budget=6, temperature=0.0, generator=torch.Generator(), tried=set(first))
    assert not set(first) & set(second)
    assert all(m.position < 3 for m in first + second)


def test_gradient_free_scores_use_the_reference_log_probs():
    table = torch.log_softmax(torch.randn(3, 5, generator=torch.Generator().manual_seed(2)), -1)
    tokens = torch.tensor([0, 1, 2])
    scores = edit_scores(None, table, tokens)
    assert torch.allclose(scores[1, 4], -(table[1, 4] - table[1, 1]))
    assert torch.all(scores.gather(-1, tokens[:, None]) == 0)


def test_move_application():
    tokens = [10, 11, 12, 13]
    assert apply(tokens, Move("swap", 1, (99,), 0.0)) == [10, 99, 12, 13]
    assert apply(tokens, Move("pair", 2, (98, 99), 0.0)) == [10, 11, 98, 99]
    assert apply(tokens, Move("pair", 3, (98, 99), 0.0)) == [10, 11, 12, 98]
    assert apply(tokens, Move("insert", 1, (99,), 0.0)) == [10, 99, 11, 12]
    assert apply(tokens, Move("insert", 1, (98, 99), 0.0)) == [10, 98, 99, 11]
    assert apply(tokens, Move("insert", 3, (97, 98, 99), 0.0)) == [10, 11, 12, 97]
    assert apply(tokens, Move("phrase", 1, (97, 98, 99), 0.0)) == [10, 97, 98, 99]
    assert apply(tokens, Move("phrase", 3, (97, 98, 99), 0.0)) == [10, 11, 12, 97]
    assert tokens == [10, 11, 12, 13]


def test_to_host_reads_tensors_of_every_kind_in_one_copy():
    floats = torch.tensor([[1.5, -math.inf], [math.nan, 0.25]])
    ids = torch.tensor([[49151, 0, 7]])
    empty = torch.zeros(0, 3)
    got_floats, got_ids, got_empty = to_host(floats, ids, empty)
    assert got_floats[0] == [1.5, -math.inf] and math.isnan(got_floats[1][0]) and got_floats[1][1] == 0.25
    assert got_ids == [[49151, 0, 7]] and all(type(v) is int for v in got_ids[0])
    assert got_empty == [] and to_host() == []
    assert to_host(torch.tensor([True, False])) == [[1, 0]]
    with pytest.raises(TypeError, match="float64"):
        to_host(torch.tensor([0.1], dtype=torch.float64))


def test_chains_proposed_together_get_the_moves_each_gets_alone():
    generator = torch.Generator().manual_seed(3)
    grad = torch.randn(3, 6, 12, generator=generator)
    tokens = torch.randint(0, 12, (3, 6), generator=generator)
    counted = [6, 2, 4]
    first = propose(edit_scores(grad[0], None, tokens[0]), tokens[0], counted[0], 6, 0.0, torch.Generator(), set())
    tried = [set(first[:2]), set(), set()]  # a chain's rejected moves stay its own
    alone = [propose(edit_scores(grad[c], None, tokens[c]), tokens[c], counted[c], 6, 0.0, torch.Generator(), tried[c])
             for c in range(3)]
    together = propose_chains(edit_scores(grad, None, tokens), tokens, counted, 6, 0.0, torch.Generator(), tried)
    assert together == alone and not set(together[0]) & tried[0]
    assert all(m.position < counted[c] for c in range(3) for m in together[c])
    assert all(m.position + 1 < counted[c] for c in range(3) for m in together[c] if m.kind == "pair")


def test_the_first_swap_follows_the_softmax_of_the_scores_at_the_noise_temperature():
    # Gumbel-max: with noise at temperature T, the best noisy swap is swap (t, v) with probability ∝ exp(−score/T).
    grad = torch.tensor([[0.0, 0.3, -0.2, 0.5], [0.1, 0.0, -0.4, 0.2]])
    tokens = torch.tensor([0, 1])
    scores = edit_scores(grad, None, tokens)
    temperature, draws = 0.25, 40_000
    moves = propose_chains(scores.expand(draws, 2, 4), tokens.expand(draws, 2), [2] * draws, 1, temperature,
                           torch.Generator().manual_seed(0), [set() for _ in range(draws)])
    counts = torch.zeros(2, 4)
    for (move,) in moves:
        assert move.kind == "swap" and move.tokens[0] != int(tokens[move.position])  # never a "change" to the same token
        counts[move.position, move.tokens[0]] += 1
    expected = torch.softmax((-scores / temperature).scatter(-1, tokens[:, None], -torch.inf).flatten(), 0).view(2, 4)
    assert torch.allclose(counts / draws, expected, atol=0.01)


def test_a_missing_phrase_is_written_whole_where_its_tokens_are_estimated_to_cost_least():
    """Chain 0 lacks both words: each is offered (written over, and inserted) at the start with the lowest summed
    estimate of its tokens, over its spellings, best first; chain 1 already holds (5, 6) and only counts 3 positions."""
    scores = torch.zeros(2, 5, 10)
    scores[:, 2, 5] = scores[:, 3, 6] = -4.0  # (5, 6) is cheapest at position 2
    scores[:, 0, 7] = -1.0  # the spelling (7, 8, 9) is cheapest at 0, (8, 9) at 3 (estimate 0): the first wins
    tokens = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 1, 2, 3]])
    moves = propose_chains(scores, tokens, [5, 3], 8, 0.0, torch.Generator(), [set(), set()], phrases=[[(5, 6)], [(8, 9), (7, 8, 9)]])
    phrased = [m for m in moves[0] if len(m.tokens) > 1 and m.kind != "pair"]
    assert phrased[:2] == [Move("phrase", 2, (5, 6), -8.0), Move("insert", 2, (5, 6), -8.0)]
    held = [m for m in moves[1] if len(m.tokens) > 1 and m.kind != "pair"]
    assert all(m.tokens == (7, 8, 9) and m.position == 0 for m in held)  # (5, 6) is there; (7, 8, 9) fits only at 0
    plain = propose_chains(scores, tokens, [5, 3], 8, 0.0, torch.Generator(), [set(), set()])
    assert all(m.kind in ("swap", "pair", "insert") and (len(m.tokens) == 1 or m.kind == "pair") for chain in plain for m in chain)


def test_edit_memories_are_as_long_as_the_rows_they_score():
    """A batch's candidate rows are padded to the longest request that has edits; the memories of the requests whose
    edits reuse a pass must be as long (a longer batch mate without edits, or without memories, made them shorter and
    every request of the batch failed: 'The expanded size of the tensor (7) must match the existing size (5)')."""
    from types import SimpleNamespace

    from app.engine.reuse import edit_starts, reuse_for_edits
    from models.kv import ResponseMemory

    def memory(rows, length):
        return ResponseMemory(torch.zeros(rows, length), [torch.zeros(rows, 2, length - 1, 4)], [torch.zeros(rows, 2, length - 1, 4)])

    short = SimpleNamespace(spec=SimpleNamespace(length=5), memories={"ref": memory(2, 5)}, tokens=torch.zeros(2, 5, dtype=torch.long))
    longer = SimpleNamespace(spec=SimpleNamespace(length=7), memories=None, tokens=torch.zeros(2, 7, dtype=torch.long))
    owners = [(short, 0, Move("swap", 3, (1,), 0.0)), (short, 1, Move("swap", 4, (1,), 0.0)), (longer, 0, Move("swap", 2, (1,), 0.0))]
    starts = edit_starts([short, longer], owners)
    reuse = reuse_for_edits([short, longer], owners, starts, 7)
    assert starts[:2] != [0, 0] and starts[2] == 0  # the short request's edits reuse its pass; the other runs whole
    assert reuse.memories["ref"].log_probs.shape == (3, 7) and reuse.memories["ref"].keys[0].shape == (3, 2, 6, 4)
