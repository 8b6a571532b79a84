"""Test-session settings shared by the test suite and the docstring examples.

The suite runs in two pytest-xdist workers; each uses one torch thread, which is
also much faster for the many small tensors of the tests than two competing threads.
"""

import torch

torch.set_num_threads(1)
