"""Shared by the security tests: a client of whatever ``app`` a test module builds (each module
builds its app with the Ray stand-in and settings its cases need)."""

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c
