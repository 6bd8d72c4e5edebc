"""In a process started by a test not marked ``models``, install the model-load guard."""

import os

if os.environ.get("SARAI_ROUTER_TEST_FORBID_LOADS"):
    import sarai_model_load_guard

    sarai_model_load_guard.install()
