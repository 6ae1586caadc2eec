"""Runs last (by name): after every generation with tags, the host is as it was, and its log is clean."""

from __future__ import annotations

from tests.hosts.real_host import extension_tracebacks, max_difference


def test_no_tag_image_is_unchanged_after_all_tags(suite):
    rendered = suite.server.txt2img(suite.plain)
    suite.save("no-tag-after-everything", rendered)
    assert max_difference(rendered, suite.before_tags) == 0


def test_the_launcher_ran_install_py(suite):
    if suite.kind == "sdnext":  # SD.Next runs it in a subprocess and logs that, not what it printed
        log = (suite.config.folder / "sdnext.log").read_text(errors="replace")  # started afresh by each start
        installer = str(suite.config.extension_dir / "install.py")
        assert f'Extension installer: builtin=False file="{installer}"' in log
        assert "Extension installer error" not in log
        return
    assert "[Hypernetworks] install.py:" in suite.server.log()


def test_no_traceback_from_the_extension_in_the_server_log(suite):
    tracebacks = extension_tracebacks(suite.server.log())
    assert not tracebacks, "\n\n".join(tracebacks[:3])
