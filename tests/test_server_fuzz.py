"""Schema-driven fuzzing of the HTTP API (schemathesis, from /openapi.json): valid and invalid
bodies for every operation; no answer may be a 5xx, and the server must still serve after."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server_utils import start_server

pytestmark = pytest.mark.slow
MIN_CASES = 500


def _body_case_statuses(report: Path) -> list[int]:
    """Status of every request schemathesis sent to the two body-taking operations."""
    statuses = []
    for line in report.read_text().splitlines():
        event = json.loads(line).get("ScenarioFinished")
        for interaction in (event or {}).get("recorder", {}).get("interactions", {}).values():
            request, response = interaction["request"], interaction.get("response")
            if request["method"] == "POST" and request["uri"].endswith("completions") and response:
                statuses.append(response["status_code"])
    return statuses


def test_schemathesis_finds_no_server_error(checkpoints, tmp_path):
    server = start_server(str(checkpoints("mixtral")), "--max-model-len", "48", log_path=str(tmp_path / "server.log"))
    try:
        spec = httpx.get(f"{server.url}/openapi.json").json()
        for path in ("/v1/completions", "/v1/chat/completions"):
            assert "requestBody" in spec["paths"][path]["post"], path
        report = tmp_path / "report.ndjson"
        cmd = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/openapi.json",
               "--checks", "not_a_server_error", "--max-examples", "120", "--seed", "20261201", "--workers", "1",
               "--generation-database", "none", "--request-timeout", "60", "--no-color",
               "--report", "ndjson", "--report-ndjson-path", str(report)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its cache stays there
        assert run.returncode == 0, run.stdout[-6000:]
        statuses = _body_case_statuses(report)
        assert len(statuses) >= MIN_CASES, f"only {len(statuses)} body cases ran\n{run.stdout[-3000:]}"
        assert statuses.count(200) >= 50 and statuses.count(400) >= 50  # valid and invalid bodies both reached
        assert max(statuses) < 500
        assert httpx.get(f"{server.url}/health").status_code == 200
        ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    finally:
        server.stop()
