"""Native (csrc, C++/OpenMP) backend of the dtome ops: bindings to ``torch.ops.dymu.native_*``.

Not implemented yet: the kernels are tracked by their issue. ``SUPPORTED`` lists the ops this
module implements, so dispatch never picks it for an op it lacks and an explicit
``backend="native"`` says so.
"""

SUPPORTED = frozenset()
