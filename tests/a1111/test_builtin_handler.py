"""The setting that hands tags back to A1111's own hypernetwork code (for comparisons and
benchmarks/host_generation.py): then nothing of the extension acts; off again, A1111's networks are
kept aside so that they never act together with the extension's, and come back for its next turn."""

import sys

import torch

import hypernetwork_ext as hx
from tests.support.reference import reference_model
from tests.support.webui_generation import generate, sample
from tests.support.webui_standin import StableDiffusionProcessing

KEY = "hypernetwork_builtin_handler"


def watch(host):
    """The UNet calls' pre-hooks and A1111's list of loaded networks, seen at every UNet call; and the
    list A1111's handler found when called."""
    unet = host.shared.sd_model.model.diffusion_model
    seen, found = [], []
    builtin = sys.modules["hypernetwork_ext.hosts.webui"].PATCH.replaced_handler
    original = builtin.activate

    def activate(p, params_list):
        found.append(list(host.shared.loaded_hypernetworks))
        original(p, params_list)

    builtin.activate = activate

    def runner(p):
        def run(x, t, context):
            seen.append(
                (sum(len(m._forward_pre_hooks) for m in unet.modules()), list(host.shared.loaded_hypernetworks))
            )
            return unet(x, t, context=context)

        return run

    return runner, seen, found


def render(host, inputs, prompt, runner):
    p = StableDiffusionProcessing(sd_model=host.shared.sd_model, prompt=prompt)
    (latent,) = generate(host, p, inputs, runner)
    return latent


def test_a1111s_code_handles_the_tags_and_ours_never_acts_with_it(host, inputs):
    runner, seen, found = watch(host)
    unet = host.shared.sd_model.model.diffusion_model
    plain = render(host, inputs, "a cat", runner)

    host.shared.opts.data[KEY] = True
    builtin = render(host, inputs, "a cat <hypernet:anime:0.8>", runner)
    assert seen[-1] == (0, ["anime"]) and torch.equal(builtin, plain)  # the stand-in's own code computes nothing

    host.shared.opts.data[KEY] = False
    ours = render(host, inputs, "a cat <hypernet:anime:0.8>", runner)
    assert seen[-1][0] > 0 and seen[-1][1] == []  # A1111's networks kept aside while ours act
    twin = reference_model(unet, [(hx.load(host.hypernetwork_dir / "anime.pt"), 0.8)])
    p = StableDiffusionProcessing(sd_model=host.shared.sd_model, prompt="")
    want = sample(host, p, inputs, 4, lambda x, t, context: twin(x, t, context=context))
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)

    host.shared.opts.data[KEY] = True
    render(host, inputs, "a cat <hypernet:anime:0.8>", runner)
    assert found[-1] == ["anime"]  # what A1111 had loaded came back before its handler ran
    assert seen[-1] == (0, ["anime"])


def test_the_setting_exists_on_a1111_only(host):
    from hypernetwork_ext.ui.settings import SETTINGS

    assert KEY in host.shared.opts.data_labels
    assert [s.key for s in SETTINGS if s.a1111_only] == [KEY]
