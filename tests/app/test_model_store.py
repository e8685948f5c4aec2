"""The process-wide model: embedded LiteMedSAM by default, a published checkpoint picked up by mtime."""

import os

import pytest
from lib.model_store import EMBEDDED_LITE_VERSION, ModelStore
from lib.settings import AppSettings

from medsegx.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    app_dir = tmp_path_factory.mktemp("app")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSEGX_RUNTIME", "eager")  # checkpoint swapping, not the runtime (tests/unit/test_runtime.py)
        yield ModelStore(AppSettings.from_conf({"device": "cpu", "cache_size": "2"}, app_dir))


def test_reload_on_publish_and_keep_serving_on_a_bad_file(store):
    with store.use() as loaded:
        assert loaded.version == EMBEDDED_LITE_VERSION and loaded.checkpoint is None
        predictor = loaded.predictor
        model = predictor.model

    published = store.settings.checkpoint_paths[-1]
    published.parent.mkdir(parents=True, exist_ok=True)
    published.write_bytes(b"not a checkpoint")
    with store.use() as loaded:
        assert loaded.version == EMBEDDED_LITE_VERSION  # the previous model keeps serving
        assert "not a readable PyTorch checkpoint" in loaded.reload_error

    save_checkpoint(model, published, metadata={"model_version": "v2"})
    os.utime(published, ns=(published.stat().st_atime_ns, published.stat().st_mtime_ns + 1_000_000))
    with store.use() as loaded:
        assert loaded.version == "v2" and loaded.checkpoint == published and loaded.reload_error is None
        assert loaded.predictor is predictor  # loaded in place: same predictor, cache cleared
        assert predictor.cache_stats.size == 0

    published.unlink()
    with store.use() as loaded:
        assert loaded.version == EMBEDDED_LITE_VERSION and loaded.checkpoint is None
