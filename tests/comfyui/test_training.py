"""Train Hypernetwork in the real ComfyUI: 20 steps at 64 px, the loss falls, the result renders at once."""

from __future__ import annotations

import json
import statistics

from tests.comfyui import graphs
from tests.comfyui.comfy_host import max_difference
from tests.comfyui.conftest import DATASET, TRAINED
from tests.comfyui.test_render import EFFECT
from tests.hosts.real_host import TOLERANCE

STEPS = 20


def training_workflow(model, name: str) -> dict:
    workflow = model.workflow().build()
    workflow["train"] = {
        "class_type": "TrainHypernetwork",
        "inputs": {
            "model": ["ckpt", 0],
            "clip": ["ckpt", 1],
            "vae": ["ckpt", 2],
            "folder": DATASET,
            "name": name,
            "hypernetwork": "[new]",
            "steps": STEPS,
            "learning_rate": "0.001",
            "batch_size": 2,
            "width": 64,
            "height": 64,
            "seed": 1,
            "layer_structure": "1, 2, 1",
            "activation": "relu",
            "layer_norm": False,
        },
    }
    workflow["sample"]["inputs"]["model"] = ["train", 0]  # render with the training node's own MODEL
    workflow["show_name"] = {"class_type": "PreviewAny", "inputs": {"source": ["train", 1]}}
    workflow["show_loss"] = {"class_type": "PreviewAny", "inputs": {"source": ["train", 2]}}
    workflow["show_steps"] = {"class_type": "PreviewAny", "inputs": {"source": ["train", 3]}}
    return workflow


def test_training_node_trains_and_its_result_renders(comfy, model):
    entry = comfy.run(training_workflow(model, f"{TRAINED}{model.suffix}"))
    outputs = entry["outputs"]
    name = outputs["show_name"]["text"][0]
    losses = json.loads(outputs["show_loss"]["text"][0])["loss"]
    steps = int(outputs["show_steps"]["text"][0])
    trained_image = comfy.server.image(outputs["save"]["images"][0])
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    print(
        f"\n[comfyui] {model.label} trained {name}: {steps} steps in {entry['seconds']:.0f} s; loss first 5 mean {first:.4f}, "
        f"last 5 mean {last:.4f}; losses {[round(loss, 4) for loss in losses]}"
    )
    assert steps == STEPS and len(losses) == STEPS
    assert name.endswith(".safetensors") and (comfy.config.hypernetwork_dir / name).is_file()
    assert last < first

    # Usable at once: listed for the loader, and by name in a prompt.
    assert name in comfy.server.object_info("HypernetworkLoaderA1111")["input"]["required"]["hypernetwork_name"][0]
    loaded = comfy.render(graphs.with_nodes(model.workflow(), graphs.ours(name, 1.0)))
    stem = name.rsplit("/", 1)[-1].removesuffix(".safetensors")
    text = f"a red circle <hypernet:{stem}:1>"
    tagged = comfy.render(graphs.with_nodes(model.workflow(prompt=text), ("HypernetworksFromPrompt", {"text": text})))
    comfy.save(f"{model.label}-trained", loaded)
    effect = max_difference(loaded, comfy.baseline(model))
    print(
        f"[comfyui] {model.label} trained network: effect max {effect}/255; loader vs the training node's MODEL max "
        f"{max_difference(loaded.pixels, _pixels(trained_image))}/255; prompt tag vs loader {max_difference(tagged, loaded)}/255"
    )
    assert effect > EFFECT
    assert max_difference(loaded.pixels, _pixels(trained_image)) <= TOLERANCE
    assert max_difference(tagged, loaded) <= TOLERANCE


def _pixels(image):
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.int16)
