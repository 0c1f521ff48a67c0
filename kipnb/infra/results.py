"""Writing measured numbers: ``results.json`` of notebooks and the JSON of benchmarks.

Both carry the machine and the JAX version next to the numbers, so a figure can be
traced to where it was measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

from kipnb.distilled import atomic_write_bytes, jsonable

__all__ = ["machine_info", "write_json", "write_results"]


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, Python, JAX version and devices."""
    import jax

    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind if devices else None,
    }


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Atomically write ``data`` (made JSON-able) as indented JSON."""
    text = json.dumps(jsonable(data), indent=2, sort_keys=False) + "\n"
    return atomic_write_bytes(Path(path), lambda f: f.write(text.encode()))


def write_results(output_dir: str | os.PathLike, results: dict, name: str = "results.json") -> Path:
    """A notebook's last cell: write ``results`` plus machine info into ``output_dir``."""
    data = {
        **results,
        "machine": machine_info(),
        "written_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    return write_json(Path(output_dir) / name, data)
