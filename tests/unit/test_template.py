"""dsft's trained tokens on the chat templates model families publish.

The fixtures in tests/fixtures/chat_templates/ are the published templates (provenance in
SOURCES.md); tagged/ holds the same templates with the assistant's output (content, reasoning,
tool calls and the tokens that end the turn) wrapped in ``{% generation %}``. For every family
and conversation shape the family supports, the tokens dsft trains with the ORIGINAL template
must equal the tokens transformers' ``return_assistant_tokens_mask`` marks with the TAGGED one,
and the token ids must be the same. Each family gets a real byte-level BPE tokenizer with its
own control tokens (special, or plain added tokens such as Qwen's ``<think>``).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from dsft.config import DataConfig
from dsft.data.formats import Example, load_examples
from dsft.data.template import TEMPLATES, ChatOptions
from dsft.data.tokenize import encode, tokenize_example, tokenize_prompt
from dsft.errors import DataError
from dsft.synthetic import build_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"
DATE = "26 Jul 2024"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city."}},
            "required": ["city"],
        },
    },
}


def _call(city: str, string_args: bool) -> dict[str, Any]:
    args: Any = {"city": city}
    return {
        "id": f"call{city[:5]:0<5}",  # 9 characters (Mistral checks)
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps(args) if string_args else args},
    }


def conversation(case: str, string_args: bool = False) -> dict[str, Any]:
    """The raw row of each conversation shape (OpenAI-style messages)."""
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c, **kw: {"role": "assistant", "content": c, **kw}  # noqa: E731
    if case == "multi":
        return {
            "messages": [
                u("Name a prime number."),
                a("Seven is prime."),
                u("And an even one?"),
                a("Two is the only even prime."),
                u("Thanks!"),
                a("You are welcome."),
            ]
        }
    if case == "system":
        return {
            "messages": [
                {"role": "system", "content": "You answer in one short sentence."},
                u("What is the capital of France?"),
                a("Paris is the capital of France."),
                u("And of Italy?"),
                a("Rome is the capital of Italy."),
            ]
        }
    if case == "tools":
        tool = lambda c, city: {  # noqa: E731
            "role": "tool",
            "tool_call_id": _call(city, string_args)["id"],
            "name": "get_weather",
            "content": c,
        }
        return {
            "tools": [WEATHER],
            "messages": [
                u("What is the weather in Paris?"),
                a("", tool_calls=[_call("Paris", string_args)]),
                tool('{"temperature": 21}', "Paris"),
                a("It is 21 degrees in Paris."),
                u("And in Rome?"),
                a("", tool_calls=[_call("Rome", string_args)]),
                tool('{"temperature": 25}', "Rome"),
                a("Rome is warmer: 25 degrees."),
            ],
        }
    if case == "reasoning":
        return {
            "messages": [
                u("Is 91 prime?"),
                a("No, 91 = 7 x 13.", reasoning_content="Try small factors: 91 / 7 = 13."),
                u("Is 97 prime?"),
                a("Yes, 97 is prime.", reasoning_content="No factor up to 9 divides 97."),
            ]
        }
    if case == "inline_think":
        return {
            "messages": [
                u("Is 51 prime?"),
                a("<think>\n51 = 3 x 17.\n</think>\n\nNo, 51 = 3 x 17."),
                u("Is 53 prime?"),
                a("<think>\nNo small factor divides 53.\n</think>\n\nYes, 53 is prime."),
            ]
        }
    raise ValueError(case)


CHATML = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
QWEN_TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
THINK = ["<think>", "</think>"]
DS = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
]
# family: control tokens (special), plain added tokens, bos, eos, conversation shapes,
# template variables, tool-call arguments as JSON text (DeepSeek concatenates them).
FAMILIES: dict[str, dict[str, Any]] = {
    "llama3": dict(
        special=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
            "<|python_tag|>",
        ],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        cases=["multi", "system", "tools"],
        kwargs={"date_string": DATE},
    ),
    "qwen2_5": dict(
        special=CHATML, added=QWEN_TAGS, eos="<|im_end|>", cases=["multi", "system", "tools"]
    ),
    "qwen3": dict(
        special=CHATML,
        added=QWEN_TAGS + THINK,
        eos="<|im_end|>",
        cases=["multi", "system", "tools", "reasoning", "inline_think"],
    ),
    "qwen3_5": dict(
        special=CHATML,
        added=QWEN_TAGS + THINK,
        eos="<|im_end|>",
        cases=["multi", "system", "tools", "reasoning", "inline_think"],
    ),
    "qwen3_coder": dict(
        special=CHATML, added=QWEN_TAGS, eos="<|im_end|>", cases=["multi", "system", "tools"]
    ),
    "gemma2": dict(
        special=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>",
        eos="<eos>",
        cases=["multi"],
    ),
    "gemma3": dict(
        special=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>"],
        bos="<bos>",
        eos="<eos>",
        cases=["multi", "system"],
    ),
    "phi3": dict(
        special=["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        bos="<s>",
        eos="<|endoftext|>",
        cases=["multi", "system"],
    ),
    "mistral": dict(
        special=[
            "<s>",
            "</s>",
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ],
        bos="<s>",
        eos="</s>",
        cases=["multi", "system", "tools"],
    ),
    "gpt_oss": dict(
        special=[
            "<|start|>",
            "<|message|>",
            "<|channel|>",
            "<|end|>",
            "<|return|>",
            "<|call|>",
            "<|constrain|>",
            "<|endoftext|>",
        ],
        eos="<|return|>",
        cases=["multi", "system", "tools", "reasoning"],
        kwargs={},
    ),
    "deepseek_v3": dict(
        special=DS,
        added=THINK,
        bos=DS[0],
        eos=DS[1],
        cases=["multi", "system", "tools", "inline_think"],
        string_args=True,
        no_tool_schemas=True,  # renders tool calls and results, never a `tools` list
    ),
    "deepseek_v3_1": dict(
        special=DS,
        added=THINK,
        bos=DS[0],
        eos=DS[1],
        cases=["multi", "system", "tools", "inline_think"],
        string_args=True,
        no_tool_schemas=True,  # renders tool calls and results, never a `tools` list
    ),
    "glm4": dict(
        special=[
            "[gMASK]",
            "<sop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|observation|>",
            "<|endoftext|>",
        ],
        eos="<|endoftext|>",
        cases=["multi", "system"],
    ),
    "cohere": dict(
        special=[
            "<BOS_TOKEN>",
            "<|START_OF_TURN_TOKEN|>",
            "<|END_OF_TURN_TOKEN|>",
            "<|SYSTEM_TOKEN|>",
            "<|USER_TOKEN|>",
            "<|CHATBOT_TOKEN|>",
        ],
        bos="<BOS_TOKEN>",
        eos="<|END_OF_TURN_TOKEN|>",
        cases=["multi", "system", "tools"],
        always_tools=True,  # the tool_use template iterates `tools` unconditionally
    ),
    "nemotron": dict(
        special=["<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>"],
        added=[*THINK, "<TOOLCALL>", "</TOOLCALL>", "<AVAILABLE_TOOLS>", "</AVAILABLE_TOOLS>"],
        eos="<SPECIAL_12>",
        cases=["multi", "system", "tools", "inline_think"],
    ),
    "smollm2": dict(special=CHATML, eos="<|im_end|>", cases=["multi", "system"]),
    "llava_next": dict(
        special=["<s>", "</s>", "<image>"],
        bos="<s>",
        eos="</s>",
        cases=["multi", "system"],
        parts=True,  # the template reads content as a list of parts
    ),
}
CASES = [(f, c) for f, spec in FAMILIES.items() for c in spec["cases"]]


@cache
def _base_tokenizer_json() -> str:
    """A small byte-level BPE trained on the test conversations (merges cross words, so
    token boundaries do not fall on characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [json.dumps(conversation(c), ensure_ascii=False) for _, c in CASES] * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


@cache
def family_tokenizer(family: str) -> Any:
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    tok = Tokenizer.from_str(_base_tokenizer_json())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["special"]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.get("added", [])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec.get("bos"), eos_token=spec["eos"]
    )
    fast.chat_template = (FIXTURES / f"{family}.jinja").read_text(encoding="utf-8")
    return fast


def example(tmp_path: Path, family: str, case: str) -> Example:
    """The conversation as dsft reads it from a .jsonl row."""
    spec = FAMILIES[family]
    row = conversation(case, spec.get("string_args", False))
    if spec.get("parts"):  # as such datasets write them: OpenAI content parts
        for m in row["messages"]:
            m["content"] = [{"type": "text", "text": m["content"]}]
    if spec.get("no_tool_schemas"):
        row.pop("tools", None)
    if spec.get("always_tools"):
        row.setdefault("tools", [WEATHER])
    path = tmp_path / f"{family}-{case}.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    return load_examples([str(path)]).examples[0]


def reference(tok: Any, family: str, ex: Example, kwargs: dict[str, Any]) -> tuple[list, list]:
    """Token ids and assistant mask of the {% generation %}-tagged template (transformers)."""
    tagged = (FIXTURES / "tagged" / f"{family}.jinja").read_text(encoding="utf-8")
    messages = ex.messages
    if FAMILIES[family].get("parts"):
        messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    out = tok.apply_chat_template(
        messages,
        tools=ex.tools,
        chat_template=tagged,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        **kwargs,
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def dsft_tokens(tok: Any, ex: Example, **opts: Any) -> tuple[list, list]:
    enc = encode(tok, [ex], options=ChatOptions(**opts))
    return enc.ids.tolist(), enc.trained.astype(int).tolist()


def show(tok: Any, ids: list[int], mask: list[int]) -> str:
    """The text with trained tokens inside [[ ]] (for readable failures)."""
    out, run, on = [], [], False
    for i, m in [*zip(ids, mask, strict=True), (None, None)]:
        if (bool(m) != on or i is None) and run:
            t = tok.decode(run)
            out.append(f"[[{t}]]" if on else t)
            run = []
        on = bool(m)
        if i is not None:
            run.append(i)
    return "".join(out)


@pytest.mark.parametrize(("family", "case"), CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_trained_tokens_equal_generation_reference(tmp_path: Path, family: str, case: str) -> None:
    tok = family_tokenizer(family)
    ex = example(tmp_path, family, case)
    kwargs = FAMILIES[family].get("kwargs", {})
    ref_ids, ref_mask = reference(tok, family, ex, kwargs)
    ids, mask = dsft_tokens(tok, ex, template_kwargs=tuple(kwargs.items()))
    assert ids == ref_ids, f"\ndsft: {tok.decode(ids)!r}\nref:  {tok.decode(ref_ids)!r}"
    assert mask == ref_mask, f"\ndsft: {show(tok, ids, mask)}\nref:  {show(tok, ids, ref_mask)}"
    assert sum(mask) > 0


def test_every_family_and_shape_is_covered() -> None:
    fixtures = {p.stem for p in FIXTURES.glob("*.jinja")}
    assert fixtures == set(FAMILIES) == {p.stem for p in (FIXTURES / "tagged").glob("*.jinja")}
    for shape in ("multi", "system", "tools", "reasoning", "inline_think"):
        assert any(c == shape for _, c in CASES)


def _write(tmp_path: Path, rows: list[dict[str, Any]], name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


def test_refusal_is_located_skipped_or_folded(tmp_path: Path) -> None:
    from dsft.data.build import build_store

    tok = family_tokenizer("gemma2")
    rows = [conversation("system"), conversation("multi")]
    path = _write(tmp_path, rows)
    exs = load_examples([str(path)]).examples
    # the template's own message, the data file and line, and the template line
    with pytest.raises(
        DataError,
        match=r"d\.jsonl:1: the chat template refused this "
        r"conversation \(template line 1\): System role not supported",
    ):
        encode(tok, exs)
    settings = {"format": "auto", "columns": {}, "loss_on": "assistant", "on_bad_row": "skip"}
    store = build_store(str(path), tok, settings)
    assert len(store) == 1 and store.examples[0].source.endswith("d.jsonl:2")
    assert len(store.skipped) == 1 and "System role not supported" in store.skipped[0]
    # fold_system: the system message leads the first user turn, as a user would write it
    folded = Example(
        [
            {
                "role": "user",
                "content": "You answer in one short sentence.\n\nWhat is the capital of France?",
            },
            *exs[0].messages[2:],
        ],
        "x:1",
    )
    ids, mask = dsft_tokens(tok, exs[0], fold_system=True)
    assert (ids, mask) == reference(tok, "gemma2", folded, {})


def test_templates_without_tool_support_say_so(tmp_path: Path) -> None:
    row = conversation("tools")
    ex = load_examples([str(_write(tmp_path, [row]))]).examples[0]
    with pytest.raises(
        DataError,
        match=r"d\.jsonl:1: the row has `tools`, but the chat "
        "template does not read a `tools` variable",
    ):
        encode(family_tokenizer("phi3"), [ex])
    no_schemas = Example(ex.messages, ex.source)
    with pytest.raises(
        DataError,
        match=r"d\.jsonl:1: messages\[1\] has tool_calls, but the "
        "chat template does not render them",
    ):
        encode(family_tokenizer("phi3"), [no_schemas])
    with pytest.raises(
        DataError,
        match=r"d\.jsonl:1: the chat template refused this "
        r"conversation.*alternate",
    ):
        encode(family_tokenizer("gemma3"), [no_schemas])


def test_content_parts_sharegpt_tool_calls_and_media(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is "},
                        {"type": "text", "text": "2+2?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
            ]
        },
        {
            "tools": json.dumps([WEATHER["function"]]),
            "conversations": [
                {"from": "human", "value": "Weather in Paris?"},
                {
                    "from": "function_call",
                    "value": '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
                },
                {"from": "observation", "value": '{"temperature": 21}'},
                {"from": "gpt", "value": "21 degrees."},
            ],
        },
    ]
    a, b = load_examples([str(_write(tmp_path, rows))]).examples
    assert a.messages[0]["content"] == "What is 2+2?" and a.messages[1]["content"] == "4"
    assert b.tools == [WEATHER | {"function": WEATHER["function"]}]
    assert b.messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    assert b.messages[2] == {"role": "tool", "content": '{"temperature": 21}'}
    tok = family_tokenizer("qwen2_5")
    ids, mask = dsft_tokens(tok, b)
    assert (ids, mask) == reference(tok, "qwen2_5", b, {})
    media = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "x.png"}},
                    {"type": "text", "text": "What is this?"},
                ],
            },
            {"role": "assistant", "content": "A cat."},
        ]
    }
    # an image part is read (its reference resolved against the data file's folder; a
    # text-only model refuses it when tokenising, dsft/tests/unit/test_multimodal.py)
    (ex,) = load_examples([str(_write(tmp_path, [media], "i.jsonl"))]).examples
    assert ex.images == [str(tmp_path.resolve() / "x.png")]
    assert ex.messages[0]["content"] == "<image>What is this?"
    audio = {**media, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "..."}}]}, media["messages"][1]]}  # fmt: skip
    bad = _write(tmp_path, [rows[0], audio], "m.jsonl")
    with pytest.raises(
        DataError,
        match=r"m\.jsonl:2: messages\[0\]\.content\[0\]: input_audio parts are not "
        "supported",
    ):
        load_examples([str(bad)])


def test_reasoning_drop_turn_end_date_and_loss_on(tmp_path: Path) -> None:
    tok = family_tokenizer("qwen3")
    ex = load_examples([str(_write(tmp_path, [conversation("reasoning")]))]).examples[0]

    def trained(**o: Any) -> str:
        ids, mask = dsft_tokens(tok, ex, **o)
        return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])

    assert trained() == (
        "No, 91 = 7 x 13.<|im_end|><think>\nNo factor up to 9 divides 97.\n</think>\n\n"
        "Yes, 97 is prime.<|im_end|>"
    )
    # dropped: the last turn gets the template's empty think block (Qwen3 non-thinking form)
    assert trained(reasoning="drop") == (
        "No, 91 = 7 x 13.<|im_end|><think>\n\n</think>\n\nYes, 97 is prime.<|im_end|>"
    )
    assert trained(loss_on="last_assistant").startswith("<think>\nNo factor")
    # data.turn_end replaces the learnt endings: GLM-4 then stops on EOS, not on <|user|>
    glm = family_tokenizer("glm4")
    multi = load_examples([str(_write(tmp_path, [conversation("multi")], "g.jsonl"))]).examples[0]
    ids, mask = dsft_tokens(glm, multi, turn_end=("<|endoftext|>",))
    assert glm.decode([i for i, m in zip(ids, mask, strict=True) if m]) == (
        "\nSeven is prime.\nTwo is the only even prime.\nYou are welcome.<|endoftext|>"
    )
    gpt = family_tokenizer("gpt_oss")
    ids, _ = dsft_tokens(gpt, ex, template_date="2024-01-02")
    assert "Current date: 2024-01-02" in gpt.decode(ids)


def test_data_inspect_shows_the_trained_spans(tmp_path: Path) -> None:
    """`dsft data inspect` marks exactly the reference's trained tokens, for every case."""
    from dsft.config import config_from_dict
    from dsft.recipes.inspect import report

    for family, case in CASES:
        tok = family_tokenizer(family)
        ex = example(tmp_path, family, case)
        kwargs = FAMILIES[family].get("kwargs", {})
        data = {
            "path": [ex.source.rsplit(":", 1)[0]],
            "val_fraction": 0.0,
            "test_fraction": 0.0,
            "max_len": 4096,
            "cache": False,
            "template_kwargs": kwargs,
        }
        cfg = config_from_dict({"model": {"path": "unused"}, "data": data})
        out = report(cfg, tok, examples=1)
        ref_ids, ref_mask = reference(tok, family, ex, kwargs)
        assert show(tok, ref_ids, ref_mask) in out, f"{family}-{case}:\n{out}"


def test_chat_options_from_config() -> None:
    from dsft.config import validate_data

    d = DataConfig(
        path=["x.jsonl"],
        template_kwargs={"tools_in_user_message": False, "a": [1]},
        turn_end=["<|eot_id|>"],
        fold_system=True,
        reasoning="drop",
    )
    from dsft.data.pipeline import _settings

    opts = ChatOptions.from_settings(_settings(d))
    assert opts.turn_end == ("<|eot_id|>",) and opts.fold_system and opts.reasoning == "drop"
    tok = family_tokenizer("llama3")
    ex = Example(conversation("multi")["messages"], "x:1")
    assert dsft_tokens(tok, ex, template_kwargs=opts.template_kwargs)[0]  # lists are fine
    import datetime

    bad = DataConfig(
        path=["x.jsonl"],
        template_kwargs={"date_string": datetime.date(2024, 7, 26)},
        template_date="26 Jul 2024",
    )
    problems = " ".join(validate_data(bad))
    assert "data.template_kwargs: values must be" in problems
    assert "data.template_date: '26 Jul 2024' is not a YYYY-MM-DD date" in problems


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


CHAT = [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "a2"},
]


def _trained(tok, t) -> str:
    return tok.decode([i for i, lab in zip(t.input_ids, t.labels, strict=True) if lab != -100])


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()
