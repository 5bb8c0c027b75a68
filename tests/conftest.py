"""pytest configuration: keep CPU threads bounded so that the suite behaves on 2-core CI machines."""

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
