"""Gradio builders shared by the WebUI extension and the standalone app.

Nothing here imports the WebUI's ``modules``: builders take the services they need as arguments,
so the same tabs run inside A1111 (gradio 3.41), Forge (gradio 4.40) and the local app (current
gradio). Version differences live in :mod:`.compat`.
"""
