"""The real-ComfyUI suite (see conftest.py)."""
