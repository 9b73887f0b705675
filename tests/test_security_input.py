"""Hostile input from the app's URL, its forms and imported files, and from
the command line: refused with one line, or neutralised where it is shown
or exported."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache for this module; cached Streamlit resources are dropped
    so they point at it."""
    folder = tmp_path_factory.mktemp("security-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOWSING_CACHE", str(folder))
        mp.setenv("HF_HUB_OFFLINE", "1")
        st.cache_resource.clear()
        st.cache_data.clear()
        yield folder
        st.cache_resource.clear()
        st.cache_data.clear()


@pytest.fixture
def roots(tmp_path, monkeypatch):
    """(the one model root, a folder outside it holding a model-like folder)."""
    root = tmp_path / "models"
    outside = tmp_path / "elsewhere"
    for folder in (root, outside / "model"):
        folder.mkdir(parents=True)
    (outside / "model" / "config.json").write_text('{"model_type": "gpt2"}')
    (outside / "empty").mkdir()
    monkeypatch.setenv("DOWSING_MODEL_ROOTS", str(root))
    return root, outside


# --- the model picker ---------------------------------------------------------

def test_the_model_picker_is_not_tied_to_the_url(cache, tiny_gpt2_dir):
    """A widget bound to the URL both writes its value there and reads it from
    a link; unbound, a link cannot pick a model."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "directory"
    at.session_state["model"] = str(tiny_gpt2_dir)
    at.run()
    assert not at.exception, at.exception
    assert not {"source", "model", "checkpoints_text"} & set(at.query_params)


def test_every_path_outside_the_roots_gets_one_message(roots, tmp_path):
    from dowsing.models import NOT_ALLOWED, ModelError, allowed_model, load_model

    root, outside = roots
    (root / "link").symlink_to(outside / "model")  # inside by name, outside once resolved
    hostile = [str(outside / "model"), str(outside / "empty"), str(outside / "missing"), str(outside / "x.gguf"),
               str(root / ".." / "elsewhere" / "model"), str(root / "link"), "/etc", "~", "../../etc/passwd",
               "/no/such/folder", "bad\0path"]
    for text in hostile:
        with pytest.raises(ModelError) as caught:
            allowed_model(text)
        assert str(caught.value) == NOT_ALLOWED, text
    inside = root / "mine"
    inside.mkdir()
    assert allowed_model(str(inside)) == str(inside.resolve())
    assert allowed_model("gpt2") == "gpt2" and allowed_model(None) is None
    # the command line is not restricted: a path typed there is the user's own choice
    with pytest.raises(ModelError, match="holds no config.json"):
        load_model(str(outside / "empty"))


def test_the_app_shows_one_message_for_paths_outside_the_roots(cache, roots):
    from dowsing.models import NOT_ALLOWED

    _, outside = roots
    shown = []
    for text in (str(outside / "model"), str(outside / "empty"), str(outside / "missing")):
        at = AppTest.from_file(APP, default_timeout=60)
        at.session_state["source"] = "directory"
        at.session_state["model"] = text
        at.run()
        assert not at.exception, at.exception
        shown.append([m.value for m in at.sidebar.info] + [m.value for m in at.sidebar.error])
    assert shown == [[NOT_ALLOWED]] * 3


def test_checkpoints_outside_the_roots_are_refused_in_the_app_and_the_worker(cache, roots):
    from dowsing.checkpoints import CheckpointError, allowed_checkpoints
    from dowsing.config import AnalysisConfig
    from dowsing.domains import default_domains
    from dowsing.jobs import JobRequest
    from dowsing.models import NOT_ALLOWED, ModelError
    from dowsing.worker import check_model_paths

    root, outside = roots
    specs = (str(outside / "model"), str(outside / "empty"))
    with pytest.raises(CheckpointError, match="not allowed"):
        allowed_checkpoints(specs)
    assert allowed_checkpoints(("owner/name@step100",)) == ("owner/name@step100",)
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["source"] = "checkpoints"
    at.session_state["checkpoints_text"] = "\n".join(specs)
    at.run()
    assert not at.exception, at.exception
    assert [m.value for m in at.sidebar.info] == [NOT_ALLOWED]
    # a job request carries what the app sent: the worker checks it again
    domains = default_domains()
    with pytest.raises(ModelError, match="not allowed"):
        check_model_paths(JobRequest(model_id=str(outside / "model"), domains=domains))
    with pytest.raises(CheckpointError, match="not allowed"):
        check_model_paths(JobRequest(model_id=None, domains=domains, config=AnalysisConfig(checkpoints=specs)))
