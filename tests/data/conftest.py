"""Fixtures of the data tests."""

from __future__ import annotations

import pytest

from tests.helpers.http_server import serving


@pytest.fixture
def server():
    """A local archive host on 127.0.0.1 (tests/helpers/http_server.py)."""
    with serving() as httpd:
        yield httpd
