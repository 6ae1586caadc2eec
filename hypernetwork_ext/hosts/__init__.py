"""Host glue: the only code that touches the WebUI's ``modules``, ``shared.opts``, ``p`` or Forge's patcher.

``webui.register_all()`` is what the extension's entry script calls; ``a1111`` attaches networks to
A1111's ldm/sgm attention modules, ``forge`` installs them as Forge/reForge UNet-patcher patches.
"""
