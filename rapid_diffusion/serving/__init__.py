"""Serving: the faces, which turn widgets, JSON and flags into service calls and hold no logic.

``cli`` is the ``rapid-diffusion`` command (and the one plugin boundary: its ``dev`` group is
added only when ``rapid_diffusion_dev`` is importable), ``server`` the FastAPI app with the Gradio
UI mounted, ``api`` the PAI-EAS JSON endpoint and ``/healthz``, ``ui`` and ``finetune_ui`` the
Gradio tabs. The only room that may import gradio, fastapi, starlette or uvicorn; it may import
everything below it, and nothing imports it but ``__main__`` (and ``app.py``).
"""
