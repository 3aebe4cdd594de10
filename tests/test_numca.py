"""numca.py: milestones, the run-long table, segment advantages, the token mapping, end to end."""

import pytest
import torch

from conftest import run_tiny
from numca import (NumcaTable, grpo_advantages, number_milestones, segment_advantages, token_char_ends,
                   token_segment_index)

S = frozenset


def test_milestones_integers():
    text = "First 12 then 7 then 19"
    assert number_milestones(text, min_gap=0) == [(6, S({"12"})), (14, S({"12", "7"}))]


def test_milestones_no_numbers_and_only_the_answer():
    assert number_milestones("no numbers here", min_gap=0) == []
    assert number_milestones("The answer is \\boxed{42}.", min_gap=0) == []


def test_milestones_repeated_number_keeps_the_state():
    assert number_milestones("3 and 3 and 5 and 9", min_gap=0) == [(0, S({"3"})), (12, S({"3", "5"}))]


def test_milestones_decimals_and_commas():
    text = "x = 3.5 then 2.25 so \\boxed{5.75}"
    assert number_milestones(text, min_gap=0) == [(4, S({"3.5"})), (13, S({"3.5", "2.25"}))]
    text = "We have 1,234 apples and 66 more: \\boxed{1,300}"
    assert number_milestones(text, min_gap=0) == [(8, S({"1234"})), (25, S({"1234", "66"}))]


def test_milestones_answer_in_boxed_is_dropped_even_when_seen():
    text = "2 + 3 = 5 so \\boxed{5}"
    assert number_milestones(text, min_gap=0) == [(0, S({"2"})), (4, S({"2", "3"})), (8, S({"2", "3", "5"}))]


def test_milestones_merge_with_a_gap():
    # numbers start at 0, 30 and 60 (then the answer): 30 and 60 are closer than 50, so 30 moves to 60 and
    # the two merge into one milestone with the later state; 0 and 60 are 60 apart and stay apart.
    text = "1" + " " * 29 + "2" + " " * 29 + "3" + " " * 9 + "answer 6"
    assert [m.start() for m in __import__("re").finditer(r"\d", text)] == [0, 30, 60, 77]
    assert number_milestones(text, min_gap=50) == [(0, S({"1"})), (60, S({"1", "2", "3"}))]
    assert number_milestones(text, min_gap=0) == [(0, S({"1"})), (30, S({"1", "2"})), (60, S({"1", "2", "3"}))]


def test_table_values_after_known_updates():
    t = NumcaTable()
    t.update("p", [S(), S({"1"}), S({"1", "2"})], 1.0)
    t.update("p", [S(), S({"1"})], 0.0)
    t.update("p", [S(), S({"3"})], 1.0)
    t.update("q", [S()], 0.0)
    assert t.value("p", S()) == pytest.approx(2 / 3)
    assert t.value("p", S({"1"})) == 0.5
    assert t.value("p", S({"1", "2"})) == 1.0
    assert t.value("q", S()) == 0.0 and t.value("p", S({"9"})) == 0.0
    assert t.count("p", S({"1"})) == 2 and t.size == 5


def test_table_cap_forgets_the_oldest_prompts():
    t = NumcaTable(max_states=3)
    t.update("a", [S(), S({"1"})], 1.0)
    t.update("b", [S(), S({"2"})], 1.0)  # 4 states > 3: "a" goes
    assert t.size == 2 and "a" not in t.tables and t.value("b", S({"2"})) == 1.0


def test_segment_advantages():
    assert segment_advantages([0.5, 0.25, 1.0], 1.0, lam=1.0) == [0.5, 0.75, 0.0]
    # lam = 0.5: deltas -0.25, 0.75, 0.0 -> A2 = 0, A1 = 0.75, A0 = -0.25 + 0.375
    assert segment_advantages([0.5, 0.25, 1.0], 1.0, lam=0.5) == pytest.approx([0.125, 0.75, 0.0])


def test_group_with_no_shared_state_gives_zero_advantage_after_the_first_milestone(tokenizer):
    texts = ["We add 11 and 22 to get \\boxed{33}", "We add 44 and 55 to get \\boxed{99}",
             "Then 66 and 77 give \\boxed{143}"]
    rewards = [1.0, 0.0, 1.0]
    table = NumcaTable()
    paths = []
    for text, r in zip(texts, rewards):
        ms = number_milestones(text, min_gap=0)
        paths.append((ms, [S()] + [s for _, s in ms]))
        table.update("p", paths[-1][1], r)
    for text, r, (ms, path) in zip(texts, rewards, paths):
        seg_adv = segment_advantages([table.value("p", s) for s in path], r)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        segment = token_segment_index(token_char_ends(tokenizer, ids), [p for p, _ in ms])
        adv = [seg_adv[j] for j in segment]
        first = segment.index(1)
        assert all(a == pytest.approx(r - 2 / 3) for a in adv[:first])  # V(empty) is the group mean
        assert all(a == 0.0 for a in adv[first:])  # each later state's value is this rollout's own reward


def test_token_segment_index():
    # tokens "ab" "c1" "2d": ends 2, 4, 6; a milestone at character 3 (the "1"): the token starting at 2
    # holds it and stays in segment 0; the next token starts after it and is in segment 1.
    assert token_segment_index([2, 4, 6], [3]) == [0, 0, 1]
    # a token starting exactly at the milestone character holds it too: still segment 0
    assert token_segment_index([3, 4, 6], [3]) == [0, 0, 1]
    assert token_segment_index([1, 2], []) == [0, 0]


def test_grpo_advantages():
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(adv[1], torch.zeros(4))


TINY = ["--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2",
        "--minibatch-size", "2", "--micro-batch-size", "1", "--num-eval-problems", "4", "--max-new-tokens", "16",
        "--eval-every", "1"]


@pytest.mark.parametrize("flags", [[], ["--no-numca"]])
def test_numca_end_to_end(tmp_path, flags):
    _, records = run_tiny("numca.py", tmp_path, *TINY, *flags)
    train = [r for r in records if "losses/policy_loss" in r]
    assert len(train) == 2 and ("numca/table_size" in train[0]) == (not flags)
