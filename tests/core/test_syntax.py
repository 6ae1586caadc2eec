"""The <hypernet:...> tag: every argument, every error message, and the prompt rewriting helpers."""

import contextlib
import itertools
import random
import time

import pytest

from hypernetwork_ext.errors import TagError
from hypernetwork_ext.strength import SD_ATTENTION_BLOCKS, SDXL_ATTENTION_BLOCKS, Strength
from hypernetwork_ext.syntax import (
    TAG_PATTERN,
    find_tags,
    format_hashes,
    parse_hashes,
    parse_presets,
    parse_tag,
    rename_tags,
    set_multipliers,
    strip_tags,
)


def strength(*items, **kwargs) -> Strength:
    return parse_tag(["net", *items], **kwargs).strength


def test_a1111_forms():
    assert parse_tag(["net"]).strength == Strength(multiplier=1.0)
    assert parse_tag(["net", "0.8"]).strength == Strength(multiplier=0.8)
    assert parse_tag(["net", "-1.5"]).multiplier == -1.5
    assert parse_tag(["net", " 3 "]).multiplier == 3.0
    assert parse_tag(["net"], default_multiplier=0.6).multiplier == 0.6
    assert parse_tag(["sub/dir/net", "1"]).name == "sub/dir/net"


@pytest.mark.parametrize(
    "item,field,value",
    [
        ("m=0.7", "multiplier", 0.7),
        ("weight=0.7", "multiplier", 0.7),
        ("k=1.2", "key", 1.2),
        ("key=0", "key", 0.0),
        ("v=0.5", "value", 0.5),
        ("value=2", "value", 2.0),
        ("self=0", "self_attn", 0.0),
        ("sa=0.5", "self_attn", 0.5),
        ("cross=1.5", "cross_attn", 1.5),
        ("ca=0", "cross_attn", 0.0),
        ("start=0.25", "start", 0.25),
        ("start=25%", "start", 0.25),
        ("stop=0.8", "stop", 0.8),
        ("end=80%", "stop", 0.8),
        ("fadein=0.1", "fade_in", 0.1),
        ("fade_in=10%", "fade_in", 0.1),
        ("fadeout=0.2", "fade_out", 0.2),
        ("neg=0", "uncond", 0.0),
        ("neg=off", "uncond", 0.0),
        ("neg=on", "uncond", 1.0),
        ("negative=no", "uncond", 0.0),
        ("uncond=0.5", "uncond", 0.5),
    ],
)
def test_every_named_argument(item, field, value):
    assert getattr(strength(item), field) == pytest.approx(value)


def test_named_arguments_combine_with_the_positional_multiplier():
    s = strength("0.8", "k=1.2", "v=0.5", "self=0", "cross=2", "start=0.2", "stop=0.9", "fadein=0.1", "neg=0")
    assert (s.multiplier, s.key, s.value, s.self_attn, s.cross_attn) == (0.8, 1.2, 0.5, 0.0, 2.0)
    assert (s.start, s.stop, s.fade_in, s.fade_out, s.uncond) == (0.2, 0.9, 0.1, 0.0, 0.0)
    assert s.site_factor("cross", "IN01", "key") == pytest.approx(0.8 * 1.2 * 2)


def test_block_and_group_arguments():
    s = strength("IN04=0.5", "out03=0", "M00=2", "in=0.25", "mid=1.5", "out=0.75", "OUT5=3")
    blocks = dict(s.blocks)
    assert blocks == {"IN04": 0.5, "OUT03": 0.0, "M00": 2.0, "in": 0.25, "mid": 1.5, "out": 0.75, "OUT05": 3.0}
    assert s.block_factor("IN04") == 0.5  # the exact block wins over its group
    assert s.block_factor("IN05") == 0.25


def test_sd_block_vector_and_lora_style_base_value():
    values = [str(i / 10) for i in range(16)]
    s = strength("bw=" + ",".join(values))
    assert dict(s.blocks) == {block: i / 10 for i, block in enumerate(SD_ATTENTION_BLOCKS)}
    with_base = strength("bw=" + ",".join(["9", *values]))  # LoRA block-weight vectors start with BASE
    assert with_base.blocks == s.blocks


def test_sdxl_block_vector():
    s = strength("bw=" + ",".join(["1"] * 5 + ["0"] * 6))
    assert dict(s.blocks) == {block: (1.0 if i < 5 else 0.0) for i, block in enumerate(SDXL_ATTENTION_BLOCKS)}


def test_vector_for_the_loaded_model_layout():
    s = strength("bw=0.5,1,2", model_blocks=["IN01", "M00", "OUT02"])
    assert dict(s.blocks) == {"IN01": 0.5, "M00": 1.0, "OUT02": 2.0}


def test_presets_builtin_and_user():
    assert dict(strength("bw=OUT").blocks) == {"in": 0.0, "mid": 0.0, "out": 1.0}
    assert dict(strength("bw=inmid").blocks) == {"in": 1.0, "mid": 1.0, "out": 0.0}
    presets = parse_presets("# comment\nMINE: " + ", ".join(["0.5"] * 16) + "\n\nXL: " + " ".join(["2"] * 11))
    assert dict(strength("bw=mine", presets=presets).blocks) == dict.fromkeys(SD_ATTENTION_BLOCKS, 0.5)
    assert dict(strength("bw=XL", presets=presets).blocks) == dict.fromkeys(SDXL_ATTENTION_BLOCKS, 2.0)


@pytest.mark.parametrize(
    "items,message",
    [
        ([""], "the network name is missing"),
        (["k=1"], "the first argument must be the network name"),
        (["net", "abc"], "multiplier must be a number, found 'abc'"),
        (["net", "1", "2"], "unexpected argument '2'"),
        (["net", "zz=1"], "unknown argument 'zz'; known arguments: m, k, v"),
        (["net", "=1"], "an argument has no name before '='"),
        (["net", "k=x"], "k must be a number, found 'x'"),
        (["net", "k=1", "key=2"], "'key' sets key a second time"),
        (["net", "0.5", "m=1"], "'m' sets multiplier a second time"),
        (["net", "start=0.9", "stop=0.1"], "start (0.9) must come before stop (0.1)"),
        (["net", "start=2"], "start must be a fraction of the steps between 0 and 1"),
        (["net", "fadein=0.6", "fadeout=0.6"], "fade-in and fade-out together are longer"),
        (["net", "m=nan"], "m must be a finite number"),
        (["net", "bw=1,2"], "a block vector needs 16 (SD1/SD2) or 11 (SDXL) values, found 2"),
        (["net", "bw=1,x"], "each block weight must be a number, found 'x'"),
        (["net", "bw="], "the block vector is empty"),
        (["net", "bw=NOPE"], "unknown block preset 'NOPE'; known presets: ALL"),
        (["net", "IN99x=1"], "unknown argument 'IN99x'"),
        (["net", "neg=maybe"], "neg must be a number, found 'maybe'"),
    ],
)
def test_errors_name_the_tag_and_the_problem(items, message):
    with pytest.raises(TagError) as caught:
        parse_tag(items)
    text = str(caught.value)
    assert text.startswith("<hypernet:")
    assert message in text


def test_vector_error_mentions_the_model_layout():
    with pytest.raises(TagError, match=r"or 3 \(this model\) values, found 2"):
        parse_tag(["net", "bw=1,1"], model_blocks=["IN01", "M00", "OUT01"])


def test_bad_preset_lines():
    with pytest.raises(TagError, match="block preset line 1"):
        parse_presets("no colon here")
    with pytest.raises(TagError, match="has no values"):
        parse_presets("EMPTY:")
    with pytest.raises(TagError, match="preset X must be a number"):
        parse_presets("X: 1, y")


def test_prompt_helpers():
    prompt = "a cat <hypernet:anime:0.5:k=2> and <hypernet:sub/b> <lora:x:1>"
    assert find_tags(prompt) == [["anime", "0.5", "k=2"], ["sub/b"]]
    assert strip_tags(prompt) == "a cat  and  <lora:x:1>"
    assert set_multipliers(prompt, 0.25) == "a cat <hypernet:anime:0.25:k=2> and <hypernet:sub/b:0.25> <lora:x:1>"
    assert (
        set_multipliers(prompt, 1, names=["sub/b"])
        == "a cat <hypernet:anime:0.5:k=2> and <hypernet:sub/b:1> <lora:x:1>"
    )
    assert set_multipliers("<hypernet:a:m=3:v=1>", 2) == "<hypernet:a:2:v=1>"
    assert rename_tags(prompt, {"anime": "local-anime"}).startswith("a cat <hypernet:local-anime:0.5:k=2>")


def test_hashes_round_trip():
    hashes = {"anime": "0123456789", "sub/odd:name,x": "abcdefabcd"}
    text = format_hashes(hashes)
    assert text == "anime: 0123456789, sub/oddnamex: abcdefabcd"
    assert parse_hashes(text) == {"anime": "0123456789", "sub/oddnamex": "abcdefabcd"}
    assert parse_hashes("garbage, x: , : y") == {}


# --- hostile prompts ------------------------------------------------------------------------------
HOSTILE_PROMPTS = {
    "unclosed tags": "<hypernet:" * 10_000,
    "unclosed tag then text": "<hypernet:" + "a" * 99_990,
    "nested openings": "<" * 100_000,
    "openings then one close": "<<<<<hypernet:" * 7_000 + ">",
    "empty bodies": "<hypernet:>" * 9_000,
    "colons": "<hypernet:" + ":" * 99_989 + ">",
    "backslashes": "<hypernet:\\" * 9_000 + "\\" * 10_000,
    "unicode": "<hypernet:名前😀" * 7_000,
    "long name": "<hypernet:" + "n" * 99_989 + ">",
    "many arguments": "<hypernet:x" + ":k=1" * 24_997 + ">",
}


@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS.values(), ids=HOSTILE_PROMPTS.keys())
def test_100000_hostile_characters_are_scanned_in_well_under_a_second(prompt):
    """The regular expression took 32 s on the first of these (0.3 s at 10,000 characters)."""
    started = time.perf_counter()
    tags = find_tags(prompt)
    stripped = strip_tags(prompt)
    rewritten = set_multipliers(prompt, 0.5)
    for items in tags[:200]:
        with contextlib.suppress(TagError):
            parse_tag(items)
    assert time.perf_counter() - started < 1.0
    assert len(find_tags(rewritten)) == len(tags) and strip_tags(rewritten) == stripped


FRAGMENTS = (
    "<hypernet:", "<hypernet:>", "<hypernet", "hypernet:", "<", ">", ":", "::", "<<<<", ">>>>", "\\", "\\>", "=",
    "0.8", "-1", "1e309", "nan", "k=", "k=2", "v=x", "bw=1,0,1", "start=50%", "IN04=0", "neg=off", "<hypernet:net:0.8>",
    "<hypernet:a:b:c:d:e>", "<lora:x:1>", "名前", "😀", "\u0000", "\n", " ", "n" * 40, ":" * 30, "<hypernet:" * 4,
)  # fmt: skip


def hostile_prompt(seed: int, length: int) -> str:
    """Hostile fragments and random characters (control, CJK, emoji) in a seeded random order."""
    rng = random.Random(seed)
    noise = ["".join(chr(rng.randrange(1, 0x1FAFF)) for _ in range(8)) for _ in range(8)]
    text = ""
    while len(text) < length:
        text += "".join(rng.choices((*FRAGMENTS, *noise), k=length // 4))
    return text[:length]


def spans_of(prompt: str, tags: list[list[str]]) -> list[tuple[int, int]]:
    """Where each found tag's text sits, searched left to right: every one must be there."""
    spans, position = [], 0
    for items in tags:
        text = "<hypernet:" + ":".join(items) + ">"
        start = prompt.find(text, position)
        assert start >= 0, text
        spans.append((start, start + len(text)))
        position = start + len(text)
    return spans


@pytest.mark.parametrize("seed", range(200))
def test_fuzzed_100000_character_prompts(seed):
    prompt = hostile_prompt(seed, 100_000)
    started = time.perf_counter()
    tags = find_tags(prompt)
    stripped = strip_tags(prompt)
    rewritten = set_multipliers(prompt, 0.5)
    assert time.perf_counter() - started < 1.0
    spans = spans_of(prompt, tags)
    bounds = [(0, 0), *spans, (len(prompt), len(prompt))]
    gaps = [prompt[end:start] for (_s, end), (start, _e) in itertools.pairwise(bounds)]
    assert stripped == "".join(gaps)  # strip_tags removes exactly the tags find_tags found
    assert len(find_tags(rewritten)) == len(tags) and strip_tags(rewritten) == stripped
    for items in tags[:100]:  # parsing raises only the project's own error
        with contextlib.suppress(TagError):
            parse_tag(items)
    head = prompt[:3_000]  # the regular expression, quadratic, as the reference on a prefix
    assert find_tags(head) == [match[1].split(":") for match in TAG_PATTERN.finditer(head)]
    assert strip_tags(head) == TAG_PATTERN.sub("", head)
