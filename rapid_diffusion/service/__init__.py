"""Service: the one layer every face calls.

``app`` holds ``AppService`` (GPU gate, generation, token counts, load/unload, health,
``UserFacingError``, the GPU function whose edges pickle: ``spaces.GPU`` wraps it on ZeroGPU), ``finetune`` the ``FinetuneService`` behind the
Fine-tune tab (access, pair checks, jobs), ``batching`` the window that joins compatible
requests into one UNet batch. It may import every core room (``training``, ``models`` and below);
never ``serving``, and never a web framework (gradio, fastapi, starlette, uvicorn).
"""
