"""Session-wide set-up for every test directory (loaded before any test module is imported)."""
import os

import torch

# The trainer runs on CUDA whenever it is there (megafire.train.engine picks nccl); DeepSpeed's
# accelerator, fixed at its first use in the process, must agree, or its broadcast of CPU tensors
# meets an nccl-only group. Set once here: per-module defaults made the first module imported win.
# Tests that start CPU worker processes set DS_ACCELERATOR=cpu in those processes' environment.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
