"""An unknown or malformed tag reaches API users on Forge as on A1111: ``Hypernet warnings``."""

from tests.support.tag_warnings import BAD_TAGS, check_reported_and_dropped_by_a_paste, generate_with


def test_bad_tags_are_in_the_parameters_and_a_paste_drops_them(forge, inputs):
    p = generate_with(forge, f"a cat {BAD_TAGS} <hypernet:ink:0.5>", forge.runner.run, inputs)
    check_reported_and_dropped_by_a_paste(forge, p)
