"""An unknown or malformed tag reaches API users: ``Hypernet warnings`` on the generation (A1111 stand-in)."""

from tests.support.tag_warnings import BAD_TAGS, KEY, check_reported_and_dropped_by_a_paste, generate_with


def run_model(p):
    unet = p.sd_model.model.diffusion_model
    return lambda x, t, context: unet(x, t, context=context)


def test_bad_tags_are_in_the_parameters_and_a_paste_drops_them(host, inputs):
    p = generate_with(host, f"a cat {BAD_TAGS} <hypernet:styles/ink:0.5>", run_model, inputs)
    warning = check_reported_and_dropped_by_a_paste(host, p)
    assert "styles/ink" not in warning
    assert any("no hypernetwork named 'nope'" in comment for comment in p.comments)  # the UI's comment stays


def test_a_good_prompt_has_no_warning_and_a_later_batch_forgets_an_earlier_one(host, inputs):
    assert KEY not in generate_with(host, "<hypernet:anime:0.8>", run_model, inputs).extra_generation_params
    p = generate_with(host, BAD_TAGS, run_model, inputs)
    p.prompt = "<hypernet:anime:0.8>"  # the next batch of the same job, its own prompts
    host.extension.activate(p, [["anime", "0.8"]])
    host.extension.finish()
    assert KEY not in p.extra_generation_params


def test_the_hires_pass_adds_its_own(host, inputs):
    p = generate_with(host, "<hypernet:nope:1>", run_model, inputs, enable_hr=True, hr_prompt="<hypernet:other:1>")
    warning = p.extra_generation_params[KEY]
    assert "'nope'" in warning and "'other'" in warning


def test_console_only_keeps_it_out_of_the_parameters(host, inputs):
    host.shared.opts.data["hypernetwork_unknown_name"] = "Console only"
    assert KEY not in generate_with(host, BAD_TAGS, run_model, inputs).extra_generation_params
