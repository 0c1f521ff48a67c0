r"""Data parallelism over all devices with ``jax.sharding``: one mesh axis, ``'data'``.

Kernel blocks between a support set and many targets are embarrassingly parallel over
the targets, so kipnb splits the *target* (batch) axis over every device and keeps the
small support side (support images, dual coefficients, Cholesky factors, ``A^T A``)
replicated. ``jax.jit`` then partitions the kernel computation itself (GSPMD): each
device computes the kernel rows of its own targets, and sums over targets (a loss, an
accuracy, ``A^T A``) become all-reduces. One device is simply a mesh of size one: there
is no second code path, and the computation is the same as without sharding.

* :func:`mesh` — a ``Mesh`` with the single axis ``'data'`` over ``jax.devices()``
  (cached per tuple of devices);
* :func:`batch_sharding` — ``NamedSharding(mesh, P('data'))``: leading axis split;
* :func:`replicated` — ``NamedSharding(mesh, P())``: a full copy on every device;
* :func:`shard_batch` / :func:`replicate` — put an array there;
* :func:`pad_to_multiple` — the smallest multiple of the mesh size ``>= n``.

**Who pads.** :func:`shard_batch` needs the leading size to be a multiple of the mesh
size and raises ``ValueError`` otherwise; it never pads, because padding rows change
means and sums. The callers pad where they can do it exactly:
:func:`kipnb.krr.krr_evaluate` and :func:`kipnb.krr.label_solve` round ``block_size``
up to a multiple of the device count (the last block is already padded by repeating a
real row, and a mask zeroes the padded rows). :func:`kipnb.kip.run` does not pad the
target batch (padding would change KIP's mean loss and batch accuracy): when the batch
size is not a multiple of the device count, that step's targets are replicated instead
(every device computes the whole kernel; the result is the same).

**TPU pods and other multi-host jobs.** A Colab TPU runtime or a single TPU VM is one
process that sees all its chips (``jax.devices()``); nothing needs initializing. A TPU
*pod slice* (e.g. v4-32: several hosts), or a multi-host GPU job, runs the same program
once per host, and :func:`jax.distributed.initialize` must be called on every host
before any other JAX call. :func:`maybe_initialize_distributed` does that only when the
environment says this process is part of a multi-process job:

* ``JAX_COORDINATOR_ADDRESS`` is set (an explicit setup; ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` give the other arguments, else JAX auto-detects them);
* ``TPU_WORKER_HOSTNAMES`` or ``TPU_PROCESS_ADDRESSES`` lists more than one host
  (set on TPU pod slices, e.g. by GKE; JAX's Cloud TPU detection reads the same
  variables, or the TPU VM metadata server);
* ``MEGASCALE_NUM_SLICES`` > 1 (multislice TPU jobs);
* a SLURM job with ``SLURM_NTASKS`` > 1, or Open MPI with ``OMPI_COMM_WORLD_SIZE`` > 1
  (JAX auto-detects both);
* ``KIPNB_DISTRIBUTED=1`` forces it (e.g. a TPU-VM pod slice whose hosts only learn the
  topology from the metadata server), ``KIPNB_DISTRIBUTED=0`` disables it.

Call it at the top of the script (``python -m`` or notebook) on every host, e.g.
``gcloud compute tpus tpu-vm ssh NAME --worker=all --command="python train.py"``. Then
``jax.devices()`` lists every chip of the slice and :func:`mesh` spans all of them;
:func:`shard_batch` and :func:`replicate` build global arrays from a host (NumPy) array
that must be the same on every process (kipnb draws batches from ``(seed, step)``, so
it is).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "AXIS",
    "batch_sharding",
    "device_count",
    "maybe_initialize_distributed",
    "mesh",
    "multi_process_env",
    "pad_to_multiple",
    "replicate",
    "replicated",
    "shard_batch",
]

#: The name of the single mesh axis (the batch / target axis).
AXIS = "data"


@functools.cache
def _mesh(devices: tuple) -> Mesh:
    return Mesh(np.array(devices, dtype=object), (AXIS,))


def mesh(devices: Sequence | None = None) -> Mesh:
    """A one-axis ``Mesh`` named ``'data'`` over ``devices`` (default ``jax.devices()``).

    Cached: the same devices give the same ``Mesh`` object (so jitted functions see
    equal shardings and do not recompile).
    """
    devs = tuple(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("mesh() needs at least one device")
    return _mesh(devs)


def device_count(m: Mesh | None = None) -> int:
    """The number of devices along ``'data'`` (of the default mesh if ``m`` is None)."""
    return int((mesh() if m is None else m).shape[AXIS])


def batch_sharding(m: Mesh | None = None) -> NamedSharding:
    """``NamedSharding(mesh, P('data'))``: the leading axis split over the devices."""
    return NamedSharding(mesh() if m is None else m, P(AXIS))


def replicated(m: Mesh | None = None) -> NamedSharding:
    """``NamedSharding(mesh, P())``: every device holds the whole array."""
    return NamedSharding(mesh() if m is None else m, P())


def pad_to_multiple(n: int, m: Mesh | int | None = None) -> int:
    """The smallest multiple of the mesh size (or of the int ``m``) that is ``>= n``."""
    k = m if isinstance(m, int) else device_count(m)
    return -(-int(n) // k) * k


def _put(x, sharding: NamedSharding):
    """``x`` on ``sharding``; host arrays are built per shard (works across processes)."""
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if x.is_fully_addressable and not sharding.is_fully_addressable:
            x = np.asarray(x)  # multi-process: rebuild from the (identical) host copies
        else:
            return jax.device_put(x, sharding)
    x = np.asarray(x)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_batch(x, m: Mesh | None = None) -> jax.Array:
    """``x`` with its leading axis split over the mesh's ``'data'`` axis.

    The leading size must be a multiple of the mesh size (``ValueError`` otherwise):
    callers pad (see :func:`pad_to_multiple` and the module docstring). Values are not
    changed, only placed.
    """
    m = mesh() if m is None else m
    shape = np.shape(x)
    if not shape:
        raise ValueError("shard_batch needs an array with a leading (batch) axis")
    k = device_count(m)
    if shape[0] % k:
        raise ValueError(
            f"shard_batch: leading size {shape[0]} is not a multiple of the {k} devices of "
            f"the mesh; pad it to pad_to_multiple({shape[0]}, mesh) = "
            f"{pad_to_multiple(shape[0], k)} rows (and mask the padding) or replicate it"
        )
    return _put(x, batch_sharding(m))


def replicate(x, m: Mesh | None = None):
    """``x`` (an array or a pytree of arrays) copied whole onto every device of the mesh."""
    s = replicated(mesh() if m is None else m)
    return jax.tree_util.tree_map(lambda a: _put(a, s), x)


def _int_env(name: str) -> int:
    try:
        return int(os.environ.get(name, "") or 0)
    except ValueError:
        return 0


def _hosts(name: str) -> int:
    value = os.environ.get(name, "").strip()
    return len([h for h in value.split(",") if h.strip()]) if value else 0


def multi_process_env() -> str | None:
    """Why the environment looks like a multi-process job (a short reason), else None."""
    force = os.environ.get("KIPNB_DISTRIBUTED", "").strip().lower()
    if force in ("0", "false", "no", "off"):
        return None
    if force in ("1", "true", "yes", "on"):
        return "KIPNB_DISTRIBUTED=1"
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        if _hosts(name) > 1:
            return f"{name} lists {_hosts(name)} hosts (TPU pod slice)"
    if _int_env("MEGASCALE_NUM_SLICES") > 1:
        return "MEGASCALE_NUM_SLICES > 1 (multislice TPU)"
    if _int_env("SLURM_NTASKS") > 1 and "SLURM_PROCID" in os.environ:
        return "SLURM job with several tasks"
    if _int_env("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI job with several processes"
    return None


_INITIALIZED: list[str] = []


def maybe_initialize_distributed(**kwargs) -> bool:
    """Call ``jax.distributed.initialize(**kwargs)`` if this is a multi-process job.

    Returns True if it initialized (now or on an earlier call), False for a single
    process (Colab, one TPU VM, one GPU machine, CPU), where nothing is done. Must run
    before any other JAX computation. ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` fill
    ``num_processes`` / ``process_id`` when ``JAX_COORDINATOR_ADDRESS`` is used; see the
    module docstring for the variables that are read.
    """
    if _INITIALIZED:
        return True
    reason = multi_process_env()
    if reason is None:
        return False
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        if "JAX_NUM_PROCESSES" in os.environ:
            kwargs.setdefault("num_processes", _int_env("JAX_NUM_PROCESSES"))
        if "JAX_PROCESS_ID" in os.environ:
            kwargs.setdefault("process_id", _int_env("JAX_PROCESS_ID"))
    jax.distributed.initialize(**kwargs)
    _INITIALIZED.append(reason)
    return True
