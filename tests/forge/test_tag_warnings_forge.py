"""What Forge users get about tags: an unknown or malformed one reaches API users as on A1111
(``Hypernet warnings``); no setting about A1111's own hypernetwork code, which Forge lacks."""

from tests.support.tag_warnings import BAD_TAGS, check_reported_and_dropped_by_a_paste, generate_with


def test_bad_tags_are_in_the_parameters_and_a_paste_drops_them(forge, inputs):
    p = generate_with(forge, f"a cat {BAD_TAGS} <hypernet:ink:0.5>", forge.runner.run, inputs)
    check_reported_and_dropped_by_a_paste(forge, p)


def test_no_setting_about_a1111s_own_code_on_forge(forge):
    """Forge's built-in tag has no effect (Forge #275): nothing to hand tags back to."""
    assert "hypernetwork_builtin_handler" not in forge.shared.opts.data_labels
