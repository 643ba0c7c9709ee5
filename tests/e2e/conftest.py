import pytest

from tests.e2e.engine import start_engine


@pytest.fixture(scope="module")
def control_engine(tiny_models):
    """A tiny Llama behind two frontends, at most 8 requests running (the rest wait)."""
    engine = start_engine(tiny_models["llama"], "--max-num-seqs", "8", frontends=2)
    yield engine
    engine.stop()
