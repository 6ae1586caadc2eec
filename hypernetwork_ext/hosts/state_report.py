"""Training progress reported through a WebUI's ``shared.state`` (A1111, Forge, reForge, SD.Next):
job counts, textinfo, the live preview image, and the Interrupt buttons' flag."""

from __future__ import annotations

import html

from ..training import TrainingCallbacks, TrainingProgress


class StateReport:
    """Training progress as A1111 reports it: job counts, textinfo, the live preview image.

    The host's progress bar prints a one-line ``textinfo`` inside the bar, on one line that does
    not wrap; a text of several lines it leaves to the page. Every text here has several lines, as
    A1111's own trainer writes them: the bar keeps its percentage and ETA, the tab's progress panel
    shows the words (long saved paths included)."""

    def __init__(self, state) -> None:
        self.state = state
        self.last_copy = ""
        self.last_image = ""

    def progress(self, update: TrainingProgress) -> None:
        self.state.job_count = max(update.max_steps - update.start_step, 1)
        self.state.job_no = update.step - update.start_step
        self.last_copy = update.last_copy or self.last_copy
        loss = "-" if update.loss is None else f"{update.loss:.7f}"
        self.state.textinfo = (
            f"<p>\nLoss: {loss}<br/>\nStep: {update.step}<br/>\nLast prompt: {html.escape(update.last_prompt)}<br/>\n"
            f"Last saved hypernetwork: {html.escape(self.last_copy)}<br/>\n"
            f"Last saved image: {html.escape(self.last_image)}<br/>\n</p>"
        )

    def preview(self, image, path: str) -> None:
        self.last_image = path
        self.state.assign_current_image(image)

    def message(self, text: str) -> None:
        self.state.textinfo = f"<p>\n{html.escape(text)}\n</p>"

    def callbacks(self) -> TrainingCallbacks:
        return TrainingCallbacks(
            on_progress=self.progress,
            should_stop=lambda: bool(self.state.interrupted),
            on_preview=self.preview,
            on_message=self.message,
        )
