"""After everything else: ComfyUI's log holds no traceback that passes through the node pack."""

from __future__ import annotations

import re
from collections import Counter

from tests.comfyui.comfy_host import PACK_FOLDER


def tracebacks(log: str) -> list[str]:
    """Each 'Traceback ...' block of the log, to the first line that is not part of it."""
    blocks = []
    for match in re.finditer(
        r"Traceback \(most recent call last\):\n((?:[ \t].*\n|\S+Error.*\n|\S+Exception.*\n)+)", log
    ):
        blocks.append(match.group(0))
    return blocks


def test_no_traceback_from_the_node_pack(comfy):
    log = comfy.server.log()
    ours = [block for block in tracebacks(log) if "hypernetwork_ext" in block or PACK_FOLDER in block]
    failed_import = [line for line in log.splitlines() if "Cannot import" in line and PACK_FOLDER in line]
    others = [block for block in tracebacks(log) if block not in ours]
    kinds = Counter(block.rstrip().splitlines()[-1][:100] for block in others)
    print(
        f"\n[comfyui] log: {len(ours)} tracebacks through the node pack, {len(others)} from ComfyUI itself: {dict(kinds)}"
    )
    assert ours == [] and failed_import == []
    assert re.search(rf"seconds: .*custom_nodes/{PACK_FOLDER}\n", log)  # imported, with its time


def test_the_check_sees_a_traceback():
    log = 'Traceback (most recent call last):\n  File "/x/custom_nodes/sd-webui-hypernetworks/hypernetwork_ext/a.py", line 1\nValueError: boom\n'
    assert len(tracebacks(log)) == 1 and "hypernetwork_ext" in tracebacks(log)[0]
