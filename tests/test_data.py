"""common.data on small local files in the GSM8K, MATH and MATH-500 schemas, and the generated tasks."""

import json

import pytest

from common.data import DataError, final_answer, load_problems, prompt_ids


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gsm8k_schema(tmp_path):
    rows = [{"question": f"Q{i}: what is {i} + 1000?", "answer": f"{i} + 1000 = <<{i}+1000={i + 1000}>>{i + 1000}\n#### {i + 1000:,}"}
            for i in range(200)]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    train, test = load_problems(path, "train"), load_problems(path, "test")
    assert len(train) + len(test) == 200 and 5 <= len(test) <= 40
    assert not {p.question for p in train} & {p.question for p in test}
    by_q = {p.question: p.answer for p in train + test}
    assert by_q["Q7: what is 7 + 1000?"] == "1007"  # thousands separator and calculator notes gone


def test_math_schema_parquet(tmp_path):
    import pandas as pd

    rows = [{"problem": f"Problem {i}", "solution": f"Thus $x = \\boxed{{\\frac{{{i}}}{{{i + 1}}}}}$.", "level": "Level 1"}
            for i in range(60)]
    path = tmp_path / "math.parquet"
    pd.DataFrame(rows).to_parquet(path)
    problems = load_problems(str(path), "train") + load_problems(str(path), "test")
    assert {p.question: p.answer for p in problems}["Problem 3"] == "\\frac{3}{4}"


def test_math500_schema(tmp_path):
    rows = [{"problem": f"P{i}", "solution": "long ... \\boxed{\\sqrt{2}}", "answer": "\\sqrt{2}", "subject": "Algebra",
             "level": 3, "unique_id": f"test/algebra/{i}.json"} for i in range(30)]
    problems = load_problems(write_jsonl(tmp_path / "m500.jsonl", rows), "train")
    assert problems and all(p.answer == "\\sqrt{2}" for p in problems)


def test_dataset_without_answers(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "hi", "text": "no answer"}])
    with pytest.raises(DataError, match="no answer"):
        load_problems(path, "train")


def test_generated_default_splits_never_overlap():
    train = load_problems("arithmetic", "train", size=3000, seed=5)
    test = load_problems("arithmetic", "test", size=500)
    assert len(train) == 3000 and len(test) == 500
    assert not {p.question for p in train} & {p.question for p in test}
    assert load_problems("arithmetic", "test", size=500) == test  # the test set is fixed


def test_reasoning_gym_settings():
    problems = load_problems("rg:chain_sum:min_terms=3,max_terms=3,max_digits=1", "test", size=5)
    assert len(problems) == 5 and all(p.question.count("+") + p.question.count("-") >= 2 for p in problems)
    with pytest.raises(DataError, match="reasoning-gym"):
        load_problems("rg:chain_sum:bogus_setting=1", "test", size=5)


def test_final_answer():
    assert final_answer("blah\n#### 1,234") == "1234"
    assert final_answer("so $\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert final_answer(" 42 ") == "42"


def test_prompt_uses_chat_template(tokenizer):
    text = tokenizer.decode(prompt_ids(tokenizer, "Calculate 2 + 3."))
    assert "Calculate 2 + 3." in text and "\\boxed{}" in text and text.endswith("assistant\n")
