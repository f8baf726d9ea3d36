"""Reports write runs of consecutively numbered members as ``first..last``."""

from __future__ import annotations

import random

import patternc
from patternc.members import abbreviate_members
from patternc.report import format_program


def test_runs_of_four_or_more_members_are_abbreviated() -> None:
    frames = [f"frame{i}" for i in range(6)]
    assert abbreviate_members(["prompt", *frames]) == "prompt, frame0..frame5"
    assert abbreviate_members(frames[:3]) == "frame0, frame1, frame2"
    assert abbreviate_members([f"doc{i}.text" for i in range(2, 7)]) == "doc2.text..doc6.text"
    assert abbreviate_members([f"f{i}[causal]" for i in range(4)]) == "f0[causal]..f3[causal]"
    assert abbreviate_members([f"f{i}[back 3]" for i in range(4)]) == "f0[back 3]..f3[back 3]"


def test_what_does_not_follow_on_is_listed_as_given() -> None:
    gap = ["frame0", "frame1", "frame2", "frame4", "frame5", "frame6", "frame7"]
    assert abbreviate_members(gap) == "frame0, frame1, frame2, frame4..frame7"
    mixed = ["a0", "a1", "b2", "a3", "a4[causal]", "a5", "a6", "a7", "a8"]
    assert abbreviate_members(mixed) == "a0, a1, b2, a3, a4[causal], a5..a8"
    assert abbreviate_members([]) == ""
    assert abbreviate_members(["x", "y"]) == "x, y"


def test_every_member_is_recoverable_from_the_abbreviation() -> None:
    rng = random.Random(3)
    for _ in range(200):
        names = [
            f"{rng.choice('ab')}{rng.randint(0, 9)}{rng.choice(['', '.text'])}"
            for _ in range(rng.randint(0, 12))
        ]
        expanded: list[str] = []
        for piece in abbreviate_members(names).split(", ") if names else []:
            if ".." not in piece:
                expanded.append(piece)
                continue
            first, last = piece.split("..")
            head, tail = first[0], first[2:]
            expanded += [f"{head}{n}{tail}" for n in range(int(first[1]), int(last[1]) + 1)]
        assert expanded == names


def test_the_compile_report_of_block_causal_frames_grows_with_the_members() -> None:
    program = patternc.compile("groups prompt frame*\nprompt -> self\nframe* -> prompt, frame*[upto]")
    sizes = {"prompt": 4, **{f"frame{i}": 3 for i in range(40)}}
    text = format_program(program, sizes=sizes)
    assert "prompt, frame0..frame39" in text
    assert "frame17, frame18" not in text
    sharded = format_program(program, sizes=sizes, world_size=4)
    assert "`frame39 -> prompt, frame0..frame39`" in sharded
