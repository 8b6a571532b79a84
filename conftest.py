"""Test-session settings shared by the test suite and the docstring examples.

The suite runs in two pytest-xdist workers; each uses one torch thread, which is
also much faster for the many small tensors of the tests than two competing threads.
BLAS (numpy/scipy) gets one thread too: set before numpy loads OpenBLAS, as
competing BLAS threads on a loaded machine made dense SVDs ten times slower.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

torch.set_num_threads(1)
