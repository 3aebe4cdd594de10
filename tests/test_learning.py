"""The direction of learning, for each trainer through its own main(): one update on a batch in which some
responses were rewarded makes those responses more likely and the unrewarded ones less likely.

The tiny model answers the `digits` task right about half the time, so most groups of samples hold both
rewards. The test runs the script's main() in this process for one step, with the generator wrapped so that
it records what was sampled for training (the calls with n = samples_per_prompt; VinePPO's Monte Carlo
rollouts use another n, the evaluation n = 1). It grades each sample itself with the project's grader, then
compares each sample's log-probability (summed over its tokens, at the sampling temperature, float32) under
the model before the step and the final model the run saved. Only groups with both rewards are compared:
there every trainer's advantage has the sign of the reward. An optimizer that climbed its loss, a flipped
advantage or a mis-indexed row fails here, for every trainer (checked by running the suite with every AdamW
set to `maximize=True`: each of these tests failed).
"""

import importlib

import pytest
import torch
import tyro

from common.data import load_problems, prompt_ids
from common.grading import grade
from common.models import TINY_MODEL, load_model, load_tokenizer

K = 4  # samples per prompt
ONE_STEP = ["--model", TINY_MODEL, "--dataset", "digits", "--num-steps", "1", "--num-prompts", "6",
            "--samples-per-prompt", str(K), "--num-epochs", "1", "--minibatch-size", "24", "--micro-batch-size", "8",
            "--max-new-tokens", "12", "--num-eval-problems", "2", "--warmup-ratio", "0", "--lr-decay", "constant",
            "--learning-rate", "1e-4"]
SCRIPTS = {
    "ppo.py": [],
    "vineppo.py": ["--num-mc-rollouts", "3"],  # n = 3 tells its rollouts apart from the K = 4 samples
    "numca.py": [],
    "hista.py": ["--interval", "4"],
    "prime_implicit_prm.py": [],
}


def sequence_logprob(model, prompt: list[int], response: list[int], temperature: float) -> float:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).sum())


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_one_update_makes_rewarded_responses_more_likely(script, tmp_path, monkeypatch):
    module = importlib.import_module(script[:-3])
    args = tyro.cli(module.Args, args=[*ONE_STEP, *SCRIPTS[script], "--output-dir", str(tmp_path)])
    sampled = []  # (prompt ids, Completion) of every training sample

    def recording(make):
        def make_and_record(*a, **kw):
            generator = make(*a, **kw)
            generate = generator.generate

            def generate_and_record(prompts, n=1, **kw2):
                outs = generate(prompts, n=n, **kw2)
                if n == K:
                    sampled.extend((list(p), c) for p, row in zip(prompts, outs) for c in row)
                return outs
            generator.generate = generate_and_record
            return generator
        return make_and_record

    monkeypatch.setattr(module, "make_run_generator", recording(module.make_run_generator))
    module.main(args)

    tokenizer = load_tokenizer(TINY_MODEL)
    problems = {tuple(prompt_ids(tokenizer, p.question)): p for p in load_problems("digits", "train")}
    before = load_model(TINY_MODEL).eval()
    (run_dir,) = tmp_path.iterdir()
    after = load_model(str(run_dir / "final_model")).eval()
    assert sampled, "no training samples were recorded"
    changes = {1.0: [], 0.0: []}
    for g in range(0, len(sampled), K):
        group = sampled[g : g + K]
        problem = problems[tuple(group[0][0])]
        rewards = [grade(c.text, problem.answer, question=problem.question) if c.finished else 0.0 for _, c in group]
        if len(set(rewards)) < 2:
            continue  # every sample right, or every one wrong: no advantage sign to check
        for (prompt, c), r in zip(group, rewards):
            changes[r].append(sequence_logprob(after, prompt, c.token_ids, args.temperature)
                              - sequence_logprob(before, prompt, c.token_ids, args.temperature))
    assert changes[1.0] and changes[0.0], "no group held both rewards: the tiny model should be right about half the time"
    up, down = sum(changes[1.0]) / len(changes[1.0]), sum(changes[0.0]) / len(changes[0.0])
    assert up > 0 > down, (f"rewarded responses changed their log-prob by {up:+.4f} on average, unrewarded ones "
                           f"by {down:+.4f}: the update should raise the first and lower the second")
