"""Peak memory of one call, for the benchmark reports.

On CUDA: torch.cuda.max_memory_allocated above what was allocated before the call. On CPU: the
peak of live tensor bytes allocated through the PyTorch dispatcher during the call (a
TorchDispatchMode that tracks every op's outputs until they are freed). CPU kernels' internal
scratch (allocated in C++ without the dispatcher) is not counted there.
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self._seen or storage.nbytes() == 0:
                    continue
                self._seen.add(key)
                nbytes = storage.nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._release, key, nbytes)
        return out


def peak_bytes(fn) -> int:
    """Peak bytes allocated while running ``fn()`` (see the module docstring)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with _LiveBytes() as mode:
        fn()
    return mode.peak
