"""Hugging Face Spaces entry point (``app_file: app.py``); locally: ``python app.py``.

The same app as ``rapid-diffusion serve``: the web UI at ``/``, the JSON API at
``/api/predict/{domain}``, liveness at ``/healthz``.
"""

from rapid_diffusion.serving.server import serve

if __name__ == "__main__":
    serve()
