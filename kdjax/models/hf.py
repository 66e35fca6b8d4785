# temporary: the lead removes it when switching the experiments' imports (HF interop now lives in kdjax.hf).
from kdjax.hf import *  # noqa: F401,F403
from kdjax.hf import __all__  # noqa: F401
