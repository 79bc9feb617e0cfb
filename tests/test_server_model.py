"""The seed's three curl calls, verbatim, against a real server on the real embedded model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import httpx
import pytest

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_torch_thread")]

# Copied from the seed README ("Call endpoints directly"); only the port is swapped at run time.
SEED_CALLS = [
    """curl -s -X POST 'http://127.0.0.1:5050/generate' \\
  -H 'Content-Type: application/json' \\
  -d '{"prompt":"The future of technology is","steering":"weeknd","max_length":50,"temperature":0.7}'""",
    """curl -s -X POST 'http://127.0.0.1:5050/compare' \\
  -H 'Content-Type: application/json' \\
  -d '{"prompt":"Climate change is affecting","steering":"toronto","max_length":80}'""",
    """curl -s 'http://127.0.0.1:5050/examples'""",
]


def run_seed_call(command: str, url: str):
    command = command.replace("http://127.0.0.1:5050", url)
    if shutil.which("curl") and shutil.which("bash"):
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300, check=True).stdout
        return json.loads(out)
    # No curl here: send the same request with httpx.
    target = re.search(r"'(http[^']+)'", command).group(1)
    body = re.search(r"-d '(.+)'", command)
    if body:
        headers = {"Content-Type": "application/json"}
        return httpx.post(target, content=body.group(1), headers=headers, timeout=300).json()
    return httpx.get(target, timeout=60).json()


def test_seed_curl_calls_work_unchanged(real_server):
    gen = run_seed_call(SEED_CALLS[0], real_server)
    assert gen["success"] is True and gen["steering"] == "weeknd" and len(gen["generated"].split()) >= 5
    cmp = run_seed_call(SEED_CALLS[1], real_server)
    assert cmp["success"] is True and cmp["steering_type"] == "toronto"
    assert cmp["base"] and cmp["steered"] and cmp["base"] != cmp["steered"]
    assert cmp["batch"]["rows"] == 2  # base and steered came from one batched generation
    examples = run_seed_call(SEED_CALLS[2], real_server)
    assert "The future of technology is" in examples and "Climate change is affecting" in examples


def test_strong_steering_shows_the_concept(real_server):
    body = {"prompt": "Give me a tip for a weekend.", "steering": [{"vector": "tabby_cats", "strength": 0.6}],
            "max_length": 40}
    out = httpx.post(f"{real_server}/compare", json=body, timeout=300).json()
    assert any(k in out["steered"].lower() for k in ("cat", "purr", "kitten", "whisker", "feline", "paw")), out
