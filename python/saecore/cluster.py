"""The data stages on a Ray cluster (``--ray [ADDRESS]`` on index, harvest, encode and pages).

Two engines live here. The index's two-round map-reduce of Rust partials (below), and
:func:`run_parts`: long-lived worker actors (one per GPU, else per CPU) compute ordered *parts* into
checksummed files on the shared path and the driver commits them in order, used by ``harvest``
and ``encode`` (their part workers and commit functions live in their own modules). ``pages`` uses
plain tasks and :func:`gather`.

The index is a mergeable reduction (see ``rust/saecore/src/mining/partial.rs``): a task mines a range
of shards into a *partial* (compact little-endian bytes with a CRC-32C), partials are merged in a tree
of tasks, and :func:`finish <saecore._native.finish_partials>` turns the root into exactly the arrays the
in-process :func:`saecore._native.mine` returns (the in-process path runs through the same partials).
Two map-reduce rounds: pass 1 (counts, exact sums, extrema, top-k candidates), then — with pass 1's
extrema broadcast once through the object store — pass 2 (histogram counts, sample candidates).

The driver holds object references and, at the end of each round, the one merged partial: never more
than the merge state. Every merge task checks each input's checksum and shard coverage first; a part
that fails is refused and recomputed from the store in that task, never merged. A worker process that
dies mid-task is retried by Ray (``max_retries``), and since a partial depends only on its shards the
retried result is the same bytes.

Ray is imported only here and only when ``--ray`` is used, so saecore works without it installed.
Storage: every worker opens the feature store by path, so the path must be one every node sees (a
shared filesystem); see docs/scale.md for object storage.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _native
from .errors import CorruptDataError, SaecoreError

MERGE_FAN_IN = 4
"""Partials merged per merge task: a tree of depth log4(tasks), so no task holds more than 4 + 1."""

TASK_RETRIES = 3
"""Ray retries a task this often when its worker process dies (e.g. killed by SIGKILL or the OOM killer)."""

HOLD_DIR_ENV = "SAECORE_TEST_HOLD_DIR"
"""Test hook (fault tests only): while ``$SAECORE_TEST_HOLD_DIR/armed`` exists, the first attempt of each
map task (and each part) writes its PID to a marker file ``task-TAG`` there and waits — until ``armed``
goes or ``release-TAG`` appears — so a test can SIGKILL a worker, or the driver, mid-run."""


class RayUnavailableError(SaecoreError):
    """``--ray`` was given but Ray is not installed, or the cluster cannot be reached."""


# --- connecting ---------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise RayUnavailableError(
            "--ray needs the `ray` package, which is not installed: pip install 'saecore[ray]'"
        ) from e
    return ray


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse an address whose head node does not answer, instead of letting Ray retry for minutes."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RayUnavailableError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379), 'auto' or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayUnavailableError(f"cannot reach the Ray cluster at {address}: {e} (is `ray start --head` running there?)") from e


def _use_token_if_available(address: str | None) -> None:
    """Joining a cluster started by ``ray start --head`` (token authentication on by default since Ray
    2.5x) needs ``RAY_AUTH_MODE=token`` in the driver; Ray only infers it for ``ray.init()`` without an
    address. Infer it the same way here: the mode unset and a token present."""
    if address in (None, "local") or "RAY_AUTH_MODE" in os.environ or "ray" in sys.modules:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def _join_error(address: str | None, error: Exception) -> RayUnavailableError:
    """Ray's failure to join, as one line (an authentication failure says how to pass the token)."""
    chain, cause = [], error
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__
    if any("AuthenticationError" in f"{type(c).__name__} {c}" for c in chain):
        return RayUnavailableError(
            f"the Ray cluster at {address} uses token authentication and refused this driver (no token, or another "
            "cluster's): set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to its token "
            "(on its head node: ray get-auth-token)")
    first = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
    return RayUnavailableError(f"cannot join the Ray cluster at {address}: {first}")


def connect(address: str | None = None) -> Any:
    """Join the Ray cluster at ``address`` (``HOST:PORT``, ``auto`` or ``ray://…``), or start a local
    one when ``address`` is None or ``"local"``; returns the ``ray`` module. Reuses a runtime already
    initialised in this process. Every node's workers must import the driver's saecore
    (:func:`check_workers`), checked once per runtime."""
    _use_token_if_available(address)  # before Ray is imported: it reads RAY_AUTH_MODE once
    ray = _import_ray()
    if not ray.is_initialized():
        if address not in (None, "local"):
            _check_reachable(address)
        try:
            ray.init(address=None if address in (None, "local") else address, log_to_driver=False,
                     include_dashboard=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise _join_error(address, e) from e
    check_workers(ray)
    return ray


# --- every node's workers import the same saecore -----------------------------------------------

PROBE_TIMEOUT_S = 180.0
"""How long the workers' saecore check waits for a worker process on every node to start."""

# The probe travels by value (compiled from this source, outside any importable module), so it runs
# on a worker that cannot import saecore — which is what it is there to find out.
_PROBE_SOURCE = """
def probe():
    import socket
    try:
        from saecore import _native
    except Exception as e:
        return socket.gethostname(), None, f"{type(e).__name__}: {e}"
    return socket.gethostname(), _native.__version__, None
"""

_checked_jobs: set[str] = set()


def _probe_function() -> Any:
    namespace: dict[str, Any] = {"__name__": "saecore_worker_probe"}
    exec(compile(_PROBE_SOURCE, "<saecore worker probe>", "exec"), namespace)  # noqa: S102 (a constant source)
    return namespace["probe"]


def check_workers(ray: Any) -> None:
    """Run one probe on every live node: a worker that cannot import saecore, or imports another
    version than the driver's, is refused here in one line, before any work is scheduled."""
    job = ray.get_runtime_context().get_job_id()
    if job in _checked_jobs:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_function())
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote():
            n.get("NodeManagerAddress", n["NodeID"]) for n in nodes}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    if len(ready) < len(refs):
        raise RayUnavailableError(f"no Ray worker started within {PROBE_TIMEOUT_S:.0f} s on node(s) "
                                  f"{', '.join(refs[r] for r in refs if r not in ready)}")
    for ref, ip in refs.items():
        host, version, error = ray.get(ref)
        if error is not None:
            raise RayUnavailableError(f"the Ray workers on node {host} ({ip}) cannot import saecore ({error}); install "
                                      f"saecore {_native.__version__} on every node: pip install 'saecore[ray]'")
        if version != _native.__version__:
            raise RayUnavailableError(f"the Ray workers on node {host} ({ip}) run saecore {version}, this driver "
                                      f"{_native.__version__}: install the same version on every node")
    _checked_jobs.add(job)


# --- tasks (plain functions; wrapped with ray.remote on first use) ------------------------------


def _hold_if_armed(tag: str) -> None:
    hold = os.environ.get(HOLD_DIR_ENV)
    if not hold or not (Path(hold) / "armed").exists():
        return
    marker = Path(hold) / f"task-{tag}"
    if marker.exists():  # a retry: run normally
        return
    marker.write_text(str(os.getpid()))
    deadline = time.time() + 120
    while (Path(hold) / "armed").exists() and not (Path(hold) / f"release-{tag}").exists() and time.time() < deadline:
        time.sleep(0.05)


def _map_task(path: str, first: int, end: int, pass_: int, params: dict[str, Any], extrema: bytes | None) -> tuple[bytes, int]:
    """Mine shards ``first..end`` into a partial; returns ``(partial, parts redone)``."""
    _hold_if_armed(f"{pass_}-{first}")
    return _native.mine_partial(path, first, end, pass_=pass_, extrema=extrema, **params), 0


def _merge_task(
    path: str, pass_: int, params: dict[str, Any], extrema: bytes | None, covers: list[tuple[int, int]], *parts: tuple[bytes, int]
) -> tuple[bytes, int]:
    """Merge ``parts`` (``parts[i]`` must cover shards ``covers[i]``); a part that fails its checksum
    or covers other shards is refused and recomputed here from the store, never merged."""
    checked, redone = [], sum(r for _, r in parts)
    for (first, end), (part, _) in zip(covers, parts):
        try:
            ok = _native.check_partial(part) == (pass_, [(first, end)] if end > first else [])
        except CorruptDataError as e:
            print(f"saecore: partial for shards {first}..{end} refused ({e}); recomputing it", file=sys.stderr)
            ok = False
        if not ok:
            part = _native.mine_partial(path, first, end, pass_=pass_, extrema=extrema, **params)
            redone += 1
        checked.append(part)
    return _native.merge_partials(checked), redone


def merge_parts(
    path: str | os.PathLike[str], pass_: int, params: dict[str, Any], extrema: bytes | None,
    covers: list[tuple[int, int]], parts: list[bytes],
) -> tuple[bytes, int]:
    """The merge step run in-process (what a merge task runs): returns ``(merged, parts redone)``."""
    return _merge_task(str(path), pass_, params, extrema, covers, *[(p, 0) for p in parts])


# --- driving ------------------------------------------------------------------------------------


def shard_ranges(num_shards: int, shards_per_task: int) -> list[tuple[int, int]]:
    """Contiguous shard ranges of ``shards_per_task`` shards (the last may be shorter)."""
    if shards_per_task < 1:
        raise ValueError(f"shards_per_task must be at least 1, got {shards_per_task}")
    return [(a, min(a + shards_per_task, num_shards)) for a in range(0, num_shards, shards_per_task)] or [(0, 0)]


def _round(ray: Any, remote: dict[str, Any], path: str, pass_: int, params: dict[str, Any], extrema: Any,
           ranges: list[tuple[int, int]], bar: Any) -> tuple[bytes, int]:
    """One map-reduce round: a map task per range, then a tree of merge tasks over adjacent groups."""
    level = [(rng, remote["map"].remote(path, rng[0], rng[1], pass_, params, extrema)) for rng in ranges]
    _track(ray, [ref for _, ref in level], bar)
    while True:
        groups = [level[i:i + MERGE_FAN_IN] for i in range(0, len(level), MERGE_FAN_IN)]
        level = [
            ((g[0][0][0], g[-1][0][1]), remote["merge"].remote(path, pass_, params, extrema, [r for r, _ in g], *[ref for _, ref in g]))
            for g in groups
        ]
        if len(level) == 1:
            return ray.get(level[0][1])


def _track(ray: Any, refs: list[Any], bar: Any) -> None:
    """Advance the driver's bar as map tasks finish (without fetching their results)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2, fetch_local=False)
        bar.update(len(done))


def _remote_functions(ray: Any) -> dict[str, Any]:
    return {
        "map": ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(_map_task),
        "merge": ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(_merge_task),
    }


def mine(
    features: str | os.PathLike[str], num_shards: int, params: dict[str, Any], *,
    address: str | None = None, shards_per_task: int | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Mine the feature store ``features`` on Ray; returns the same dict as ``_native.mine``.

    ``shards_per_task`` defaults to about four tasks per CPU of the cluster.
    """
    from tqdm.auto import tqdm

    ray = connect(address)
    path = str(Path(features).resolve())
    if shards_per_task is None:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        shards_per_task = max(1, math.ceil(num_shards / (4 * cpus)))
    ranges = shard_ranges(num_shards, shards_per_task)
    remote = _remote_functions(ray)
    with tqdm(total=2 * len(ranges), unit="task", desc="index (ray)", disable=not progress, file=sys.stderr) as bar:
        pass1, redone1 = _round(ray, remote, path, 1, params, None, ranges, bar)
        extrema = _native.mine_extrema(pass1, num_shards)
        pass2, redone2 = _round(ray, remote, path, 2, params, ray.put(extrema), ranges, bar)
    if redone1 + redone2:
        print(f"saecore: {redone1 + redone2} partial(s) failed their checksum and were recomputed", file=sys.stderr)
    return _native.finish_partials(path, pass1, pass2)


# --- long-lived workers over ordered parts (harvest, encode) ------------------------------------
#
# A stage that loads something expensive (a model, an SAE) runs as one Ray actor per worker (a GPU
# each when the cluster has GPUs, else a CPU): the actor loads it once and then computes *parts*
# (contiguous ranges of the stage's work) into files on the shared path, returning only a receipt.
# The driver commits the parts strictly in order, so the result equals a one-process run. A part
# already staged on disk by an earlier (killed) driver is committed without being computed again; a
# part that fails its checksum when the driver reads it is deleted and computed again, never merged.

ACTOR_RESTARTS = 3
"""Ray restarts a worker actor this often when its process dies, and retries the part it was running."""


class PartRefused(Exception):
    """Raised by a stage's commit function: the staged part is damaged (deleted; it will be redone)."""


@dataclass
class PartStats:
    """What a parts run did: parts computed by workers, found staged by an earlier run, refused and redone."""

    computed: int = 0
    reused: int = 0
    redone: int = 0
    restarts: int = 0

    def summary(self) -> str:
        return (f"parts: {self.computed} computed, {self.reused} reused from an earlier run, "
                f"{self.redone} refused and redone, {self.restarts} worker restart(s)")


class _PartWorker:
    """The actor: builds the stage's worker once (``factory(*args)``), then runs parts on it."""

    def __init__(self, factory: Any, args: tuple[Any, ...]):
        self.impl = factory(*args)

    def describe(self) -> Any:
        """What the stage's worker reports about itself (e.g. the model it loaded)."""
        return self.impl.describe()

    def run(self, part: Any) -> int:
        """Compute ``part`` into its staged files; returns this process's PID (a new one after a restart)."""
        _hold_if_armed(f"part-{part.key}")
        self.impl.run(part)
        return os.getpid()


def start_workers(ray: Any, factory: Any, args: tuple[Any, ...], workers: int | None) -> list[Any]:
    """One actor per GPU of the cluster (or per CPU without GPUs), or ``workers`` of them."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    per_actor = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": 1}
    count = workers or gpus or max(1, int(resources.get("CPU", 1)))
    cls = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS, **per_actor)(_PartWorker)
    return [cls.remote(factory, args) for _ in range(count)]


@dataclass
class _Slot:
    part: Any
    staged: bool = False
    ref: Any = None
    refusals: int = 0


def run_parts(ray: Any, actors: list[Any], parts: Any, staged: Any, commit: Any, bar: Any) -> PartStats:
    """Compute ``parts`` (an iterable of objects with a ``key``) on ``actors`` and ``commit`` them in order.

    ``staged(part)`` says whether a part's files are already on disk (an earlier run computed them);
    ``commit(part)`` reads, verifies and merges them, raising :class:`PartRefused` when they are
    damaged. At most ``4 × actors`` parts are outstanding, so staged files stay bounded.
    """
    stats, window, busy, pids = PartStats(), deque[_Slot](), {}, {}
    idle, source, exhausted = list(actors), iter(parts), False
    while True:
        while not exhausted and len(window) < 4 * len(actors):
            part = next(source, None)
            if part is None:
                exhausted = True
            else:
                window.append(_Slot(part, staged=staged(part)))
                stats.reused += window[-1].staged
        for slot in window:
            if idle and not slot.staged and slot.ref is None:
                actor = idle.pop()
                slot.ref = actor.run.remote(slot.part)
                busy[slot.ref] = (slot, actor)
        while window and window[0].staged:
            try:
                commit(window[0].part)
            except PartRefused as e:
                window[0].staged, window[0].refusals = False, window[0].refusals + 1
                if window[0].refusals > ACTOR_RESTARTS:
                    raise CorruptDataError(f"{e}, {window[0].refusals} times in a row; giving up") from e
                print(f"saecore: {e}; computing the part again", file=sys.stderr)
                stats.redone += 1
                break
            window.popleft()
            bar.set_postfix_str(f"workers {len(actors)}, restarts {stats.restarts}", refresh=False)
        if not window and exhausted:
            return stats
        if busy:
            _collect(ray, busy, idle, pids, stats)


def _collect(ray: Any, busy: dict[Any, Any], idle: list[Any], pids: dict[Any, int], stats: PartStats) -> None:
    """Wait for at least one running part; mark finished ones staged (a failed part raises here)."""
    done, _ = ray.wait(list(busy), num_returns=1, timeout=None)
    for ref in done:
        slot, actor = busy.pop(ref)
        idle.append(actor)
        try:
            pid = ray.get(ref)
        except ray.exceptions.RayError as e:
            raise worker_error(f"part {slot.part.key} failed", e) from None
        stats.restarts += actor in pids and pids[actor] != pid
        pids[actor] = pid
        slot.ref, slot.staged = None, True
        stats.computed += 1


def worker_error(what: str, error: Exception) -> Exception:
    """A worker's failure as the driver reports it: the worker's own saecore error or ValueError when
    there is one (its one-line message), else a :class:`SaecoreError` with the last line of Ray's."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, (SaecoreError, ValueError, KeyError, FileNotFoundError)):
        return cause
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    return SaecoreError(f"{what}: {lines[-1].strip() if lines else type(error).__name__}")


def gather(ray: Any, refs: dict[Any, Any]) -> Any:
    """Yield the results of task ``refs`` as they finish (any order); a failed task raises here."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=None)
        for ref in done:
            try:
                yield ray.get(ref)
            except ray.exceptions.RayError as e:
                raise worker_error("a task failed", e) from None
