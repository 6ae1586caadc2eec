"""Finding ``<hypernet:...>`` tags in hostile prompts: the regular expression against the linear scanner.

    python benchmarks/prompt_scan.py           # prompts of 1,000 to 30,000 characters (~30 s, 2 cores)
    python benchmarks/prompt_scan.py --full    # also 100,000 (the expression takes 30-60 s on some)

``regex`` is ``TAG_PATTERN.finditer`` (what ``find_tags`` used): from every ``<hypernet:`` that no
``>`` closes it searches to the end of the prompt, so its time grows with the square of the length.
``scanner`` is ``find_tags`` now. Both must find the same tags; ``ratio`` is regex / scanner.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypernetwork_ext.syntax import TAG_PATTERN, find_tags

KINDS = {
    "unclosed tags": "<hypernet:",
    "unclosed, with names": "<hypernet:name:0.8 ",
    "closed tags": "<hypernet:a:0.5>",
    "backslashes": "<hypernet:\\",
    "nested openings": "<",
}


def _seconds(function, prompt: str) -> tuple[float, list]:
    started = time.perf_counter()
    result = function(prompt)
    return time.perf_counter() - started, result


def _regex(prompt: str) -> list[list[str]]:
    return [match[1].split(":") for match in TAG_PATTERN.finditer(prompt)]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="add 100,000-character prompts")
    parser.add_argument("--sizes", help="comma-separated prompt lengths (overrides the defaults)")
    args = parser.parse_args(argv)
    sizes = [1_000, 10_000, 30_000] + ([100_000] if args.full else [])
    if args.sizes:
        sizes = [int(size) for size in args.sizes.split(",")]
    rows = []
    print(f"{'prompt':24} {'chars':>8} {'regex s':>9} {'scanner s':>10} {'ratio':>8}")
    for kind, unit in KINDS.items():
        for size in sizes:
            prompt = (unit * (size // len(unit) + 1))[:size]
            regex_seconds, expected = _seconds(_regex, prompt)
            scanner_seconds, found = _seconds(find_tags, prompt)
            if found != expected:
                raise AssertionError(f"{kind}, {size}: the scanner and the expression disagree")
            ratio = regex_seconds / max(scanner_seconds, 1e-9)
            rows.append({"kind": kind, "chars": size, "regex": regex_seconds, "scanner": scanner_seconds})
            print(f"{kind:24} {size:>8,} {regex_seconds:>9.4f} {scanner_seconds:>10.5f} {ratio:>8.0f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
