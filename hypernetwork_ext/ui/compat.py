"""The few gradio differences between 3.41 (A1111), 4.40 (Forge) and current gradio (the app).

Detection is by feature or major version of the installed gradio, never by host name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gradio as gr
from gradio.context import Context

GRADIO_MAJOR = int(gr.__version__.split(".", 1)[0])


def js_kwargs(code: str) -> dict:
    """The keyword that attaches client-side code to an event: ``_js`` on 3.x, ``js`` from 4.0."""
    return {"_js": code} if GRADIO_MAJOR < 4 else {"js": code}


def update(**kwargs):
    """A property update for any component (``gr.update`` exists in every supported version)."""
    return gr.update(**kwargs)


def poll(fn: Callable, inputs: Sequence, outputs: Sequence, seconds: float, *, blocks: gr.Blocks) -> None:
    """Call ``fn`` every ``seconds`` while the page is open (inside a ``gr.Blocks`` context).

    gradio >= 4.40 has ``gr.Timer``; 3.41 runs a repeating ``load`` event via ``every=``. Either way
    the outputs show no pending state: a poll is always pending, and gradio 3.41 would outline them
    in orange for as long as the page is open.
    """
    timer_cls = getattr(gr, "Timer", None)
    if timer_cls is not None:
        timer_cls(seconds).tick(fn, inputs=list(inputs), outputs=list(outputs), show_progress="hidden")
    else:
        blocks.load(fn, inputs=list(inputs), outputs=list(outputs), every=seconds, show_progress="hidden")


def enclosing_blocks() -> gr.Blocks | None:
    """The outermost ``gr.Blocks`` being built (a host's tab callback gets no Blocks of its own)."""
    return Context.root_block


def launch_kwargs(blocks: gr.Blocks, **wanted) -> dict:
    """The subset of ``wanted`` this gradio's ``Blocks.launch`` accepts (``show_api`` left in 6.0)."""
    import inspect

    accepted = inspect.signature(blocks.launch).parameters
    return {key: value for key, value in wanted.items() if key in accepted}
