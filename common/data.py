"""Problems with gold final answers, split into train and a held-out test set that never overlap.

`load_problems(dataset, split)` understands:
- `arithmetic` (the offline default): reasoning-gym `basic_arithmetic`, 2 terms of 1-2 digits, + - *,
  no parentheses. SmolLM2-135M-Instruct gets ~27% of these right sampling at T = 0.6, ~10% at T = 1
  and 30-35% greedily, so RL has room to show a gain on a laptop. (3-term sums, even of 1 digit, drop
  it to 2-9%: too little reward to learn from.)
- `digits`: the 100 sums of two one-digit numbers ("Calculate 4 + 7."), split by a hash of the question
  (14 test, 86 train). The task the tiny test model (`tiny`, common/models.py) is taught, so that the tests
  see rewards; too small for anything else.
- `rg:<task>[:key=value,...]`: any reasoning-gym task with its generator settings, offline, e.g.
  `rg:chain_sum:min_terms=3,max_terms=4,max_digits=2` (lists with `|`: `operators=+|-`).
- `gsm8k`: openai/gsm8k (main) from the hub, train / test.
- `math`: MATH train (DigitalLearningGmbH/MATH-lighteval) / MATH-500 (HuggingFaceH4/MATH-500) as test.
- a local `.jsonl` or `.parquet` file with a question field (question / problem / prompt) and an answer
  field (answer / final_answer / solution: a GSM8K `#### n` line or a MATH `\\boxed{}` is reduced to the
  final answer). Rows are split by a hash of the question: about 10% go to test, and identical
  questions always land on the same side.

Generated tasks draw train and test from different seeds and drop every train question that also
appears in test. Every split is de-duplicated against the other in the same way for hub data.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

from common import first_line
from common.grading import last_boxed

DEFAULT_DATASET = "arithmetic"
SYSTEM_INSTRUCTION = "Put your final answer within \\boxed{}."
_QUESTION_FIELDS = ("question", "problem", "prompt")
_ANSWER_FIELDS = ("answer", "final_answer", "solution")
_TASKS = {  # short names for reasoning-gym generator settings
    "arithmetic": ("basic_arithmetic", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2,
                                            operators=("+", "-", "*"), allow_parentheses=False)),
}
_HUB = {  # name -> {split: (hub id, config, hub split)}
    "gsm8k": {"train": ("openai/gsm8k", "main", "train"), "test": ("openai/gsm8k", "main", "test")},
    "math": {"train": ("DigitalLearningGmbH/MATH-lighteval", None, "train"),
             "test": ("HuggingFaceH4/MATH-500", None, "test")},
}


_TEST_SEED = 1_000_003  # generated tasks: the held-out split's seed, never a training seed


class DataError(ValueError):
    """The dataset cannot be used as asked; the message says what to do."""


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the final answer only, as `common.grading.grade` expects it ("1234", "\\frac{1}{2}")


def final_answer(raw: str) -> str:
    """Reduce a reference solution to its final answer (GSM8K `#### n`, MATH `\\boxed{}`, else as is)."""
    raw = str(raw)
    if "####" in raw:
        return raw.split("####")[-1].strip().replace(",", "")
    boxed = last_boxed(raw)
    return boxed if boxed is not None else raw.strip()


def _parse_value(v: str):
    if "|" in v:
        return tuple(_parse_value(x) for x in v.split("|"))
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _reasoning_gym(task: str, settings: dict, split: str, size: int, seed: int) -> list[Problem]:
    import reasoning_gym

    def make(n: int, s: int) -> list[Problem]:
        try:
            ds = reasoning_gym.create_dataset(task, size=n, seed=s, **settings)
        except Exception as e:  # unknown task or setting: reasoning-gym's own message, on one line
            raise DataError(f"reasoning-gym cannot make {task!r} with {settings}: {first_line(e)}") from None
        return [Problem(x["question"], str(x["answer"])) for x in ds]

    # The test set is the same for every run seed and train size: 500 distinct problems from a fixed seed.
    test_size = 500
    test = list({p.question: p for p in make(2 * test_size, _TEST_SEED)}.values())[:test_size]
    if split == "test":
        return test[:size]
    # Generators repeat themselves: keep distinct questions not in test, asking for more until `size`
    # are found (or the task has no more to give).
    seen = {p.question for p in test}
    train: list[Problem] = []
    for attempt in range(4):
        for p in make((size + test_size) * 2**attempt, seed + attempt):
            if p.question not in seen:
                seen.add(p.question)
                train.append(p)
        if len(train) >= size:
            break
    return train[:size]


def digit_sums() -> list[Problem]:
    """Every `a + b` with a, b in 0..9, worded as reasoning-gym's basic_arithmetic words it."""
    return [Problem(f"Calculate {a} + {b}.", str(a + b)) for a in range(10) for b in range(10)]


def _rows_to_problems(rows, source: str) -> list[Problem]:
    columns = set(rows.column_names)
    q = next((f for f in _QUESTION_FIELDS if f in columns), None)
    a = next((f for f in _ANSWER_FIELDS if f in columns), None)
    if q is None or a is None:
        missing = "question (question/problem/prompt)" if q is None else "answer (answer/final_answer/solution)"
        raise DataError(f"{source} has no {missing} field; its fields are {sorted(columns)}")
    problems = [Problem(str(r[q]), final_answer(r[a])) for r in rows if r[a] is not None and str(r[a]).strip()]
    if not problems:
        raise DataError(f"{source} has no row with a non-empty answer")
    return problems


def _in_test(question: str) -> bool:
    return int(hashlib.sha1(question.encode()).hexdigest(), 16) % 10 == 0


def _local_file(path: str, split: str) -> list[Problem]:
    import datasets

    kind = "parquet" if path.endswith(".parquet") else "json"
    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as e:
        raise DataError(f"cannot read {path}: {first_line(e)}") from None
    problems = _rows_to_problems(rows, path)
    return [p for p in problems if _in_test(p.question) == (split == "test")]


def _hub(name: str, split: str) -> list[Problem]:
    import datasets

    def fetch(which: str) -> list[Problem]:
        hub_id, config, hub_split = _HUB[name][which]
        try:
            rows = datasets.load_dataset(hub_id, config, split=hub_split)
        except Exception as e:
            raise DataError(f"cannot load {hub_id} from the Hugging Face hub ({first_line(e)[:120]}); "
                            "without network, pass a local .jsonl/.parquet file to --dataset") from None
        return _rows_to_problems(rows, hub_id)

    if split == "test":
        return fetch("test")
    held_out = {p.question for p in fetch("test")}
    return [p for p in fetch("train") if p.question not in held_out]


def load_problems(dataset: str, split: str, size: int | None = None, seed: int = 0) -> list[Problem]:
    """Problems of `split` ("train" or "test"), shuffled with `seed`, at most `size` of them."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}: use train or test")
    if dataset in _TASKS or dataset.startswith("rg:"):
        if dataset in _TASKS:
            task, settings = _TASKS[dataset]
        else:
            task, _, spec = dataset[3:].partition(":")
            settings = {k: _parse_value(v) for k, v in (kv.split("=", 1) for kv in spec.split(",") if kv)}
        problems = _reasoning_gym(task, settings, split, size or (10_000 if split == "train" else 500), seed)
    elif dataset == "digits":
        problems = [p for p in digit_sums() if _in_test(p.question) == (split == "test")]
    elif dataset.endswith((".jsonl", ".json", ".parquet")):
        if not os.path.exists(dataset):
            raise DataError(f"dataset file {dataset} does not exist")
        if os.path.getsize(dataset) == 0:
            raise DataError(f"dataset file {dataset} is empty: it needs rows with question and answer fields")
        problems = _local_file(dataset, split)
    elif dataset in _HUB:
        problems = _hub(dataset, split)
    else:
        raise DataError(f"unknown dataset {dataset!r}: use arithmetic, digits, gsm8k, math, rg:<task>[:k=v,...] "
                        "or a .jsonl/.parquet file")
    if not problems:
        raise DataError(f"dataset {dataset!r} has no {split} problems")
    problems = list(problems)
    random.Random(seed).shuffle(problems)
    return problems[:size] if size else problems


def default_max_new_tokens(dataset: str) -> int:
    """The response budget when --max-new-tokens is not given: 128 tokens for a generated task (arithmetic,
    reasoning-gym), 512 for GSM8K, MATH and files."""
    generated = not (dataset in ("gsm8k", "math") or dataset.endswith((".jsonl", ".json", ".parquet")))
    return 128 if generated else 512


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The question through the model's chat template, asking for the answer in \\boxed{}."""
    messages = [{"role": "user", "content": f"{question}\n{SYSTEM_INSTRUCTION}"}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
