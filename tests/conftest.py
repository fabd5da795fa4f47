import os
import sys

# libtpu is installed for ahead-of-time TPU compiles; keep the runtime on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every test can `import corpus_path` (tests/corpus_path.py: the fixed test corpus).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
