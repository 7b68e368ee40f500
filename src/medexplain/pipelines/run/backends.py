"""Backends execute chunks of cases with :class:`~medexplain.pipelines.run.worker.CaseProcessor`.

- ``local`` (default): worker processes on this machine, one per core by default (``num_workers``), forked
  from a fork server that has imported torch, MONAI, medexplain and the model's loader once (started while
  the run checks its inputs), each loading the model once and running torch with its share of the cores as
  threads, taking chunks as it frees up, exiting when the run's process ends; one worker (or a model given
  as a module object, which cannot be sent to a process) runs in this process. A CUDA run defaults to one
  worker per GPU.
- ``ray``: one Ray actor per worker, each loading the model once and taking chunks as it frees up.
  Without an address Ray starts its own local cluster; with ``address`` (``HOST:6379``, or ``auto`` on
  a cluster node; ``ray://HOST:10001`` with Ray Client installed) it joins an existing one. Each actor
  asks for one CPU (and one GPU when the cluster has GPUs or ``torch.cuda.is_available()``, unless the run's
  device is ``cpu``), places its model on the run's ``--device`` and runs torch with that many threads.

Both call the same code on the same chunks, so they write the same maps and records.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import torch

from medexplain.errors import MedexplainError
from medexplain.pipelines.run.worker import CaseProcessor, WorkerSpec

BACKENDS = ("local", "ray")


class BackendError(MedexplainError, RuntimeError):
    """A backend cannot start or lost its workers (Ray missing, cluster unreachable, actors died)."""


def run_local(chunks: list, spec: WorkerSpec, on_chunk: Callable[[list], None] | None = None,
              processor: CaseProcessor | None = None) -> None:
    """Process the chunks in this process, in order (``spec.threads``: torch intra-op threads)."""
    proc = processor or CaseProcessor(spec)
    for chunk in chunks:
        recs = proc.process(chunk)
        if on_chunk:
            on_chunk(recs)


def cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or ``taskset``'s share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_workers(spec: WorkerSpec, num_workers: int | None, n_chunks: int) -> tuple[int, int]:
    """``(processes, threads per process)`` of the local backend: ``num_workers`` processes (default one per
    core, or one per GPU for a run on CUDA), no more than there are chunks, sharing the cores as threads."""
    n = cores()
    on_gpu = spec.device != "cpu" and torch.cuda.is_available() and (spec.device or "auto") != "cpu"
    if num_workers is None:
        num_workers = max(1, torch.cuda.device_count()) if on_gpu else n
    workers = max(1, min(int(num_workers), n_chunks or 1))
    return workers, max(1, n // workers)


_PROCESSOR: CaseProcessor | BackendError | None = None   # this worker process's (or why it has none)


def start_method() -> str:
    """How local workers start: ``forkserver`` where the platform has it (Linux, macOS), else ``spawn``.

    Not plain ``fork``: the run's process may hold OpenMP and BLAS thread pools (it has run the model for the
    checks), which a forked child inherits broken. The fork server is a fresh interpreter that only imports
    (:func:`preload_modules`, once per run process) and forks each worker from that state, so a worker starts
    in milliseconds instead of importing torch, MONAI and medexplain itself (seconds of CPU per worker)."""
    import multiprocessing as mp
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


def preload_modules(spec: WorkerSpec) -> list[str]:
    """What the fork server imports once for every worker: the main module (as ``spawn`` would import it in
    each worker), MONAI (every case imports it; alone it costs a worker seconds of CPU), the worker's code
    (torch, medexplain) and the loader of a zoo, bundle or nnU-Net model. Not a ``package.module:factory``
    model's own module: the fork server starts before this process has checked that it imports, and a
    module that raises would take the fork server down (ImportError is skipped: each worker imports it)."""
    src = spec.model.source   # the run's ModelSpec
    models = src if isinstance(src, (list, tuple)) else [src]
    mods = ["__main__", "monai", "medexplain.pipelines.run.worker"]
    if any(isinstance(m, str) and m.startswith("zoo:") for m in models):
        mods.append("medexplain.models.zoo")
    if spec.model.bundle is not None:
        mods.append("medexplain.models.bundle")
    if spec.model.nnunet is not None:
        mods += ["nnunetv2", "medexplain.models.nnunet"]
    return mods


def _worker_context(spec: WorkerSpec):
    """The multiprocessing context of the local workers (:func:`start_method`), its fork server (if any)
    started now with :func:`preload_modules` (a fork server already running keeps its own)."""
    import multiprocessing as mp
    ctx = mp.get_context(start_method())
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver
        ctx.set_forkserver_preload(preload_modules(spec))
        forkserver.ensure_running()
    return ctx


def prestart(spec: WorkerSpec, num_workers: int | None, n_chunks: int) -> None:
    """Start the local workers' fork server now when the run will use worker processes, so that its imports
    (seconds) overlap this process's own checks (loading the model, probing it) instead of following them."""
    if local_workers(spec, num_workers, n_chunks)[0] > 1:
        _worker_context(spec)


def _die_with_parent() -> None:
    """A worker must not outlive its run: a SIGKILLed ``medexplain run`` cannot stop its pool, and an orphan
    would go on writing into the folder that ``--resume`` is completing. Each worker watches the run's
    process through multiprocessing's parent sentinel (a pipe whose other end only the run holds: it closes
    when the run ends, however it ends); when it closes, the worker exits at once. This holds for workers
    forked by the fork server too, whose parent process is the fork server, not the run."""
    import multiprocessing
    import threading
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        parent.join()   # returns when the run's end of the pipe closes
        os._exit(1)

    threading.Thread(target=watch, name="medexplain-run-watch", daemon=True).start()


def _start_worker(spec: WorkerSpec, environ: dict) -> None:
    global _PROCESSOR
    import signal
    _die_with_parent()
    if environ != os.environ:   # the run's environment now (credentials, CUDA_VISIBLE_DEVICES), as spawn gives it,
        os.environ.clear()      # not the fork server's from when it started
        os.environ.update(environ)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent handles ^C and stops the pool
    try:
        _PROCESSOR = CaseProcessor(spec)
    except Exception as e:   # said by the first chunk (an initializer that raises only breaks the pool)
        _PROCESSOR = BackendError(f"a local worker could not load the model: {_cause(e)}")


def _cpu_seconds() -> float:
    """CPU seconds of this whole process since it started (or was forked), its start-up included."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _process(chunk: list) -> tuple[list, int, float]:
    if isinstance(_PROCESSOR, BackendError):
        raise _PROCESSOR
    return _PROCESSOR.process(chunk), os.getpid(), _cpu_seconds()


class _RayWorker(CaseProcessor):
    """The Ray actor: a :class:`CaseProcessor` that also tells the CPU seconds of its whole process, measured
    as the local workers' are."""

    def cpu_seconds(self) -> float:
        return _cpu_seconds()


def run_processes(chunks: list, spec: WorkerSpec, workers: int, threads: int,
                  on_chunk: Callable[[list], None] | None = None) -> dict:
    """Process the chunks on ``workers`` local processes (:func:`start_method`), each with ``threads`` torch
    threads, loading the model once, taking one chunk at a time from the queue as it frees up (no worker
    idles while chunks wait); ``on_chunk`` runs here as each chunk finishes (this process sleeps in
    between). Returns the workers summary, with the workers' CPU seconds (whole processes)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    wspec = WorkerSpec(**{**spec.__dict__, "threads": threads})
    ctx = _worker_context(wspec)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_start_worker,
                               initargs=(wspec, dict(os.environ)))
    cpu: dict[int, float] = {}
    try:
        queue, pending = list(chunks), set()
        while queue or pending:
            while queue and len(pending) < workers:   # one chunk per worker in flight: the rest wait here
                pending.add(pool.submit(_process, queue.pop(0)))
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                try:
                    recs, pid, cpu[pid] = f.result()
                except BrokenProcessPool as e:
                    raise BackendError("a local worker process died; finished items are saved, rerun with --resume: "
                                       f"{e}") from e
                if on_chunk:
                    on_chunk(recs)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return {"workers": workers, "threads_per_worker": threads, "processes": True,
            "start_method": ctx.get_start_method(), "worker_cpu_seconds": round(sum(cpu.values()), 3)}


def ray_module():
    try:
        import ray
    except ImportError as e:
        raise BackendError("the ray backend needs Ray: pip install 'medexplain[ray]' (or pip install ray), "
                           "or use --backend local") from e
    return ray


def run_ray(chunks: list, spec: WorkerSpec, num_workers: int | None = None, address: str | None = None,
            on_chunk: Callable[[list], None] | None = None, cpus_per_worker: int = 1) -> dict:
    """Process the chunks on Ray actors; returns a summary of the workers used."""
    ray = ray_module()
    started_here = not ray.is_initialized()
    if started_here:
        # Workers import what the driver imports (module:factory models, an editable install).
        path = os.pathsep.join(dict.fromkeys([os.getcwd(), *[p for p in sys.path if p]]))
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
        except Exception as e:
            where = f"the Ray cluster at {address!r}" if address else "a local Ray cluster"
            raise BackendError(f"cannot start or join {where}: {type(e).__name__}: {e}") from e
    try:
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        use_gpu = spec.device != "cpu" and (gpus > 0 or torch.cuda.is_available())   # --device cpu: CPU actors
        if num_workers is None:
            num_workers = max(1, gpus if use_gpu and gpus else int(res.get("CPU", 1)) // cpus_per_worker)
        num_workers = max(1, min(num_workers, len(chunks) or 1))
        wspec = WorkerSpec(**{**spec.__dict__, "threads": cpus_per_worker})
        actor_cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0,
                               max_restarts=1, max_task_retries=1)(_RayWorker)
        actors = [actor_cls.remote(wspec) for _ in range(num_workers)]
        try:
            devices = ray.get([a.ping.remote() for a in actors])
        except Exception as e:
            raise BackendError(f"Ray workers could not load the model: {_cause(e)}") from e
        pending, queue = {}, list(chunks)
        for a in actors:
            if queue:
                pending[a.process.remote(queue.pop(0))] = a
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            actor = pending.pop(ref)
            try:
                recs = ray.get(ref)
            except Exception as e:
                raise BackendError(f"a Ray worker failed; finished items are saved, rerun with --resume: "
                                   f"{_cause(e)}") from e
            if on_chunk:
                on_chunk(recs)
            if queue:
                pending[actor.process.remote(queue.pop(0))] = actor
        cpu = ray.get([a.cpu_seconds.remote() for a in actors])
        for a in actors:
            ray.kill(a)
        return {"workers": num_workers, "devices": devices, "gpus_per_worker": 1 if use_gpu else 0,
                "cpus_per_worker": cpus_per_worker, "worker_cpu_seconds": round(sum(cpu), 3)}
    finally:
        if started_here:
            ray.shutdown()


def _cause(e: Exception) -> str:
    """One line naming a worker's error (a Ray error's own cause)."""
    cause = getattr(e, "cause", None)
    e = cause if isinstance(cause, Exception) else e
    return " ".join(f"{type(e).__name__}: {e}".split())[:500]
