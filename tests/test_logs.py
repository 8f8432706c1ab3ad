from __future__ import annotations

import json
import logging

import pytest

from connector.logs import log_context, setup_logging


def test_json_lines_carry_run_segment_and_destination(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("json")
    try:
        with log_context(run_id="42", segment="vip", destination="meta"):
            logging.getLogger("connector.engine").warning("pushed %d members", 3)
        logging.getLogger("connector.engine").warning("outside")
    finally:
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0] == {**lines[0], "message": "pushed 3 members", "run_id": "42", "segment": "vip",
                        "destination": "meta", "level": "warning"}  # fmt: skip
    assert "run_id" not in lines[1]


def test_text_lines_name_the_pair(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("text")
    try:
        with log_context(run_id="7", segment="vip", destination="google"):
            logging.getLogger("connector.engine").warning("hello")
    finally:
        logging.getLogger().handlers.clear()
    assert "hello run_id=7 segment=vip destination=google" in capsys.readouterr().err
