"""The file the WebUI runs: registers the extension; everything else lives in ``hypernetwork_ext``."""

from hypernetwork_ext.hosts.sdnext import running_in_sdnext

if running_in_sdnext():  # diffusers pipelines, SD.Next's own page and handler API
    from hypernetwork_ext.hosts import sdnext_training  # noqa: F401  (adds the training tab's registration)
    from hypernetwork_ext.hosts.sdnext_webui import HypernetworkScript, register_all
else:  # A1111, Forge, reForge
    from hypernetwork_ext.hosts import webui_training  # noqa: F401  (adds the training tab's registration)
    from hypernetwork_ext.hosts.webui import HypernetworkScript, register_all

__all__ = ["HypernetworkScript"]

register_all()
