"""What hosting needs from the repository itself: the port a Space assigns, one declaration of
dependencies (pyproject.toml) that requirements.txt follows, and every binary file routed to LFS."""

from __future__ import annotations

import pytest

from rapid_diffusion.serving.server import default_port
from rapid_diffusion.settings import Settings


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 7860),
        ({"PORT": "8080"}, 8080),
        ({"GRADIO_SERVER_PORT": "7861"}, 7861),
        ({"PORT": "8080", "GRADIO_SERVER_PORT": "7861"}, 7861),  # Gradio's own variable wins over a generic one
    ],
)
def test_gradio_server_port_wins_over_port(monkeypatch, env, expected):
    for name in ("PORT", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert default_port() == expected


def test_port_out_of_range_stops_the_start(monkeypatch):
    monkeypatch.delenv("PORT", raising=False)
    with pytest.raises(ValueError, match="GRADIO_SERVER_PORT"):
        Settings(_env_file=None, **{"GRADIO_SERVER_PORT": "70000"})
