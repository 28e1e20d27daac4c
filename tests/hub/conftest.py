import pytest

from tests.helpers import quick_config
from tests.hub.common import CALIBRATION_METADATA
from tests.hub.hub_server import HubStandIn


@pytest.fixture(scope="session")
def stories_config(stories):
    """A 3-bit, 1%-outlier config fitted on the real stories260K model, with full calibration metadata."""
    model, _ = stories
    config = quick_config(model, bits=3, outlier_fraction=0.01)
    config.calibration = dict(CALIBRATION_METADATA)
    return config


@pytest.fixture
def saved(stories_config, tmp_path):
    """A folder holding the stories260K config as save_pretrained wrote it."""
    folder = tmp_path / "config"
    stories_config.save_pretrained(folder)
    return folder


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The local Hub stand-in (tests/hub/hub_server.py), with this process's huggingface_hub pointed at it.

    huggingface_hub reads HF_ENDPOINT and friends when it is imported, so in-process tests set the constants it
    derives from them; tests/hub/test_hub.py::test_cli_round_trip_through_hf_endpoint sets the real environment
    variables in a fresh process instead.
    """
    from huggingface_hub import constants

    with HubStandIn() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")
        yield server
