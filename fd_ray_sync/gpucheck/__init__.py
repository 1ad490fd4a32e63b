"""One-GPU check of the co-located (``ipc``) transport, runnable on a bare GPU machine.

    python -m fd_ray_sync.gpucheck                    # anywhere torch and numpy are
    python -m fd_ray_sync.gpucheck --device cpu       # CPU smoke run over shared memory

The package imports torch, numpy and the standard library only: no Ray, paddle, pydantic or other
fd_ray_sync module (``fd_ray_sync/__init__`` imports its names lazily, so ``-m`` needs none of
them). Its modules, each importing only its siblings::

    plan      the synthetic model, bucket plans, checksums (pure)
    proc      the control block (``Ctl``), host pinning, what trainer and ranks share
    floor     the trainer's floor copies        trainer   the trainer process
    rank      a rank process                    tree      each child's loop, the parent's side
    report    rows, verdict, table              parent    arguments and ``main``
    fleet_path  the fleet's own ipc rank path on one GPU (its own command, see that module)
    (the batched-copy kernel is ``fd_ray_sync.cuda_copy``, imported only for --copies batched)

Processes (torch.multiprocessing, spawn), all on one GPU (cuda:0)::

    parent    sends one command at a time (floor, setup, then each method), collects results,
    |         kills the tree on a timeout or a death and starts a fresh one for what is left
    +- trainer  the model (~--gib GiB of bfloat16 in 900 tensors), the bucket ring, the host ring
    +- rank0    its TP slices of every tensor, allocated once and written in place
    +- rank1

Model: 90 layers of 4 matrices split by rows (rank r: rows [r*R/2, (r+1)*R/2), contiguous),
4 split by columns (rank r: the strided view [:, r*C/2:(r+1)*C/2]) and 2 replicated vectors.

Setup, once: the trainer shares every handle once, as one pickled message per rank (torch's
CUDA IPC reductions; shared-memory file descriptors on CPU): its parameter tensors with a table
of (data_ptr, shape), the ring buckets, the host buckets and the interprocess "ready" events.
Each rank sends the handles of its "released" events. Everyone opens the other side's handles
once and keeps them for every update. Nobody opens its own handles.

One update, any method, through a shared int64 control block (``Ctl``)::

    trainer  change every tensor in place (bits + 1, masked to finite bf16); write each rank's
             expected checksum; synchronize
    rank     IDLE[r] = u                      (registered: after checking the pointer table)
    trainer  T0 = now; GO = u
             ... the method moves the bytes ...
    rank     synchronize; T1[r] = now; DONE[r] = u        time of the update = max(T1) - T0
    rank     compare its params bit for bit with its slices of the trainer's tensors (opened
             via IPC) and its checksum with the trainer's; VERIFIED[r] = u
    trainer  waits VERIFIED before changing its tensors again

Methods:

- ``floor``: one device-to-device copy of a flat buffer of all the model's bytes (plus, as
  information, the same bytes as 1800 slice copies in one process, and one big pinned
  host-to-device copy: the reference of ``host``).
- ``ring``: bucket g of the update uses slot s = g % R. The trainer waits RELEASED[r][s] >= g-R
  from both ranks, makes its stream wait their RELEASED_EV[r][s], packs whole tensors into the
  slot (device-to-device), records READY_EV[s] and sets READY[s] = g. A rank waits READY[s] = g,
  makes its stream wait READY_EV[s], copies its slices (``view[rows]``, or the strided 2-D
  ``view[:, cols]``, never ``.contiguous()`` first) into its params in place, records
  RELEASED_EV[r][s] and sets RELEASED[r][s] = g. The host flags only say which record of an
  event to wait for; the GPU orders the bytes.
- ``ring_hostsync``: the same ring with a stream synchronize instead of the events.
- ``registered``: no pack. Ranks copy their slices straight from the trainer's tensors, which
  the trainer changed in place (and synchronized before GO). Each update the trainer sends the
  (data_ptr, shape) table and a rank refuses, copying nothing, if it differs from what it
  registered. Self-test after the timed updates: the trainer reallocates one tensor, both ranks
  must refuse that update, the trainer re-registers the tensor, one more update must verify.
- ``host``: pinned host buckets (for a trainer on another GPU): the trainer copies each rank's
  slice contiguous into host slot s (device to host), synchronizes, sets READY[s]; ranks copy
  host to device straight into their params, synchronize, set RELEASED[r][s]. Host buckets are
  shared memory page-locked in each process with cudaHostRegister.

How a bucket's copies are launched on CUDA (``--copies``; every method but ``host``):

- ``batched`` (default where ``cuda.bindings`` imports): every copy of the bucket cut into
  ~128 KiB tiles, one kernel for all of them (``fd_ray_sync/cuda_copy.py``), captured once
  in a CUDA graph;
- ``graph``: the bucket's torch copies captured once in a CUDA graph;
- ``eager``: each copy launched from Python.

A graph is captured before an update is timed, holds the pointers of the views it was built
from, and is dropped with them when a tensor moves (re-registration). A strided column slice
is copied through int64 views of both sides (``fd_ray_sync.params.wide_pair``): same bits, a
quarter of the elements. Measured on an H200 (docs/benchmarks.md): registered 0.37x of the
floor with each bfloat16 copy from Python, 0.79x batched, 0.90x batched under an MPS daemon
(which lets the three processes' kernels run side by side; the report says whether one ran).

Memory: each process reports torch.cuda.max_memory_allocated() over the transfer of an update
minus what it held before (peaks reset after setup). Memory opened through CUDA IPC is not
counted by the opener's allocator, so a rank's figure counts only what it allocated itself.

CPU mode (``--device cpu``): the same processes, control block, plans, slicing, ordering, checks
and reallocation refusal with CPU tensors in shared memory (``share_memory_()``) instead of
CUDA IPC and no events (CPU copies are synchronous). Its timings are only printed.

The control block relies on aligned 8-byte stores being atomic and ordered (x86-64); on GPU the
bytes themselves are ordered by events or stream synchronization, not by the host flags.
"""
