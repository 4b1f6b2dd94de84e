"""Synthetic models and data (dsft/synthetic.py): the bundled demo dataset is what the
generator writes, each task's answer is right, and the demo tokenizer round-trips."""

from __future__ import annotations

from pathlib import Path

from dsft.synthetic import DEMO_DATA, build_tokenizer, generate_tasks, write_tasks


def test_bundled_demo_data_is_the_generators_output(tmp_path: Path) -> None:
    write_tasks(tmp_path / "t.jsonl", generate_tasks())
    assert (tmp_path / "t.jsonl").read_bytes() == DEMO_DATA.read_bytes()


def test_task_answers_and_seeds() -> None:
    rows = generate_tasks(n=400, seed=7)
    assert rows == generate_tasks(n=400, seed=7) and rows != generate_tasks(n=400, seed=8)
    answer = {
        "Reverse": lambda x: x[::-1],
        "Sort": lambda x: "".join(sorted(x)),
        "Capitalise": str.upper,
        "Add": lambda x: str(sum(map(int, x.split("+")))),
    }
    assert {r["instruction"] for r in rows} == set(answer)
    assert all(r["output"] == answer[r["instruction"]](r["input"]) for r in rows)


def test_demo_tokenizer_round_trips_chat() -> None:
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "Add 3+4"}, {"role": "assistant", "content": "7"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<s><|user|>Add 3+4<|end|><|assistant|>7<|end|>"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_on_policy_pairs_reject_the_models_own_mistakes() -> None:
    """The preference demo's pairs: a prompt becomes a pair only when one of the model's
    answers is wrong, with that answer (the first wrong one) rejected and the right one
    chosen; the hard family is the harder end of the demo's tasks."""
    from dsft.synthetic import generate_hard_tasks, on_policy_pairs

    tasks = generate_hard_tasks(6, seed=1)
    assert [t["instruction"] for t in tasks[:3]] == ["Reverse", "Sort", "Add"]
    assert all(len(t["input"]) in (5, 6) for t in tasks if t["instruction"] != "Add")
    right = [t["output"] for t in tasks]
    greedy = ["wrong0", *right[1:]]  # wrong on the first prompt only
    sampled = [right[0], "wrong1", *right[2:]]  # wrong on the second prompt only
    pairs = on_policy_pairs(tasks, [greedy, sampled])
    assert [p["rejected"][0]["content"] for p in pairs] == ["wrong0", "wrong1"]
    assert [p["chosen"][0]["content"] for p in pairs] == right[:2]
    assert pairs[0]["prompt"][0]["content"] == f"Reverse\n\n{tasks[0]['input']}"
