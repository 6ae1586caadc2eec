"""Run by the WebUI before it parses its command line (A1111, Forge, reForge, Forge Classic, SD.Next).

Forge Classic removed ``--hypernetwork-dir`` (January 2025), and extensions that read
``shared.cmd_opts.hypernetwork_dir`` (tag autocomplete, Civitai Helper, ...) then fail with an
AttributeError. Where the host lacks the option, it comes back here with A1111's name, default and
help; where the host has it, nothing changes (SD.Next keeps it hidden, with no default, and has no
``paths_internal.models_path``). Imports nothing of the extension.
"""

from __future__ import annotations

import argparse
import os

OPTION = "--hypernetwork-dir"


def preload(parser: argparse.ArgumentParser) -> None:
    if has_option(parser, OPTION):
        return  # the host's own option (adding it again is an argparse conflict)
    from modules.paths_internal import models_path, normalized_filepath

    parser.add_argument(
        OPTION,
        type=normalized_filepath,
        default=os.path.join(models_path, "hypernetworks"),
        help="hypernetwork directory",
    )


def has_option(parser: argparse.ArgumentParser, option: str) -> bool:
    # argparse has no public way to ask; its ``_option_string_actions`` is what add_argument checks
    return option in getattr(parser, "_option_string_actions", {})
