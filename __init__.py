"""The ComfyUI node pack: ComfyUI imports this file when the repository is cloned into ``custom_nodes/``.

A1111, Forge and reForge never import it (they run ``scripts/*.py``). Anything else that imports it
(pytest treats the checkout as a package because of this file) gets an empty module: the nodes load
only inside ComfyUI, which has imported its ``folder_paths`` before any node pack. The package is
found by appending this folder to ``sys.path`` (at the end: nothing of ComfyUI's is shadowed), as the
WebUIs put an extension's folder there.
"""

import sys

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

if "folder_paths" in sys.modules:
    import os

    _here = os.path.dirname(os.path.abspath(__file__))
    if _here not in sys.path:
        sys.path.append(_here)

    from hypernetwork_ext.hosts import comfyui_pack
    from hypernetwork_ext.hosts.comfyui_nodes import warn_about_other_copy

    warn_about_other_copy(_here)
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = (
        comfyui_pack.NODE_CLASS_MAPPINGS,
        comfyui_pack.NODE_DISPLAY_NAME_MAPPINGS,
    )

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
