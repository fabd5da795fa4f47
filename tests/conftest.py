import os

# libtpu is installed for ahead-of-time TPU compiles; keep the runtime on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
