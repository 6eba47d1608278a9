"""``python -m dymu_kernels``: print which backends are available, why not, and versions."""

import json

from ._backends import describe

if __name__ == "__main__":
    print(json.dumps(describe(), indent=2))
