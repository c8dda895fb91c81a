import pytest

from ingest_data import image_server


@pytest.fixture(scope="module")
def server(synth_world):
    """(base url, {path: image bytes}, {path: caption}, closed-port url), for the module."""
    with image_server(synth_world) as served:
        yield served
