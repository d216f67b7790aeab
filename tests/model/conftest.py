import torch

# Tiny models: one thread is as fast and leaves the shared cores to other work.
torch.set_num_threads(1)
