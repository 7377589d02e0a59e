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


def test_every_integer_the_document_allows_up_to_its_maximum_passes_the_request_model():
    """beams and successors carry their own bound (16): the document wrote the server's larger limits over it (256 for
    successors, the chains limit for beams), and 17 to 256 were documented as valid and answered 422. And the seed's
    largest, 2**63 − 1, was written as a float, 2**63."""
    from app.api.openai_protocol import ChatCompletionRequest, CompletionRequest, SEAOptions
    from app.api.responses import ResponseRequest
    from app.api.schemas import AlignRequest

    settings = Settings(max_chains=24, max_batch_chains=32, max_samples=256)
    components = create_app(settings).openapi()["components"]["schemas"]
    checked = 0
    for model, base in [(AlignRequest, {"prompt": "hi"}), (SEAOptions, {}), (CompletionRequest, {"model": "m", "prompt": "hi"}),
                        (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
                        (ResponseRequest, {"model": "m", "input": "hi"})]:
        name = model.__name__
        for field, prop in components[name]["properties"].items():
            for branch in prop.get("anyOf", [prop]):
                if branch.get("type") == "integer" and "maximum" in branch:
                    for bound in ("minimum", "maximum"):  # raises on a documented value it refuses
                        model.model_validate({**base, field: branch[bound]} if bound in branch else base)
                    checked += 1
    assert checked >= 20
    assert components["ResponseRequest"]["properties"]["max_output_tokens"]["anyOf"][0]["maximum"] == settings.max_tokens_limit
