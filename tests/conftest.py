"""Test setup: 8 fake CPU devices, set before JAX initialises its backends."""

import os

# Must happen before `import jax` anywhere in the test process: XLA reads the flag once.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests compare float32 results to tight tolerances; keep CPU matmuls exact-ish.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
