import pytest

from tests.helpers import quick_config
from tests.hub.common import CALIBRATION_METADATA


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
