"""``python -m post_training.runtime [--init]``: what this machine gives the toolkit, and every
change the toolkit makes to upstream behaviour (the patch registry), applied or not in this
process. ``--init`` starts a one-rank runtime first, so the list shows what a run here gets."""
import sys

import torch

from post_training.runtime import patches
from post_training.runtime.dist import have_te

if "--init" in sys.argv[1:]:
    from post_training.runtime import ParallelConfig, destroy_runtime, init_runtime

    init_runtime(ParallelConfig())
    destroy_runtime()  # the process group; the patches stay applied in this process
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
      f"transformer-engine: {'yes' if have_te() else 'no'}")
print("backend: " + ("nccl (GPU)" if torch.cuda.is_available() else "gloo (CPU)"))
print("Changes to upstream behaviour (post_training/runtime/patches.py), applied by init_runtime:")
print(patches.listing())
