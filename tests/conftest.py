"""Test setup: 8 fake CPU devices, set before JAX initialises its backends; one persistent compilation cache
shared by the whole run."""

import os
import shutil
import tempfile

# Must happen before `import jax` anywhere in the test process: XLA reads the flag once.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compare float32 results to tight tolerances; keep CPU matmuls exact-ish.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# Many tests build the same tiny programs again (a new jit closure per run, the experiments' subprocesses
# for kill/resume and the notebooks): JAX's persistent cache loads them instead of compiling them again,
# which is most of a test's time on 2 cores.  One directory per pytest run, shared by the xdist workers
# and every subprocess through the environment (cli.enable_compilation_cache defers to it); a loaded
# executable is the same program, so results are bitwise those of a fresh compile.  Tests that read
# XLA's compile-time log switch the cache off (`no_compilation_cache`).
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"kdjax-test-jax-cache-{_RUN_ID}")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def no_compilation_cache():
    """The persistent cache off for one test: a program loaded from it is not compiled, so XLA logs
    nothing about it (e.g. "Involuntary full rematerialization")."""
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # whether the cache is used is decided once per process, until reset
    yield
    jax.config.update("jax_enable_compilation_cache", before)
    compilation_cache.reset_cache()


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput") and os.environ.get("JAX_COMPILATION_CACHE_DIR") == _CACHE_DIR:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)  # the controller, after every worker has finished


def pytest_collection_modifyitems(config, items):
    """The notebooks last: they run the experiments' tiny configs again, so by then the persistent cache
    holds most of their programs (compiled by the experiments' own tests)."""
    del config
    items.sort(key=lambda item: os.path.basename(str(item.fspath)) == "colabs_test.py")  # stable: order kept
