"""numca.py: numbers and milestones, the run-long table (and its checkpoint), the token mapping, segment
advantages, the zero-std guard, dynamic sampling, the loss helpers, end to end.
Resuming a killed run, the range checks of every flag: tests/test_trainers.py."""

import math
import random

import pytest
import torch

from common.checkpoint import latest_checkpoint, load_checkpoint
from conftest import run_tiny
from numca import (NumcaTable, group_scale, grpo_advantages, kl_k3, lr_multiplier, merge_milestones,
                   milestone_tokens, number_milestones, number_states, parse_numbers, ppo_policy_loss,
                   segment_advantages, select_prompts, token_char_ends, token_segments)

S = frozenset


def test_milestones_integers():
    text = "First 12 then 7 then 19"
    assert number_milestones(text, min_gap=0) == [(6, S({"12"})), (14, S({"12", "7"}))]


def test_milestones_no_numbers_and_only_the_answer():
    assert number_milestones("no numbers here", min_gap=0) == []
    assert number_milestones("The answer is \\boxed{42}.", min_gap=0) == []
    assert number_states("The answer is \\boxed{42}.") == [S()]


def test_milestones_repeated_number_keeps_the_state():
    assert number_milestones("3 and 3 and 5 and 9", min_gap=0) == [(0, S({"3"})), (12, S({"3", "5"}))]


def test_milestones_decimals_and_commas():
    text = "x = 3.5 then 2.25 so \\boxed{5.75}"
    assert number_milestones(text, min_gap=0) == [(4, S({"3.5"})), (13, S({"3.5", "2.25"}))]
    text = "We have 1,234 apples and 66 more: \\boxed{1,300}"
    assert number_milestones(text, min_gap=0) == [(8, S({"1234"})), (25, S({"1234", "66"}))]
    assert parse_numbers(text) == [(8, "1234"), (25, "66")]


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
    # the table's path is unmerged whatever the gap
    assert number_states(text) == [S(), S({"1"}), S({"1", "2"}), S({"1", "2", "3"})]


def test_merge_in_tokens_and_equal_positions():
    # token positions 3, 8, 8 (two numbers in one token), 20: a gap of 6 merges 3 into 8
    numbers = ["3.5", "7", "2", "4"]
    assert merge_milestones([3, 8, 8, 20], numbers, 6) == [(8, S({"3.5", "7", "2"})), (20, S({"3.5", "7", "2", "4"}))]
    assert merge_milestones([3, 8, 8, 20], numbers, 0) == [(3, S({"3.5"})), (8, S({"3.5", "7", "2"})),
                                                          (20, S({"3.5", "7", "2", "4"}))]


def test_token_milestones_hand_worked(tokenizer):
    # SmolLM2's tokenizer: "Add" " " "3" "." "5" " and" " " "7" " to" " get" " " "1" "0" "." "5"
    text = "Add 3.5 and 7 to get 10.5"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ends = token_char_ends(tokenizer, ids)
    assert ends == [3, 4, 5, 6, 7, 11, 12, 13, 16, 20, 21, 22, 23, 24, 25]
    numbers = parse_numbers(text)
    assert numbers == [(4, "3.5"), (12, "7")]  # 10.5, the answer, is not a milestone
    # "3" is token 2 and "7" token 7: the tokens after them open the new segments, as the official offsets do
    positions = milestone_tokens(ends, [c for c, _ in numbers])
    assert positions == [3, 8]
    ms = merge_milestones(positions, [n for _, n in numbers], 5)  # 8 - 3 = 5 is not closer than 5
    assert token_segments(len(ids), [p for p, _ in ms]) == [0] * 3 + [1] * 5 + [2] * 7
    ms = merge_milestones(positions, [n for _, n in numbers], 6)  # merged into the later one
    assert ms == [(8, S({"3.5", "7"}))]
    assert token_segments(len(ids), [p for p, _ in ms]) == [0] * 8 + [1] * 7


def test_token_milestones_character_inside_a_longer_token():
    # tokens of 2 characters: "ab" "c1" "2d" (ends 2, 4, 6); a number starting at character 3 sits in token 1:
    # token 2 opens the segment. One starting at character 2 (a token's first character) also sits in token 1.
    assert milestone_tokens([2, 4, 6], [3]) == [2]
    assert milestone_tokens([2, 4, 6], [2]) == [2]
    assert milestone_tokens([2, 4, 6], [0, 5]) == [1, 3]  # the last token's number: a segment without tokens
    assert token_segments(3, [3]) == [0, 0, 0]


def naive_token_states(numbers, positions, num_tokens, min_gap):
    """Independent formulation of the read-out: after merging (each position moves to the next one's while
    closer than min_gap, right to left), the state of token t is the set of numbers whose position is <= t."""
    merged = list(positions)
    for i in reversed(range(len(merged) - 1)):
        if merged[i + 1] - merged[i] < min_gap:
            merged[i] = merged[i + 1]
    return [S(n for n, p in zip(numbers, merged) if p <= t) for t in range(num_tokens)]


def test_read_states_match_a_naive_loop():
    rng = random.Random(0)
    for _ in range(300):
        k = rng.randint(0, 8)
        numbers = [str(rng.randint(0, 5)) for _ in range(k)]
        positions = sorted(rng.randint(1, 40) for _ in range(k))
        T, gap = rng.randint(1, 45), rng.choice([0, 1, 3, 10, 50])
        ms = merge_milestones(positions, numbers, gap)
        path = [S()] + [state for _, state in ms]
        got = [path[j] for j in token_segments(T, [p for p, _ in ms])]
        assert got == naive_token_states(numbers, positions, T, gap)


def naive_token_char_ends(tokenizer, token_ids):
    """The quadratic implementation this file had before: decode every prefix."""
    text_len = len(tokenizer.decode(token_ids, skip_special_tokens=True))
    ends, last = [], 0
    for i in range(len(token_ids)):
        last = max(last, min(text_len, len(tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True))))
        ends.append(last)
    return ends


def test_token_char_ends_match_decoding_every_prefix(tokenizer):
    rng = random.Random(0)
    pieces = ["é", "中文", "😀", "𝔸", " 12", "+", "∑x", "ß", "\n", "a", " the", "—", "🇫🇷"]
    split = 0
    cases = []
    for _ in range(60):  # text with multi-byte characters, whole and cut at any token
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 25)))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        cases.append(ids[: rng.randint(1, len(ids))])
    cases += [[rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))] for _ in range(60)]  # any ids
    cases += [c[:2] + [tokenizer.eos_token_id] + c[2:] for c in cases[:20]]  # a special token inside
    for ids in cases:
        assert token_char_ends(tokenizer, ids) == naive_token_char_ends(tokenizer, ids), ids
        split += any(tokenizer.decode(ids[: i + 1]).endswith("\ufffd") for i in range(len(ids)))
    assert split > 20  # characters split across tokens were exercised
    assert token_char_ends(tokenizer, []) == []


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


def test_table_counts_states_a_merged_milestone_skips():
    # A reads [{}, {3.5, 7}] (3.5 merged into 7) but passes {3.5}: the table counts it there too, so B's
    # state {3.5} is worth (1 + 0) / 2, not B's own 0.
    a, b = "Add 3.5 and 7 to get 10.5", "Take 3.5 so 9"
    assert number_milestones(a, min_gap=50) == [(12, S({"3.5", "7"}))]
    t = NumcaTable()
    t.update("p", number_states(a), 1.0)
    t.update("p", number_states(b), 0.0)
    assert t.value("p", S({"3.5"})) == 0.5 and t.value("p", S({"3.5", "7"})) == 1.0 and t.value("p", S()) == 0.5


def test_table_cap_forgets_the_oldest_prompts():
    t = NumcaTable(max_states=3)
    t.update("a", [S(), S({"1"})], 1.0)
    t.update("b", [S(), S({"2"})], 1.0)  # 4 states > 3: "a" goes
    assert t.size == 2 and "a" not in t.tables and t.value("b", S({"2"})) == 1.0


def test_table_state_dict_round_trip_through_a_checkpoint_file(tmp_path):
    # The checkpoint keeps plain data (no pickled frozensets): torch.load's safe mode reads it back.
    t = NumcaTable(max_states=5)
    t.update("a", [S(), S({"1"}), S({"1", "2.5"})], 1.0)
    t.update("b", [S(), S({"7"})], 0.0)
    t.update("a", [S(), S({"1"})], 0.0)  # "a" is now the most recently updated prompt
    torch.save({"numca_table": t.state_dict()}, tmp_path / "state.pt")
    u = NumcaTable(max_states=5)
    u.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["numca_table"])
    assert u.tables == t.tables and list(u.tables) == ["b", "a"] and u.size == t.size == 5
    assert u.value("a", S({"1"})) == 0.5 and u.count("a", S()) == 2 and u.value("a", S({"1", "2.5"})) == 1.0
    for table in (t, u):  # the same next update evicts the same prompt: "b", updated longest ago
        table.update("c", [S()], 1.0)
    assert list(u.tables) == list(t.tables) == ["a", "c"] and u.size == t.size == 4


def test_segment_advantages():
    assert segment_advantages([0.5, 0.25, 1.0], 1.0, lam=1.0) == [0.5, 0.75, 0.0]
    # lam = 0.5: deltas -0.25, 0.75, 0.0 -> A2 = 0, A1 = 0.75, A0 = -0.25 + 0.375
    assert segment_advantages([0.5, 0.25, 1.0], 1.0, lam=0.5) == pytest.approx([0.125, 0.75, 0.0])


def test_group_with_no_shared_state_gives_zero_advantage_after_the_first_milestone(tokenizer):
    texts = ["We add 11 and 22 to get \\boxed{33}", "We add 44 and 55 to get \\boxed{99}",
             "Then 66 and 77 give \\boxed{143}"]
    rewards = [1.0, 0.0, 1.0]
    table = NumcaTable()
    for text, r in zip(texts, rewards):
        table.update("p", number_states(text), r)
    for text, r in zip(texts, rewards):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        numbers = parse_numbers(text)
        ms = merge_milestones(milestone_tokens(token_char_ends(tokenizer, ids), [c for c, _ in numbers]),
                              [n for _, n in numbers], 0)
        seg_adv = segment_advantages([table.value("p", s) for s in [S()] + [s for _, s in ms]], r)
        segment = token_segments(len(ids), [p for p, _ in ms])
        adv = [seg_adv[j] for j in segment]
        first = segment.index(1)
        assert all(a == pytest.approx(r - 2 / 3) for a in adv[:first])  # V(empty) is the group mean
        assert all(a == 0.0 for a in adv[first:])  # each later state's value is this rollout's own reward


def test_zero_std_group_of_a_prompt_seen_before_keeps_its_advantages_undivided():
    # Step 1: the prompt's group fails twice (V(empty) = 0). Step 2: its group succeeds twice, std 0: with the
    # table's history V(empty) = 0.5, so R - V = 0.5; divided by std + 1e-4 it would be 5,000 per token.
    t = NumcaTable()
    for r in (0.0, 0.0, 1.0, 1.0):
        t.update("p", [S()], r)
    std = torch.tensor([0.0, 0.5])
    scale = group_scale(std)
    assert scale.tolist() == [1.0, pytest.approx(1 / 0.5001)]
    assert (1.0 - t.value("p", S())) * float(scale[0]) == 0.5
    # a first-seen group with std 0 has V = R on every state it reached: 0 whatever the scale
    assert grpo_advantages(torch.ones(1, 4)).tolist() == [[0.0] * 4]


def test_grpo_advantages():
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(adv[1], torch.zeros(4))


def test_select_prompts_nearest_half_pass_rate():
    rates = torch.tensor([0.0, 0.5, 0.375, 1.0, 0.625, 0.125])
    assert select_prompts(rates, 2) == [1, 2]  # 0.375 and 0.625 tie: the earlier one
    assert select_prompts(rates, 3) == [1, 2, 4]  # in drawn order
    assert select_prompts(rates, 6) == list(range(6))  # scale 1 keeps everything in order


def test_kl_k3_masked_and_clamped():
    lp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    r = ref - lp
    assert torch.allclose(kl_k3(lp, ref, torch.ones(3)), torch.exp(r) - r - 1)
    assert kl_k3(torch.tensor([-4.0]), torch.tensor([0.0]), torch.ones(1)).item() == 10.0
    assert kl_k3(lp, ref, torch.tensor([1.0, 0.0, 1.0]))[1].item() == 0.0


def test_policy_loss_clip_higher_and_masked_ratio():
    old, mask = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    # ratio e^0.5 on the real token with a positive advantage: clipped at 1.28; the padded token is masked
    # before the exp, so its -95 gives no overflow and does not enter the mean ratio
    logprobs = torch.tensor([[0.5, -95.0]], requires_grad=True)
    loss, clipfrac, _, ratio = ppo_policy_loss(logprobs, old, torch.ones(1, 2), mask, 0.2, 0.28)
    assert loss.item() == pytest.approx(-1.28) and clipfrac.item() == 1.0
    assert ratio.item() == pytest.approx(math.exp(0.5), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()


def test_lr_multiplier_constant_by_default_and_warmup():
    assert [lr_multiplier(s, 10, 0.0, "constant") for s in range(10)] == [1.0] * 10
    assert [lr_multiplier(s, 4, 0.5, "linear") for s in range(4)] == pytest.approx([0.5, 1.0, 1.0, 0.5])


TINY = ["--num-steps", "2", "--num-prompts", "2", "--samples-per-prompt", "2",
        "--minibatch-size", "2", "--micro-batch-size", "1", "--num-eval-problems", "4", "--max-new-tokens", "16",
        "--eval-every", "1"]


@pytest.mark.parametrize("flags", [[], ["--no-numca", "--dynamic-sampling-scale", "2"]])
def test_numca_end_to_end(tmp_path, flags):
    # 2 training problems: step 2 draws step 1's prompts again, so the run-long table grows across steps.
    run_dir, records = run_tiny("numca.py", tmp_path, *TINY, *flags, "--num-train-problems", "2", "--save-every", "1")
    train = [r for r in records if "losses/policy_loss" in r]
    assert len(train) == 2 and ("numca/table_size" in train[0]) == (not flags)
    assert ("charts/kept_reward_mean" in train[0]) == bool(flags)
    assert "time/numca_share" in train[0]  # wall-clock: under time/, left out of the resume comparison
    # The last checkpoint carries the table as it was after step 2: both prompts, each seen by 2 x 2 rollouts.
    state = load_checkpoint(latest_checkpoint(str(run_dir)))
    table = NumcaTable()
    table.load_state_dict(state["state"]["numca_table"])
    assert state["step"] == 2 and table.size == (train[1]["numca/table_size"] if not flags else 0)
    if not flags:
        assert train[1]["numca/seen_state_token_frac"] > 0  # step 2 read states step 1 had put in the table
        assert len(table.tables) == 2 and all(table.count(p, S()) == 4 for p in table.tables)
