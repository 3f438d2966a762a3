"""Host copies on the CPU (runtime/host_copies.py): a module's tensors packed into one buffer keep their identity
and values wherever they are bound, each tensor counted once. Blocks read from the checkpoint on demand are
tested with the Offloaded that visits them (test_offload.py)."""

from __future__ import annotations

import torch
from torch import nn

from qimg.runtime.host_copies import HostCopy, module_tensors


def test_host_copy_keeps_tensor_identity_and_values():
    lin = nn.Linear(5, 3)
    weight, before = lin.weight, lin.weight.detach().clone()
    copy = HostCopy(module_tensors(lin), pin=False)
    assert lin.weight is weight and torch.equal(lin.weight, before)
    assert copy.nbytes >= 3 * 5 * 4 + 3 * 4 and lin.weight.data_ptr() == copy.host.data_ptr()
    flat = torch.empty(copy.nbytes, dtype=torch.uint8)
    copy.upload(flat)
    assert lin.weight is weight and torch.equal(lin.weight, before)
    assert lin.weight.data_ptr() == flat.data_ptr()  # now a view of the "device" buffer
    copy.release()
    assert lin.weight.data_ptr() == copy.host.data_ptr()


def test_module_tensors_counts_tied_weights_once_and_skips_submodules():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    parent = nn.Sequential(a, b)
    assert len(module_tensors(parent)) == 3  # shared weight, two biases
    assert len(module_tensors(parent, skip=[b])) == 1  # a.bias (the weight belongs to b too)
