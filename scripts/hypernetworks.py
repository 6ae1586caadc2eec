"""The file the WebUI runs: registers the extension; everything else lives in ``hypernetwork_ext``."""

from hypernetwork_ext.hosts import webui_training  # noqa: F401  (adds the training tab's registration)
from hypernetwork_ext.hosts.webui import HypernetworkScript, register_all

__all__ = ["HypernetworkScript"]

register_all()
