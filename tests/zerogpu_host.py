"""The real server as a ZeroGPU Space runs it, for tests/test_zerogpu.py (run as a script).

The environment is the one Hugging Face sets on ZeroGPU hardware (``SPACES_ZERO_GPU=true`` and the
device API's address), with the real ``spaces`` package. What cannot exist on a machine without a GPU
is stood in for, and nothing else: what spaces reads of a CUDA build of torch at import (the CUDA
version string, ``torch._C._cuda_init``, ``torch.cuda._is_in_bad_fork``), the device API (schedule / allow / release / startup-report) is a
small HTTP server on 127.0.0.1 that grants every request and records it, and the three steps of
``spaces`` that touch CUDA (attach the GPU in the worker, move the weights there, pack them to disk
at start) do nothing; the models stay on the CPU (``RAPID_DIFFUSION_DEVICE=cpu``). On a CUDA machine
(``ZEROGPU_HOST_GPU_UUID`` set to its GPU's UUID) only the device API is stood in for. So ``spaces.GPU``
really forks its worker, pickles every argument in and every yielded value out, forwards a close,
and talks to the device API as on a Space.

Usage: python zerogpu_host.py SERVER_PORT DEVICE_API_PORT
"""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

CALLS: list[dict] = []
GPU_UUID = os.environ.get("ZEROGPU_HOST_GPU_UUID")  # set on a CUDA machine: the device the worker gets


class DeviceApi(BaseHTTPRequestHandler):
    """ZeroGPU's device API, granting everything (spaces/zero/api.py is the client)."""

    def do_POST(self):  # noqa: N802
        url = urlparse(self.path)
        params = {key: values[0] for key, values in parse_qs(url.query).items()}
        CALLS.append({"path": url.path, **params})
        if url.path == "/schedule":
            token = f"token-{len(CALLS)}"
            self.reply(200, {"idle": True, "nvidiaIndex": 0, "nvidiaUUID": GPU_UUID or "GPU-stand-in", "allowToken": token})
        else:
            self.reply(200, {})

    def do_GET(self):  # noqa: N802
        self.reply(200, CALLS)

    def reply(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def not_in_bad_fork() -> bool:
    return False


def main(server_port: int, api_port: int) -> None:
    api = ThreadingHTTPServer(("127.0.0.1", api_port), DeviceApi)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    os.environ.update(SPACES_ZERO_GPU="true", SPACES_ZERO_DEVICE_API_URL=f"http://127.0.0.1:{api_port}")

    if GPU_UUID:  # a CUDA machine: only the device API is stood in for
        import spaces  # noqa: F401  (before anything touches CUDA, as on a Space)
    else:
        import torch

        # spaces' ZeroGPU mode reads three things only a CUDA build of torch has; this torch is the CPU build
        torch.version.cuda = "12.8"
        torch._C._cuda_init = lambda: None
        torch.cuda._is_in_bad_fork = not_in_bad_fork
        import spaces  # noqa: F401  (before anything touches CUDA, as on a Space)
        from spaces.zero import torch as zero_torch

        zero_torch.init = lambda nvidia_uuid: None  # would attach the lent GPU
        zero_torch.move = lambda callback=None: None  # would move the registered weights onto it
        zero_torch.pack = lambda: 0  # would write the registered weights to disk at start

    import uvicorn

    from rapid_diffusion.serving.server import create_app

    uvicorn.run(create_app(), host="127.0.0.1", port=server_port, log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
