"""The OpenAPI document is snapshotted so that interface changes are deliberate.

After an intended change: `UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/test_openapi.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from app.main import create_app
from app.settings import Settings

SNAPSHOT = Path(__file__).parent / "snapshots" / "openapi.json"


def test_openapi_matches_snapshot():
    schema = create_app(Settings()).openapi()
    rendered = json.dumps(schema, indent=1, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_SNAPSHOTS") or not SNAPSHOT.exists():
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(rendered)
    assert rendered == SNAPSHOT.read_text(), "the HTTP interface changed: review it, then update the snapshot"
