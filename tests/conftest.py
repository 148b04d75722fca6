"""Shared test set-up.

JAX appears in tests only as an independent reference (the paper's own
formulation); its XLA compile time would dominate the suite, so compile
with cheap optimisation: results are the same, only slower to run.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
