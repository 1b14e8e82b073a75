"""CPU runs of the fused kernels go through Triton's interpreter (TRITON_INTERPRET=1).

The variable is read when a kernel is decorated, so it must be set before the kernels module
is imported; if something imported it earlier without the interpreter (and there is no GPU),
reload it here.
"""
import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for name in ("megafire.attention.fused._kernels", "megafire.attention.fused._fire_tables"):
        mod = sys.modules.get(name)
        if mod is not None:
            importlib.reload(mod)
