"""Test session settings.

* Measured timings go to a fresh cache directory, so that no test depends on what an
  earlier run (or another machine's home directory) measured.
* The ``bd`` backend is found through the package's entry point once installed; when the
  tests run from a checkout that was not installed (the GPU machine), it is registered
  here so that ``backend="bd"`` resolves all the same.
"""
import os
import tempfile

os.environ["BDPASS_CACHE_DIR"] = tempfile.mkdtemp(prefix="bdpass-test-cache-")


def pytest_configure(config):
    import torch

    if "bd" not in torch._dynamo.list_backends(exclude_tags=()):
        from torch._dynamo.backends.registry import register_backend

        import bdpass

        register_backend(name="bd")(bdpass.bd_backend)
