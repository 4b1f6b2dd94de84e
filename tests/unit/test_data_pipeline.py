"""Data pipeline: templates and loss_on, splits (counts, files, k-fold, weights), the cache."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from dsft.config import DataConfig
from dsft.data import prepare
from dsft.data.cache import cache_root, cached_store
from dsft.data.formats import Example
from dsft.data.split import carve, reweight
from dsft.data.template import TEMPLATES
from dsft.data.tokenize import tokenize_example, tokenize_prompt
from dsft.errors import DataError
from dsft.synthetic import build_tokenizer

CHAT = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "a2"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _trained(tok, t) -> str:
    return tok.decode([i for i, lab in zip(t.input_ids, t.labels, strict=True) if lab != -100])


@pytest.mark.parametrize(
    ("loss_on", "expected"),
    [
        ("assistant", "a1<|end|>a2<|end|>"),
        ("last_assistant", "a2<|end|>"),
        # all tokens but the first (position 0 is never predicted)
        (
            "all",
            "<|system|>sys<|end|><|user|>q1<|end|><|assistant|>a1<|end|><|user|>q2<|end|>"
            "<|assistant|>a2<|end|>",
        ),
    ],
)
def test_loss_on(tok, loss_on: str, expected: str) -> None:
    t = tokenize_example(tok, Example(CHAT, "t:1"), 256, loss_on)
    assert _trained(tok, t).replace("<s>", "") == expected


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_builtin_templates_mask_every_response(tmp_path: Path, name: str) -> None:
    tok = build_tokenizer()
    from dsft.data.template import apply_template

    apply_template(tok, name)
    t = tokenize_example(tok, Example(CHAT, "t:1"), 512)
    trained = _trained(tok, t)
    # each response is trained, with the template's end-of-turn marker; prompts are not
    assert "a1" in trained and "a2" in trained and "q1" not in trained and "sys" not in trained
    end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "alpaca": "<|end|>"}[name]
    assert trained.count(end) == 2
    ids, ref = tokenize_prompt(tok, Example(CHAT, "t:1"))
    assert ref == "a2" and "q2" in tok.decode(ids)


def test_custom_template_file_and_missing_template(tmp_path: Path, tok) -> None:
    from dsft.data.template import apply_template

    f = tmp_path / "t.jinja"
    f.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    t2 = build_tokenizer()
    apply_template(t2, str(f))
    t = tokenize_example(t2, Example(CHAT[1:3], "t:1"), 256)
    # the template writes no turn ending: EOS is appended (and trained) so the model can stop
    assert t2.decode(t.input_ids) == "user: q1\nassistant: a1\n<|end|>"
    assert _trained(t2, t) == "a1\n<|end|>"
    t2.chat_template = None
    with pytest.raises(DataError, match=r"no chat template; set data\.template"):
        tokenize_example(t2, Example(CHAT, "t:1"), 256)
    with pytest.raises(DataError, match="not a built-in template"):
        apply_template(t2, "vicuna")


def test_completion_and_text_examples(tok) -> None:
    c = Example(
        [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}],
        "t:1",
        "completion",
    )
    t = tokenize_example(tok, c, 64)
    assert tok.decode(t.input_ids) == "<s>2+2=4<|end|>"  # no template; EOS to learn stopping
    assert _trained(tok, t) == "4<|end|>"
    assert tok.decode(tokenize_prompt(tok, c)[0]) == "<s>2+2="
    x = tokenize_example(tok, Example([{"role": "assistant", "content": "abc"}], "t:2", "text"), 64)
    assert x.num_target_tokens == len(x.input_ids) - 1  # everything after the first token


def test_carve_counts_and_kfold() -> None:
    tr, va, te = carve(100, 7, 9, seed=1)
    assert (len(tr), len(va), len(te)) == (84, 7, 9)
    folds = [carve(100, 0, 10, seed=1, kfold=4, fold=f) for f in range(4)]
    vals = [set(v) for _, v, _ in folds]
    assert all(len(v) in (22, 23) for v in vals)
    assert set().union(*vals) == set(range(100)) - set(folds[0][2])  # folds cover the rest
    assert all(not (a & b) for i, a in enumerate(vals) for b in vals[i + 1 :])  # disjoint
    for t, v, te in folds:
        assert not set(t) & set(v) and not set(t) & set(te) and te == folds[0][2]


def test_reweight() -> None:
    idx = list(range(10))
    groups = [0] * 6 + [1] * 4
    out = reweight(idx, groups, [2.0, 0.5], seed=0)
    assert sorted(i for i in out if i < 6) == sorted(list(range(6)) * 2)
    assert len([i for i in out if i >= 6]) == 2


def _write(path: Path, n: int, start: int = 0) -> Path:
    path.write_text(
        "".join(
            json.dumps({"instruction": f"say {i}", "output": str(i)}) + "\n"
            for i in range(start, start + n)
        )
    )
    return path


def test_prepare_files_counts_weights(tmp_path: Path, tok) -> None:
    a, b = _write(tmp_path / "a.jsonl", 30), _write(tmp_path / "b.jsonl", 10, 100)
    v, t = _write(tmp_path / "v.jsonl", 5, 200), _write(tmp_path / "t.jsonl", 4, 300)
    s = prepare(
        DataConfig(path=[str(a), str(b)], val_path=[str(v)], test_path=[str(t)], max_len=64), tok
    )
    assert (len(s.train), len(s.val), len(s.test)) == (40, 5, 4)
    assert {s.val.example(k).dataset for k in range(5)} == {"v"}
    s = prepare(
        DataConfig(path=[str(a), str(b)], val_size=4, test_size=6, weights=[1.0, 3.0], max_len=64),
        tok,
    )
    assert (len(s.val), len(s.test)) == (4, 6)
    per = {"a": 0, "b": 0}
    for k in range(len(s.train)):
        per[s.train[k].dataset] += 1
    n_b = sum(1 for k in range(len(s.val)) if s.val[k].dataset == "b") + sum(
        1 for k in range(len(s.test)) if s.test[k].dataset == "b"
    )
    assert per["b"] == 3 * (10 - n_b)  # every training example of b three times per epoch


def test_cache_reused_and_invalidated(tmp_path: Path, tok, monkeypatch) -> None:
    f = _write(tmp_path / "d.jsonl", 20)
    cfg = DataConfig(path=[str(f)], max_len=64, cache_dir=str(tmp_path / "c"))
    first = prepare(cfg, tok)
    assert len(list((tmp_path / "c").iterdir())) == 1

    import dsft.data.cache as cache

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(cache, "encode", no_tokenising)
    again = prepare(cfg, tok)  # from the cache, memory-mapped
    assert [again.train[k].input_ids for k in range(5)] == [
        first.train[k].input_ids for k in range(5)
    ]
    assert isinstance(again.train.corpus.stores[0].ids, np.memmap)
    monkeypatch.undo()
    _write(f, 21)  # new contents -> new entry
    assert len(prepare(cfg, tok).train) != len(first.train)
    prepare(DataConfig(**{**cfg.__dict__, "loss_on": "all"}), tok)  # new settings -> new entry
    assert len(list((tmp_path / "c").iterdir())) == 3


SETTINGS = {"format": "auto", "columns": {}, "loss_on": "assistant", "on_bad_row": "error"}


def _cache_worker(path: str, root: str, builder: bool, q) -> None:
    tok = build_tokenizer()
    try:
        store = cached_store(path, tok, SETTINGS, Path(root), builder)
        q.put(("ok", np.asarray(store.ids).tolist(), store.offsets.tolist()))
    except DataError as e:
        q.put(("error", str(e), None))


@pytest.mark.distributed
@pytest.mark.parametrize("bad", [False, True])
def test_one_rank_builds_the_others_wait(tmp_path: Path, bad: bool) -> None:
    f = _write(tmp_path / "d.jsonl", 300)
    if bad:
        f.write_text(f.read_text() + "{oops\n")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    # rank 0 builds; ranks 1 and 2 (other local ranks) only wait for the entry
    procs = [
        ctx.Process(target=_cache_worker, args=(str(f), str(tmp_path / "c"), r == 0, q))
        for r in range(3)
    ]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    if bad:  # the builder's error reaches every rank, none hangs
        assert all(r[0] == "error" and "d.jsonl:301" in r[1] for r in results)
    else:
        assert all(r[0] == "ok" for r in results)
        assert results[0][1:] == results[1][1:] == results[2][1:]
        entries = [p for p in (tmp_path / "c").iterdir() if p.is_dir()]
        assert len(entries) == 1 and not list((tmp_path / "c").glob("*.lock"))


def test_cache_root_default(monkeypatch) -> None:
    monkeypatch.setenv("DSFT_CACHE", "/x/y")
    assert cache_root("") == Path("/x/y")
    assert cache_root("/z") == Path("/z")
