"""`make lab`: JupyterLab, started the way the Makefile starts it, opens a notebook's .py with the
outputs stored in its .ipynb (jupytext pairs them through notebooks/jupytext.toml)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab_server():
    port, token = _free_port(), secrets.token_hex(16)
    opts = f"--no-browser --ip=127.0.0.1 --port={port} --IdentityProvider.token={token} --ServerApp.port_retries=0"
    # STAMP= : the environment is already set up (the tests run inside it); PY: this interpreter.
    proc = subprocess.Popen(["make", "-s", "lab", "STAMP=", f"PY={sys.executable}", f"LAB_OPTS={opts}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "JUPYTER_PLATFORM_DIRS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode(errors="replace") if proc.poll() is not None else ""
                    pytest.fail(f"make lab did not start a server: {out[-2000:]}")
                time.sleep(0.5)
        yield base, token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_make_lab_opens_a_pair_with_its_stored_outputs(lab_server):
    base, token = lab_server
    with urllib.request.urlopen(f"{base}/api/contents/01_rotary_embeddings.py?type=notebook&content=1&token={token}",
                                timeout=60) as r:
        model = json.load(r)
    code = [c for c in model["content"]["cells"] if c["cell_type"] == "code"]
    stored = json.loads((ROOT / "notebooks" / "01_rotary_embeddings.ipynb").read_text())
    want = [c for c in stored["cells"] if c["cell_type"] == "code"]
    assert [len(c["outputs"]) for c in code] == [len(c["outputs"]) for c in want], (
        "the .py opened without the outputs of its .ipynb")
    first = "".join(o.get("text", "") for o in code[0]["outputs"])
    assert "device: NVIDIA" in first
