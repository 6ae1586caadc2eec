"""The standalone face: the command line, the local app, the demo and the embedded tiny model.

These run the core on a model they load themselves (diffusers pipelines, the tiny model), without a
WebUI. The core never imports from here; the WebUI adapters in ``hosts/`` never need it.
"""
