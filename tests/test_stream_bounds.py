"""Streaming parsers resume from checkpoints: random outputs cut at random places still stream to exactly
the plain parse, and the text re-scanned per delta stays bounded however long the output grows."""

from __future__ import annotations

import random

import pytest

from lightllm.server.function_call import base as fc_base
from lightllm.server.function_call.base import ToolStreamParser, assemble, parse_complete
from lightllm.server.function_call.constrained import NamedDetector, RequiredDetector
from lightllm.server.function_call.registry import detector_class
from lightllm.server.reasoning.base import ReasoningStreamParser
from lightllm.server.reasoning.registry import reasoning_detector
from tests.test_tool_parsers import TOOLS, reassemble

CALL = '{"name": "get_weather", "arguments": {"city": "Paris \\" } ]"}}'
TOOL_PIECES = ["hello ", "world. ", " ", "\n", "<tool_call>", "</tool_call>", "```json", "```", CALL,
               '{"name": "unknown", "arguments": {}}', '{"a": "<tool_call>"}', "<tool_", "</tool", "`", "``", "{",
               "}", '"', "\\", "[", "]", '{"name": "add", "arguments": {"a": 1}}', "x" * 30]
THINK_PIECES = ["<think>", "</think>", " ", "\n", "idea", " more", "</thi", "<thi", "<", ">", "answer", "\t"]


def random_text(rng: random.Random, pieces: list[str]) -> str:
    return "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 14)))


def random_cuts(rng: random.Random, text: str) -> list[str]:
    cuts, i = [], 0
    while i < len(text):
        n = rng.randrange(1, 9)
        cuts.append(text[i:i + n])
        i += n
    return cuts


def test_qwen25_random_outputs_stream_as_they_parse():
    rng = random.Random(11)
    for _ in range(1500):
        text = random_text(rng, TOOL_PIECES)
        for max_calls in (None, 1):
            content, calls = parse_complete(detector_class("qwen25")(TOOLS), text, max_calls)
            parser = ToolStreamParser(detector_class("qwen25")(TOOLS), max_calls)
            deltas = [d for cut in random_cuts(rng, text) for d in parser.feed(cut)] + parser.finish()
            s_content, s_calls = reassemble(deltas)
            assert s_content == (content or ""), text
            assert [(c["name"], c["arguments"]) for c in s_calls] == \
                [(c["function"]["name"], c["function"]["arguments"]) for c in calls], text



def _format_cases() -> dict[str, tuple[list[tuple], dict | None]]:
    from tests import test_tool_formats as formats
    from tests import test_tool_parsers as parsers

    cases = {name: (list(c), formats.SCHEMAS) for name, c in formats.FORMATS.items()}
    cases.update(qwen25=(parsers.QWEN25, None), llama3=(parsers.LLAMA3, None), mistral=(parsers.MISTRAL, None))
    return cases


@pytest.mark.parametrize("name", sorted(_format_cases()))
def test_every_format_streams_random_concatenations_as_it_parses(name):
    """Whole outputs of each format's own cases, joined at random with plain text and halves of its markers
    (so calls follow text, text follows calls, markers arrive split): streamed == plain parse."""
    cases, schemas = _format_cases()[name]
    markers = [m for m in detector_class(name)(TOOLS, schemas).markers if len(m) > 1]
    pieces = [c[0] for c in cases] + ["hi ", " ", "\n", "x" * 20, "{"] + [m[:len(m) // 2] for m in markers]
    rng = random.Random(name)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 5)))
        content, calls = parse_complete(detector_class(name)(TOOLS, schemas), text)
        parser = ToolStreamParser(detector_class(name)(TOOLS, schemas))
        deltas = [d for cut in random_cuts(rng, text) for d in parser.feed(cut)] + parser.finish()
        s_content, s_calls = reassemble(deltas)
        assert s_content == (content or ""), text
        assert [(c["name"], c["arguments"]) for c in s_calls] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in calls], text

@pytest.mark.parametrize("name", ["qwen3", "qwen3-thinking"])
def test_think_tags_random_outputs_stream_as_they_split(name):
    rng = random.Random(5)
    for _ in range(1500):
        text = random_text(rng, THINK_PIECES)
        detector = reasoning_detector(name).for_prompt("<think>" if rng.random() < 0.3 else "")
        whole = detector.split(text, final=True)
        parser = ReasoningStreamParser(detector)
        reasoning = content = ""
        for cut in random_cuts(rng, text):
            r, c = parser.feed(cut)
            reasoning, content = reasoning + r, content + c
        r, c = parser.finish()
        assert (reasoning + r, content + c) == (whole.reasoning, whole.content), text


ARGUMENTS = ['{"a": 1}', '{"a": 2}', '{"q": "x } ] \\" {"}', '{"deep": {"l": [[1], [2, {"x": []}]]}}', "{}"]


def _required_text(rng: random.Random) -> str:
    items = [f'{{"name": "{rng.choice(["add", "search"])}", "parameters": {rng.choice(ARGUMENTS)}}}'
             for _ in range(rng.randrange(0, 5))]
    text = rng.choice(["", " ", "\n"]) + "[" + ", ".join(items) + rng.choice(["]", "", " ]"])
    return text[:rng.randrange(len(text) + 1)] if rng.random() < 0.5 else text


@pytest.mark.parametrize("mode", ["required", "named"])
def test_constrained_random_outputs_stream_as_the_final_scan(mode):
    """Trusted calls stream while their arguments arrive and resume inside them: what streams, cut at random,
    equals the final scan (a call cut off included, as it was streamed)."""
    rng = random.Random(mode)
    for _ in range(1500):
        if mode == "required":
            text, make = _required_text(rng), lambda: RequiredDetector(TOOLS)
        else:
            whole = rng.choice([" ", ""]) + rng.choice(ARGUMENTS)
            text, make = whole[:rng.randrange(len(whole) + 1)], lambda: NamedDetector(TOOLS, "add")
        _, calls = assemble(make().scan(text, final=True).segments)
        parser = ToolStreamParser(make())
        deltas = [d for cut in random_cuts(rng, text) for d in parser.feed(cut)] + parser.finish()
        if not calls:
            continue  # plain text (no array / object): content, as the existing cases check
        _, s_calls = reassemble(deltas)
        assert [(c["name"], c["arguments"]) for c in s_calls] == [(c.name, c.arguments) for c in calls], text


@pytest.mark.parametrize("mode", ["required", "named"])
def test_a_long_forced_call_is_read_about_once(mode, monkeypatch):
    json_reads = 0
    original_end = fc_base.JsonScan.end

    def counting_end(self, text):
        nonlocal json_reads
        if self.found is None:
            json_reads += len(text) - self.i
        return original_end(self, text)

    monkeypatch.setattr(fc_base.JsonScan, "end", counting_end)
    arguments = '{"q": "' + "ab{[\\\"" * 4000 + '"}'
    if mode == "required":
        text = '[{"name": "search", "parameters": ' + arguments + '}, {"name": "add", "parameters": {"a": 1}}]'
        parser = ToolStreamParser(RequiredDetector(TOOLS))
    else:
        text = arguments
        parser = ToolStreamParser(NamedDetector(TOOLS, "search"))
    kept, deltas = 0, []
    for i in range(0, len(text), 2):
        deltas += parser.feed(text[i:i + 2])
        kept = max(kept, len(parser.text))
    deltas += parser.finish()
    _, calls = reassemble(deltas)
    assert calls[0]["arguments"] == arguments and len(calls) == (2 if mode == "required" else 1)
    assert kept <= 80 and json_reads <= 2 * len(text)

@pytest.mark.parametrize("thinking", [False, True])
def test_required_mode_stops_at_the_first_repeated_call_in_the_answer(thinking):
    """limit_repeats ends the generation on the chunk that completes a repeat, found by resuming scans of
    the answer (after the reasoning when the model thinks first); a call written inside the reasoning does
    not count."""
    import asyncio

    from lightllm.server.function_call.context import ToolContext
    from lightllm.server.generation import GenerationChunk

    one = '{"name": "add", "parameters": {"a": 1}}'
    text = f'[{one}, {{"name": "add", "parameters": {{"a": 2}}}}, {one}, {one}]'
    if thinking:
        text = f"<think>I could call [{one}, {one}]</think>\n" + text
    context = ToolContext(mode="required", tools=[], fmt="qwen25", template_has_tools=True,
                          detector=RequiredDetector(TOOLS))

    async def chunks():
        for i in range(0, len(text), 3):
            yield GenerationChunk(text[i:i + 3])
        yield GenerationChunk("", finished=True, finish_reason="length")

    async def run() -> str:
        seen = ""
        async for chunk in context.limit_repeats(chunks(), reasoning_detector("qwen3") if thinking else None):
            seen += chunk.text
            if chunk.finished:
                assert chunk.finish_reason == "stop"
                return seen
        raise AssertionError("no stop")

    seen = asyncio.run(run())
    repeat_end = text.index(one, text.index('"a": 2')) + len(one)
    assert repeat_end <= len(seen) < repeat_end + 3  # ended on the chunk that completed the repeat

HARMONY_PIECES = ["<|start|>assistant", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>", "analysis",
                  "final", "commentary", " to=functions.add", " ", "thought ", "answer", "<|end", "<|chan", "<|"]


def test_harmony_random_outputs_stream_as_they_split():
    rng = random.Random(3)
    for _ in range(2000):
        text = random_text(rng, HARMONY_PIECES)
        detector = reasoning_detector("gpt-oss").for_prompt("<|start|>assistant")
        whole = detector.split(text, final=True)
        parser = ReasoningStreamParser(detector)
        reasoning = content = ""
        for cut in random_cuts(rng, text):
            r, c = parser.feed(cut)
            reasoning, content = reasoning + r, content + c
        r, c = parser.finish()
        assert (reasoning + r, content + c) == (whole.reasoning, whole.content), text

def test_tool_stream_rescans_a_bounded_text(monkeypatch):
    """20,000 characters of answer, then a call whose arguments are 20,000 characters, then more calls, fed
    two characters at a time: the text kept for re-scanning never exceeds the call being written, and
    each character of a call's JSON is read about once (not once per delta)."""
    json_reads = 0
    original_end = fc_base.JsonScan.end

    def counting_end(self, text):
        nonlocal json_reads
        if self.found is None:
            json_reads += len(text) - self.i
        return original_end(self, text)

    monkeypatch.setattr(fc_base.JsonScan, "end", counting_end)
    long_call = '<tool_call>\n{"name": "search", "arguments": {"q": "' + "ab{[\\\"" * 4000 + '"}}\n</tool_call>'
    small_call = '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    text = "Some text, " * 2000 + long_call + small_call * 50
    parser = ToolStreamParser(detector_class("qwen25")(TOOLS))
    kept = 0
    deltas = []
    for i in range(0, len(text), 2):
        deltas += parser.feed(text[i:i + 2])
        kept = max(kept, len(parser.text))
    deltas += parser.finish()
    content, calls = reassemble(deltas)
    assert content == "Some text, " * 2000 and len(calls) == 51
    assert kept <= len(long_call) + 2
    assert json_reads <= 2 * (len(long_call) + 50 * len(small_call))


@pytest.mark.parametrize("name, opening, closing", [
    ("qwen3", "<think>", "</think>\n\n"),
    ("gpt-oss", "<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>")])
def test_reasoning_stream_rescans_a_bounded_text(name, opening, closing):
    parser = ReasoningStreamParser(reasoning_detector(name))
    text = opening + "step by step. " * 2000 + closing + "The answer. " * 2000
    kept = 0
    reasoning = content = ""
    for i in range(0, len(text), 3):
        r, c = parser.feed(text[i:i + 3])
        reasoning, content = reasoning + r, content + c
        kept = max(kept, len(parser.text))
    r, c = parser.finish()
    assert (reasoning + r, content + c) == ((("step by step. " * 2000).strip() if name == "qwen3"
                                             else "step by step. " * 2000), "The answer. " * 2000)
    assert kept <= len(closing) + 16  # a space or two, a marker still arriving and the delta
