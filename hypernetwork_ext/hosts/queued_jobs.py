"""Training jobs in a WebUI's queue (A1111, Forge, reForge, Forge Classic, SD.Next): a job's task
joins the host's progress bar, a start the host cannot run now is refused before it queues, and an
interrupt also raises the host's flag, which cuts a preview's sampling short."""

from __future__ import annotations

from modules import progress, shared

from ..errors import HypernetworkError
from ..training import TrainingConfig
from ..training.config import FieldProblems
from ..training.jobs import TrainingJobs


class QueuedTrainingJobs(TrainingJobs):
    """Jobs that refuse what the host cannot do, queue their task for the progress bar, and stop
    a preview in progress when interrupted. Each host's glue says what it refuses."""

    def refusal(self) -> str | None:
        """Why the host cannot train now (no checkpoint, an unsupported model); None when it can."""
        return None

    def preview_sampler_problem(self, config: TrainingConfig) -> str | None:
        """What is wrong with the preview's sampler name in this host; None when nothing is."""
        return None

    def start(self, config: TrainingConfig | dict, *, task_id: str | None = None) -> str:
        if task_id:
            progress.add_task_to_queue(task_id)
        try:
            problem = self.refusal()
            if problem:
                raise HypernetworkError(problem)
            if isinstance(config, dict):
                config = TrainingConfig.from_dict(config)
            problem = self.preview_sampler_problem(config)
            if problem:
                raise FieldProblems({"preview_sampler_name": problem})
            return super().start(config, task_id=task_id)
        except Exception:
            if task_id:  # the progress bar ends at once instead of waiting for a task that never comes
                getattr(progress, "pending_tasks", {}).pop(task_id, None)
                progress.finish_task(task_id)
            raise

    def interrupt(self, job_id: str) -> bool:
        if self.status(job_id).state == "running":  # it holds the queue: the flag also cuts a preview short
            shared.state.interrupt()
        return super().interrupt(job_id)
