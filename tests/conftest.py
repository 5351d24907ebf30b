"""Shared test fixtures.

Tests that need files from `../shared` (the real ChatGLM2 tokenizer, real corpus samples) skip with a
reason on a fresh clone that lacks them. `.ci/run` sets MCG_REQUIRE_SHARED=1, which turns every such
skip into a failure, so CI can never pass by skipping them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
TOKENIZER_DIR = os.path.join(REPO, "chatglm_tokenizer")
sys.path.insert(0, REPO)
# The test models are tiny: one thread each is faster than two fighting over 2 cores, and the 2-process
# torchrun tests would otherwise oversubscribe them. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def torchrun(script: str, argv: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc script argv` from the repo root on gloo; asserts it
    succeeded. A rank that crashes dumps its Python stack (faulthandler), and the failure message shows the
    ranks' own output, not only torchrun's summary of it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")   # the ranks share the cores
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
           *argv]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    ranks_output = done.stderr.split("Traceback (most recent call last):\n  File \"<frozen runpy>\"")[0]
    assert done.returncode == 0, f"{done.stdout[-1500:]}\n--- stderr ---\n{ranks_output[-4000:]}"
    return done


def need_shared(*parts: str) -> str:
    """Path of `../shared/<parts>`; skip the test when it is absent (fail under MCG_REQUIRE_SHARED=1)."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        reason = f"{path} is not present (real data lives beside the repo in ../shared)"
        if os.environ.get("MCG_REQUIRE_SHARED") == "1":
            pytest.fail(f"MCG_REQUIRE_SHARED=1 but {reason}")
        pytest.skip(reason)
    return path


_download_failed: list[str] = []   # why the one download attempt of this test session failed


def ensure_tokenizer() -> str:
    """The ChatGLM2 tokenizer folder. A missing tokenizer.model is copied from ../shared, or else downloaded
    once per test session (load_tokenizer does it, for users online); the tests that need it skip otherwise."""
    model = os.path.join(TOKENIZER_DIR, "tokenizer.model")
    if os.path.isfile(model):
        return TOKENIZER_DIR
    if os.path.isfile(os.path.join(SHARED, "chatglm_tokenizer", "tokenizer.model")) or \
            os.environ.get("MCG_REQUIRE_SHARED") == "1":
        shutil.copyfile(need_shared("chatglm_tokenizer", "tokenizer.model"), model + ".tmp")
        os.replace(model + ".tmp", model)
        return TOKENIZER_DIR
    if not _download_failed:
        from chatglm_tokenizer import TokenizerError, load_tokenizer
        try:
            load_tokenizer(TOKENIZER_DIR)
            return TOKENIZER_DIR
        except TokenizerError as exc:
            _download_failed.append(str(exc))
    pytest.skip(f"no ChatGLM2 tokenizer.model: {_download_failed[0]}")


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    return ensure_tokenizer()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from chatglm_tokenizer import load_tokenizer
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def realdata() -> str:
    """../shared/realdata (skips or fails as need_shared does)."""
    return need_shared("realdata")
