"""Print the resolved versions of the packages the results depend on (first lines of CI's log)."""

import importlib.metadata
import platform

names = [
    "torch",
    "triton",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "kernels",
    "bitsandbytes",
    "trl",
    "datasets",
]
found = []
for name in names:
    try:
        found.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        found.append(f"{name} -")
print(f"python {platform.python_version()}; " + "; ".join(found))
