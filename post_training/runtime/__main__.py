"""``python -m post_training.runtime``: what this machine gives the toolkit, and the shims."""
import torch

from post_training.model_builder import have_te
from post_training.runtime import cpu_compat, fastpath

print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
      f"transformer-engine: {'yes' if have_te() else 'no'}")
print("backend: " + ("nccl (GPU)" if torch.cuda.is_available() else "gloo (CPU)"))
print("CPU compatibility shims (applied only without CUDA):")
for s in cpu_compat.SHIMS:
    print(f"  - {s.name}\n      covers: {s.covers}")
print("CPU inference fast paths:", fastpath.__doc__.split("\n\n")[1].replace("\n", " "))
