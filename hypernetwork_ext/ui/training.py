"""The hypernetwork training tab (Create + Train), for A1111 (gradio 3.41), Forge (4.40) and the app.

Services come in through a :class:`~hypernetwork_ext.training.jobs.TrainingJobs`; nothing here
imports the WebUI. The handlers are plain methods of :class:`TrainingTab`, so they can be called
(and tested) without a browser.
"""

from __future__ import annotations

import dataclasses
import html
import os
from collections.abc import Sequence

import gradio as gr

from ..errors import HypernetworkError, InvalidConfigError
from ..network import WEIGHT_INITS, usable_activation_names
from ..training.config import (
    CLIP_GRAD_MODES,
    LATENT_SAMPLING_METHODS,
    MIXED_PRECISION,
    PREVIEW_FIELDS,
    FieldProblems,
    TrainingConfig,
    load_preset,
    save_preset,
)
from ..training.jobs import CreateRequest, TrainingJobs
from ..training.optimizers import OPTIMIZERS
from ..training.schedules import LR_SCHEDULERS
from .compat import js_kwargs, poll, update

CREATE_FIELDS = (
    "name",
    "enable_sizes",
    "layer_structure",
    "activation_func",
    "weight_init",
    "weight_init_seed",
    "add_layer_norm",
    "use_dropout",
    "dropout_structure",
    "activate_output",
    "overwrite_old",
    "file_format",
)
ALL_WIDTHS = [768, 1024, 2048, 320, 640, 1280]
_DEFAULTS = TrainingConfig()
# What A1111 hands to Train tabs (UiTrainTabParams.txt2img_preview_params): the preview options, in their order.
TXT2IMG_PREVIEW_FIELDS = PREVIEW_FIELDS


@dataclasses.dataclass
class HostHooks:
    """What a WebUI adds to the tab; every member is optional.

    ``preview_sources``: the txt2img components of :data:`TXT2IMG_PREVIEW_FIELDS`, offered as
    "read the preview parameters from the txt2img tab". ``start_js``: a client-side function run
    when Train is clicked; it gets the inputs and returns them with the first (a hidden task id)
    filled in, as A1111's ``start_training_textual_inversion`` does.
    """

    preview_sources: Sequence = ()
    start_js: str | None = None


def _train_components(d: TrainingConfig = _DEFAULTS) -> list[tuple[str, gr.components.Component]]:
    """Every training option as (field, component), in a layout close to A1111's Train tab, showing ``d``'s values."""
    items: list[tuple[str, gr.components.Component]] = []

    def add(name, component):
        if not component.elem_id:  # stable ids for scripts, browser tests and user CSS
            component.elem_id = f"hnx_train_{name}"
        items.append((name, component))
        return component

    with gr.Row():
        add("learn_rate", gr.Textbox(label="Learning rate (schedule: 5e-5:100, 5e-6:1500, 1e-6)", value=d.learn_rate))
        add("batch_size", gr.Number(label="Batch size", value=d.batch_size, precision=0))
        add("gradient_step", gr.Number(label="Gradient accumulation steps", value=d.gradient_step, precision=0))
    with gr.Row():
        add(
            "clip_grad_mode",
            gr.Dropdown(label="Gradient clipping", choices=list(CLIP_GRAD_MODES), value=d.clip_grad_mode),
        )
        add("clip_grad_value", gr.Textbox(label="Clipping limit (schedule syntax)", value=d.clip_grad_value))
    add("data_root", gr.Textbox(label="Dataset directory", value=d.data_root))
    add("log_directory", gr.Textbox(label="Log directory", value=d.log_directory))
    with gr.Row():
        add("training_width", gr.Slider(label="Width", minimum=64, maximum=2048, step=8, value=d.training_width))
        add("training_height", gr.Slider(label="Height", minimum=64, maximum=2048, step=8, value=d.training_height))
        add("varsize", gr.Checkbox(label="Do not resize images", value=d.varsize))
        add("bucketing", gr.Checkbox(label="Aspect-ratio buckets", value=d.bucketing))
    add("steps", gr.Number(label="Max steps (counting earlier sessions)", value=d.steps, precision=0))
    with gr.Row():
        add(
            "create_image_every",
            gr.Number(label="Save an image every N steps, 0 to disable", value=d.create_image_every, precision=0),
        )
        add(
            "save_hypernetwork_every",
            gr.Number(label="Save a copy every N steps, 0 to disable", value=d.save_hypernetwork_every, precision=0),
        )
    with gr.Row():
        add("use_weight", gr.Checkbox(label="Use PNG alpha channel as loss weight", value=d.use_weight))
        add("shuffle_tags", gr.Checkbox(label="Shuffle tags by ',' when creating prompts", value=d.shuffle_tags))
        add("tag_drop_out", gr.Slider(label="Drop out tags", minimum=0, maximum=1, step=0.05, value=d.tag_drop_out))
        add("keep_tags", gr.Number(label="Keep the first N tags in place", value=d.keep_tags, precision=0))
    add(
        "latent_sampling_method",
        gr.Radio(label="Latent sampling method", choices=list(LATENT_SAMPLING_METHODS), value=d.latent_sampling_method),
    )
    with gr.Accordion("Preview", open=False):
        add(
            "preview_from_txt2img",
            gr.Checkbox(
                label="Use these preview settings (else: the batch's first caption)", value=d.preview_from_txt2img
            ),
        )
        add("preview_prompt", gr.Textbox(label="Preview prompt", value=d.preview_prompt))
        add("preview_negative_prompt", gr.Textbox(label="Preview negative prompt", value=d.preview_negative_prompt))
        with gr.Row():
            add("preview_steps", gr.Number(label="Steps", value=d.preview_steps, precision=0))
            add("preview_sampler_name", gr.Textbox(label="Sampler", value=d.preview_sampler_name))
            add("preview_cfg_scale", gr.Number(label="CFG scale", value=d.preview_cfg_scale))
            add("preview_seed", gr.Number(label="Seed", value=d.preview_seed, precision=0))
            add("preview_width", gr.Number(label="Width", value=d.preview_width, precision=0))
            add("preview_height", gr.Number(label="Height", value=d.preview_height, precision=0))
    with gr.Accordion("Beyond A1111: optimizer, schedule, loss, memory", open=False):
        with gr.Row():
            add("optimizer", gr.Dropdown(label="Optimizer", choices=list(OPTIMIZERS), value=d.optimizer))
            add("weight_decay", gr.Number(label="Weight decay", value=d.weight_decay))
            add("beta1", gr.Number(label="Beta 1", value=d.beta1))
            add("beta2", gr.Number(label="Beta 2", value=d.beta2))
        with gr.Row():
            add("lr_scheduler", gr.Dropdown(label="Rate curve", choices=list(LR_SCHEDULERS), value=d.lr_scheduler))
            add("lr_warmup_steps", gr.Number(label="Warm-up steps", value=d.lr_warmup_steps, precision=0))
            add("lr_cycles", gr.Number(label="Cosine cycles", value=d.lr_cycles, precision=0))
            add("lr_min_ratio", gr.Number(label="Cosine floor (fraction of the rate)", value=d.lr_min_ratio))
        with gr.Row():
            add("ema_decay", gr.Number(label="EMA decay (0 = off)", value=d.ema_decay))
            add("min_snr_gamma", gr.Number(label="Min-SNR gamma (0 = off)", value=d.min_snr_gamma))
            add("noise_offset", gr.Number(label="Noise offset", value=d.noise_offset))
            add(
                "caption_dropout",
                gr.Number(label="Caption dropout (-1 = auto: 0.1 on SDXL)", value=d.caption_dropout),
            )
        with gr.Row():
            add("validation_split", gr.Number(label="Held-out validation fraction", value=d.validation_split))
            add("validation_every", gr.Number(label="Validation every N steps", value=d.validation_every, precision=0))
            add(
                "fixed_loss_every",
                gr.Number(label="Loss at fixed noise every N steps (0 = off)", value=d.fixed_loss_every, precision=0),
            )
        with gr.Row():  # memory: what fits SD1.5 at 512 px in 6 GB (docs/training.md#memory)
            add(
                "gradient_checkpointing",
                gr.Checkbox(label="Gradient checkpointing (less memory, slower steps)", value=d.gradient_checkpointing),
            )
            add(
                "mixed_precision",
                gr.Dropdown(label="Mixed precision", choices=list(MIXED_PRECISION), value=d.mixed_precision),
            )
            add(
                "unload_models_when_training",
                gr.Checkbox(label="Text encoder and VAE off the GPU during steps", value=d.unload_models_when_training),
            )
        with gr.Row():
            add("seed", gr.Number(label="Seed (-1 = random)", value=d.seed, precision=0))
            add(
                "file_format",
                gr.Dropdown(label="File format of the result", choices=["", "pt", "safetensors"], value=d.file_format),
            )
            add("output_name", gr.Textbox(label="Result name (empty: <name>-<step>)", value=d.output_name))
            add("resume_from", gr.Textbox(label="Resume from a saved copy (path)", value=d.resume_from))
        with gr.Row():
            add(
                "save_optimizer_state",
                gr.Checkbox(label="Save optimizer state (.optim) for resuming", value=d.save_optimizer_state),
            )
            add(
                "training_write_csv_every",
                gr.Number(label="Write the loss CSV every N steps", value=d.training_write_csv_every, precision=0),
            )
            add(
                "training_enable_tensorboard", gr.Checkbox(label="TensorBoard log", value=d.training_enable_tensorboard)
            )
            add(
                "training_tensorboard_save_images",
                gr.Checkbox(label="Previews in TensorBoard", value=d.training_tensorboard_save_images),
            )
    return items


def loss_chart_html(losses: list, validation: list | None = None, width: int = 480, height: int = 160) -> str:
    """An inline SVG line chart of the loss (no plotting library, same on every gradio)."""
    if not losses:
        return "<div class='hnx-loss-chart'>No loss yet.</div>"
    points = [(float(s), float(v)) for s, v in losses]
    steps = [s for s, _ in points]
    values = [v for _, v in points] + [float(v) for _s, v in (validation or [])]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    first, last = min(steps), max(steps)
    step_span = (last - first) or 1.0

    def path(series):
        coords = [
            f"{8 + (s - first) / step_span * (width - 16):.1f},{height - 8 - (v - low) / span * (height - 24):.1f}"
            for s, v in series
        ]
        return " ".join(coords)

    # The drawing stretches to the width of its column (which the host decides) at a fixed height;
    # the lines keep their thickness, the label wraps.
    stroke = "fill='none' vector-effect='non-scaling-stroke'"
    lines = [f"<polyline {stroke} stroke='#e8773e' stroke-width='1.5' points='{path(points)}'/>"]
    if validation:
        lines.append(f"<polyline {stroke} stroke='#3e8ee8' stroke-width='2' points='{path(validation)}'/>")
    label = f"loss {points[-1][1]:.5f} at step {int(last)} (min {low:.5f}, max {high:.5f})"
    return (
        f"<div class='hnx-loss-chart'><svg viewBox='0 0 {width} {height}' preserveAspectRatio='none' "
        f"style='width: 100%; height: {height}px' role='img' aria-label='{html.escape(label)}'>{''.join(lines)}"
        f"</svg><div class='hnx-loss-label'>{html.escape(label)}</div></div>"
    )


def txt2img_preview(values: Sequence) -> dict:
    """The txt2img tab's values (prompt, negative, steps, sampler, CFG, seed, width, height) as
    preview options of the right types; an empty number keeps the default."""
    typed = {}
    for name, value in zip(TXT2IMG_PREVIEW_FIELDS, values, strict=True):
        default = getattr(_DEFAULTS, name)
        if value is None or value == "":
            typed[name] = default
        elif isinstance(default, str):
            typed[name] = str(value)
        elif isinstance(default, int):
            typed[name] = int(float(value))
        else:
            typed[name] = float(value)
    return typed


def _error(text: str | None) -> str:
    return f"<span class='hnx-field-error'>{html.escape(text)}</span>" if text else ""


@dataclasses.dataclass
class TrainingTab:
    jobs: TrainingJobs
    create_inputs: dict = dataclasses.field(default_factory=dict)
    create_errors: dict = dataclasses.field(default_factory=dict)
    train_inputs: dict = dataclasses.field(default_factory=dict)
    train_errors: object = None
    current_job: str | None = None
    list_components: list = dataclasses.field(default_factory=list)
    # What the fields show first: A1111's defaults, or sized for the model loaded (the local app).
    defaults: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)

    # -- handlers ---------------------------------------------------------------------------
    def network_names(self) -> list[str]:
        return self.jobs.services.names()

    def default_sizes(self):
        """The Create tab's widths for the model loaded now (offered, and ticked)."""
        widths = self.jobs.services.new_network_widths()
        return update(choices=width_choices(widths), value=[str(w) for w in widths])

    def lists(self):
        """Fresh choices for the network, template and preset lists (after a reload too)."""
        return (
            update(choices=self.network_names()),
            update(choices=self.template_names()),
            update(choices=self.preset_names()),
        )

    def template_names(self) -> list[str]:
        return sorted(self.jobs.services.templates())

    def create(self, *values):
        """-> (result message, one error per create field, network dropdown update)."""
        request = dict(zip(CREATE_FIELDS, values, strict=True))
        request["enable_sizes"] = [int(w) for w in request["enable_sizes"] or []]
        request["weight_init_seed"] = int(
            request["weight_init_seed"] if request["weight_init_seed"] is not None else -1
        )
        errors = dict.fromkeys(CREATE_FIELDS, "")
        try:
            created = self.jobs.create(CreateRequest(**request))
            message = f"Created {html.escape(created['path'])} ({created['parameters']:,} parameters)"
        except FieldProblems as exc:
            errors.update({name: _error(problem) for name, problem in exc.problems.items()})
            message = "Not created: see the fields marked below."
        except HypernetworkError as exc:
            message = f"Not created: {html.escape(str(exc))}"
        return (message, *[errors[name] for name in CREATE_FIELDS], update(choices=self.network_names()))

    def config_from(self, network: str, template: str, values) -> TrainingConfig:
        options = dict(zip(self.train_inputs, values, strict=True))
        for name, value in options.items():
            default = getattr(self.defaults, name)
            if isinstance(default, bool):
                options[name] = bool(value)
            elif isinstance(default, int):
                options[name] = int(value) if value is not None else default
            elif isinstance(default, float):
                options[name] = float(value) if value is not None else default
            elif value is None:
                options[name] = default
        return TrainingConfig.from_dict(
            {**options, "hypernetwork_name": network or "", "template_filename": template or ""}, base=self.defaults
        )

    def start(self, network: str, template: str, *values, task_id: str | None = None, txt2img=None) -> str:
        """Start a job from the tab's values; ``txt2img`` (the host's preview values, in
        :data:`TXT2IMG_PREVIEW_FIELDS` order) replaces the preview fields when given."""
        try:
            config = self.config_from(network, template, values)
            if txt2img is not None:
                config = config.replace(preview_from_txt2img=True, **txt2img_preview(txt2img))
            self.current_job = self.jobs.start(config, task_id=task_id)
        except FieldProblems as exc:
            rows = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in exc.problems.items())
            return f"<div class='hnx-field-error'>Not started:<ul>{rows}</ul></div>"
        except (InvalidConfigError, HypernetworkError) as exc:
            return f"<div class='hnx-field-error'>Not started: {html.escape(str(exc))}</div>"
        return f"Training started (job {self.current_job})."

    def start_from_host(self, task_id: str, network: str, template: str, *rest) -> str:
        """The Train button under a host: a task id first, then the tab's values, then the
        "from txt2img" checkbox and the txt2img values when the host gave preview sources."""
        values, extra = rest[: len(self.train_inputs)], rest[len(self.train_inputs) :]
        txt2img = list(extra[1:]) if extra and extra[0] else None
        return self.start(network, template, *values, task_id=task_id or None, txt2img=txt2img)

    def interrupt(self) -> str:
        job = self.jobs.latest()
        if job is None or not job.active:
            return "Nothing is training."
        self.jobs.interrupt(job.id)
        return "Interrupting: the network is saved at the step reached."

    def refresh(self):
        """-> (progress HTML, loss chart HTML, preview gallery)."""
        job = self.jobs.latest()
        if job is None:
            return "No training yet.", loss_chart_html([]), []
        percent = f"{job.progress * 100:.1f}%"
        loss = "-" if job.last_loss is None else f"{job.last_loss:.7f}"
        parts = [
            f"<div class='hnx-progress'><b>{html.escape(job.state)}</b> step {job.step}/{job.max_steps} ({percent})",
            f"<br>Loss: {loss}",
        ]
        if job.validation_loss is not None:
            parts.append(f"<br>Validation loss: {job.validation_loss:.7f}")
        if job.fixed_losses:
            (first_step, first), (step, latest) = job.fixed_losses[0], job.fixed_losses[-1]
            parts.append(f"<br>Loss at fixed noise: {first:.7f} at step {first_step}, {latest:.7f} at step {step}")
        if job.last_prompt:
            parts.append(f"<br>Last prompt: {html.escape(job.last_prompt)}")
        if job.skipped_count:
            parts.append(f"<br>Samples skipped (not finite, see the message): {job.skipped_count}")
        if job.message:
            parts.append(f"<br>{html.escape(job.message)}")
        parts.append("</div>")
        gallery = [path for path in job.previews if os.path.isfile(path)]
        return "".join(parts), loss_chart_html(job.losses), gallery

    def save_preset_file(self, preset_name: str, network: str, template: str, *values) -> str:
        directory = self.jobs.services.presets_dir
        if not directory or not preset_name.strip():
            return "Give the preset a name (and the host a presets folder)."
        try:
            config = self.config_from(network, template, values)
            path = save_preset(config, os.path.join(directory, f"{preset_name.strip()}.json"), overwrite=True)
        except (InvalidConfigError, HypernetworkError) as exc:
            return f"Preset not saved: {html.escape(str(exc))}"
        return f"Preset saved to {html.escape(path)}"

    def load_preset_file(self, preset_name: str, network: str, template: str, *values):
        directory = self.jobs.services.presets_dir or ""
        try:
            base = self.config_from(network, template, values)
            config = load_preset(os.path.join(directory, f"{preset_name}.json"), base=base)
        except (InvalidConfigError, HypernetworkError) as exc:
            return (f"Preset not loaded: {html.escape(str(exc))}", template, *values)
        return (
            f"Preset {html.escape(preset_name)} loaded.",
            config.template_filename,
            *[getattr(config, name) for name in self.train_inputs],
        )

    def preset_names(self) -> list[str]:
        directory = self.jobs.services.presets_dir
        if not directory or not os.path.isdir(directory):
            return []
        return sorted(os.path.splitext(n)[0] for n in os.listdir(directory) if n.endswith(".json"))


def build_training_tab(
    jobs: TrainingJobs,
    *,
    blocks: gr.Blocks,
    poll_seconds: float = 1.0,
    host: HostHooks | None = None,
    defaults: TrainingConfig | None = None,
) -> TrainingTab:
    """Build the tab inside the current gradio context (``blocks`` is the enclosing Blocks);
    ``defaults`` are the options it shows first (A1111's when not given)."""
    tab = TrainingTab(jobs, defaults=defaults or _DEFAULTS)
    with gr.Row():
        with gr.Column(scale=3), gr.Tabs():
            with gr.Tab("Create hypernetwork"):
                _build_create(tab)
            with gr.Tab("Train hypernetwork"):
                _build_train(tab, host or HostHooks())
        with gr.Column(scale=2, min_width=360, elem_id="hnx_train_output"):
            progress = gr.HTML("No training yet.", elem_id="hnx_train_progress")
            chart = gr.HTML(loss_chart_html([]), elem_id="hnx_train_loss_chart")
            gallery = gr.Gallery(label="Previews", elem_id="hnx_train_gallery", columns=4)
    poll(tab.refresh, [], [progress, chart, gallery], poll_seconds, blocks=blocks)
    # A host may still be loading its checkpoint while the tab is built: widths follow it on page load,
    # and the lists show what exists now, not what existed when the page was built.
    blocks.load(tab.default_sizes, inputs=[], outputs=[tab.create_inputs["enable_sizes"]])
    blocks.load(tab.lists, inputs=[], outputs=tab.list_components)
    return tab


def width_choices(model_widths: Sequence[int]) -> list[str]:
    """The widths Create offers: the model's first, then every Stable Diffusion width."""
    return [str(w) for w in dict.fromkeys([*model_widths, *ALL_WIDTHS])]


def _build_create(tab: TrainingTab) -> None:
    widths = tab.jobs.services.new_network_widths()
    factories = {
        "name": lambda: gr.Textbox(label="Name", elem_id="hnx_create_name"),
        "enable_sizes": lambda: gr.CheckboxGroup(
            label="Modules (widths)", choices=width_choices(widths), value=[str(w) for w in widths]
        ),
        "layer_structure": lambda: gr.Textbox(label="Layer structure", value="1, 2, 1"),
        "activation_func": lambda: gr.Dropdown(
            label="Activation function", choices=usable_activation_names(), value="linear"
        ),
        "weight_init": lambda: gr.Dropdown(label="Weight initialization", choices=list(WEIGHT_INITS), value="Normal"),
        "weight_init_seed": lambda: gr.Number(label="Initialization seed (-1 = random)", value=-1, precision=0),
        "add_layer_norm": lambda: gr.Checkbox(label="Add layer normalization", value=False),
        "use_dropout": lambda: gr.Checkbox(label="Use dropout", value=False),
        "dropout_structure": lambda: gr.Textbox(label="Dropout structure (e.g. 0, 0.05, 0)", value="0, 0, 0"),
        "activate_output": lambda: gr.Checkbox(label="Activate the output layer too", value=False),
        "overwrite_old": lambda: gr.Checkbox(label="Overwrite an existing network", value=False),
        "file_format": lambda: gr.Radio(label="File format", choices=["pt", "safetensors"], value="pt"),
    }
    for name in CREATE_FIELDS:  # each field with its own error line right under it
        tab.create_inputs[name] = factories[name]()
        tab.create_errors[name] = gr.HTML("", elem_id=f"hnx_create_error_{name}")
    tab.create_button = gr.Button("Create hypernetwork", variant="primary", elem_id="hnx_create_button")
    tab.create_result = gr.HTML("", elem_id="hnx_create_result")


def _build_train(tab: TrainingTab, host: HostHooks) -> None:
    with gr.Row():
        network = gr.Dropdown(label="Hypernetwork", choices=tab.network_names(), elem_id="hnx_train_network")
        refresh = gr.Button("Refresh lists", elem_id="hnx_train_refresh")
        template = gr.Dropdown(
            label="Prompt template",
            choices=tab.template_names(),
            value=_DEFAULTS.template_filename,
            elem_id="hnx_train_template",
        )
    with gr.Row():
        preset = gr.Dropdown(label="Preset", choices=tab.preset_names(), allow_custom_value=True)
        load = gr.Button("Load preset")
        save = gr.Button("Save preset")
    items = _train_components(tab.defaults)
    tab.train_inputs = dict(items)
    host_inputs = []
    if host.preview_sources:
        from_txt2img = gr.Checkbox(
            label="Read parameters (prompt, etc...) from txt2img tab when making previews",
            value=False,
            elem_id="hnx_train_preview_from_txt2img_tab",
        )
        host_inputs = [from_txt2img, *host.preview_sources]
    with gr.Row():
        start = gr.Button("Train hypernetwork", variant="primary", elem_id="hnx_train_start")
        stop = gr.Button("Interrupt", elem_id="hnx_train_interrupt")
    message = gr.HTML("", elem_id="hnx_train_message")
    values = [component for _name, component in items]
    if host.start_js or host_inputs:
        task_id = gr.Textbox("", visible=False, elem_id="hnx_train_task_id")
        start.click(
            tab.start_from_host,
            inputs=[task_id, network, template, *values, *host_inputs],
            outputs=[message],
            **(js_kwargs(host.start_js) if host.start_js else {}),
        )
    else:
        start.click(tab.start, inputs=[network, template, *values], outputs=[message])
    stop.click(tab.interrupt, inputs=[], outputs=[message])
    save.click(tab.save_preset_file, inputs=[preset, network, template, *values], outputs=[message])
    load.click(tab.load_preset_file, inputs=[preset, network, template, *values], outputs=[message, template, *values])
    tab.list_components = [network, template, preset]
    refresh.click(tab.lists, inputs=[], outputs=tab.list_components)
    tab.create_button.click(
        tab.create,
        inputs=[tab.create_inputs[name] for name in CREATE_FIELDS],
        outputs=[tab.create_result, *[tab.create_errors[name] for name in CREATE_FIELDS], network],
    )


def training_blocks(jobs: TrainingJobs, *, poll_seconds: float = 1.0) -> tuple[gr.Blocks, TrainingTab]:
    """A standalone Blocks holding the tab (for ``on_ui_tabs`` or the local app)."""
    with gr.Blocks(analytics_enabled=False) as blocks:
        tab = build_training_tab(jobs, blocks=blocks, poll_seconds=poll_seconds)
    return blocks, tab
