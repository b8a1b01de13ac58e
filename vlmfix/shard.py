"""One run split over the processes of a launch, and merged back into one output.

Under ``accelerate launch`` / ``torchrun`` (or any launcher that sets ``RANK`` and
``WORLD_SIZE``), ``vlmfix caption`` and ``vlmfix eval pope|chair`` run data-parallel. Each
process (rank) loads its own model on its own device (``cuda:LOCAL_RANK``), and the ranks
coordinate through files next to the output ``OUT``, so no collective ever waits on a
rank that is still generating (collectives time out; a resumed run can leave one rank
far more work than another):

1. **Start.** Rank 0 holds the output's :class:`~vlmfix.io.OutputLock` for the whole run
   (the other ranks take none on ``OUT``). Before any rank reads the output, rank 0 folds
   part files left by an interrupted launch into ``OUT`` and runs its checks, then
   publishes the run in ``OUT.shards.json`` (a fresh run id). The other ranks wait for it:
   at a collective barrier when a process group is up (``accelerate.PartialState`` or an
   initialised ``torch.distributed``), else by polling for a start file written after
   they started (``VLMFIX_RUN_ID``, the same in every process, pins it instead).
2. **Split.** Every rank reads the same ``OUT``, lists the items that are not done yet
   and takes every ``world_size``-th of them from its rank on (:func:`shard_items`):
   deterministic, disjoint, balanced also on a resume.
3. **Write.** Each rank appends its records to ``OUT.rank{r}-of-{n}.part.jsonl``, holding
   that part file's lock, so two processes never append to one part.
4. **Finish.** A rank that is done writes ``OUT.rank{r}-of-{n}.done``; one that fails
   writes ``.failed`` with the error. Rank 0 waits for every peer, merges the parts into
   ``OUT`` in the order a single process writes it (atomically), and only then deletes the
   part files and markers. The other ranks wait until rank 0 has merged, so every rank
   returns after the output is complete.

A failed rank makes rank 0 (and every waiting rank) raise :class:`~vlmfix.errors.ShardError`
naming it, so the launch exits non-zero; the finished records stay in the part files and
the same command resumes. A rank that writes nothing for ``VLMFIX_SHARD_TIMEOUT`` seconds
(default 1800) while others wait for it is reported the same way. A single process (no
launcher) never touches any of these files: it writes ``OUT`` directly, as always.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vlmfix.errors import ConfigError, ShardError

__all__ = [
    "DistContext",
    "dist_context",
    "shard_items",
    "part_path",
    "part_files",
    "merge_records",
    "write_records",
    "ShardedRun",
    "TIMEOUT_ENV",
    "RUN_ID_ENV",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_ENV = "VLMFIX_SHARD_TIMEOUT"
RUN_ID_ENV = "VLMFIX_RUN_ID"
DEFAULT_TIMEOUT = 1800.0
_PART_RE = re.compile(r"\.rank(\d+)-of-(\d+)\.part\.jsonl$")


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and device of this process.

    Attributes:
        rank: this process's index in the launch (0 is the main process).
        world_size: processes in the launch.
        barrier: a collective barrier when a process group is up, else None (the ranks
            then meet through files).
        device: this rank's device under a launcher (``cuda:LOCAL_RANK`` or ``cpu``),
            else None.
        local_rank: index of the process on its host.
    """

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] | None = None
    device: str | None = None
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_sharded(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _rank_device(local_rank: int) -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    count = torch.cuda.device_count()
    if local_rank >= count:  # more processes than GPUs: they share them, round robin
        logger.warning("LOCAL_RANK=%d on a host with %d CUDA device(s): GPUs are shared", local_rank, count)
    return f"cuda:{local_rank % count}"


def dist_context() -> DistContext:
    """Return this process's rank, world size, device and barrier.

    - ``WORLD_SIZE`` unset or 1: rank 0 of 1 (torch is not even imported).
    - ``torch.distributed`` already initialised: its rank, world size and barrier.
    - a rendezvous address (``MASTER_ADDR``, set by ``torchrun`` / ``accelerate launch``)
      and accelerate importable: :class:`accelerate.PartialState` (NCCL on GPUs, gloo on
      CPU-only hosts), which also selects this rank's GPU.
    - otherwise ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the environment (e.g.
      processes started by hand or by a scheduler); the ranks then meet through files.

    Raises:
        ConfigError: ``WORLD_SIZE`` > 1 without a valid ``RANK``.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world is None or world <= 1:
        return DistContext()
    import torch

    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        return DistContext(rank, world, dist.barrier, _rank_device(local), local)
    if os.environ.get("MASTER_ADDR"):
        try:
            from accelerate import PartialState
        except ImportError:
            PartialState = None
        if PartialState is not None:
            # Without CUDA, accelerate only sets up gloo when told the run is on CPU.
            state = PartialState(cpu=not torch.cuda.is_available())
            return DistContext(
                state.process_index,
                state.num_processes,
                state.wait_for_everyone,
                str(state.device),
                state.local_process_index,
            )
    rank = _env_int("RANK")
    if rank is None:
        raise ConfigError(f"WORLD_SIZE={world} but RANK is not set; set RANK=0..{world - 1} in each process")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    local = _env_int("LOCAL_RANK", rank)
    return DistContext(rank, world, None, _rank_device(local), local)


def shard_items(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items of ``rank``: every ``world_size``-th one from index ``rank`` on.

    Deterministic and disjoint; together the ranks cover every item once, and their
    shares differ by at most one item.

    Example:
        >>> shard_items(list("abcde"), 1, 2)
        ['b', 'd']
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
    return list(items[rank::world_size])


def part_path(output: str | os.PathLike, rank: int, world_size: int) -> Path:
    """``OUT.rank{r}-of-{n}.part.jsonl``: where rank ``r`` of ``n`` writes its records."""
    out = Path(output)
    return out.with_name(f"{out.name}.rank{rank}-of-{world_size}.part.jsonl")


def part_files(output: str | os.PathLike) -> list[Path]:
    """Every part file of ``output`` on disk, whatever launch wrote it, by (n, r)."""
    out = Path(output)
    found = []
    for p in out.parent.glob(f"{_glob_escape(out.name)}.rank*-of-*.part.jsonl"):
        m = _PART_RE.search(p.name)
        if m and p.name == part_path(out, int(m[1]), int(m[2])).name:
            found.append((int(m[2]), int(m[1]), p))
    return [p for _, _, p in sorted(found)]


def _glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped (an output may be called ``a[1].jsonl``)."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def merge_records(streams: Iterable[Iterable[dict[str, Any]]], key: Callable[[dict], Any]) -> dict[Any, dict]:
    """One record per key over several record streams, in order of first appearance.

    A key keeps its first good record; a key that has only error records (``"error"``
    in the record) keeps the last of them (a retried sample's newer error). Records
    without a key (``key`` returns None) are dropped.
    """
    recs: dict[Any, dict] = {}
    for stream in streams:
        for rec in stream:
            k = key(rec)
            if k is None:
                continue
            old = recs.get(k)
            if old is None or "error" in old:
                recs[k] = rec
    return recs


def write_records(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Atomically replace ``path`` with ``records`` (a temporary file, synced, renamed)."""
    from vlmfix.io import JsonlWriter

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    with JsonlWriter(tmp, fsync=False) as w:
        w.write_many(records)
        w.sync()
    os.replace(tmp, path)


def _process_start_time() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil missing or restricted: the import time of vlmfix.shard
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


class ShardedRun:
    """The ranks of one launch writing one output (see the module docstring).

    Use as a context manager: an exception inside marks this rank failed, so the others
    stop waiting for it. With a single process every method is a no-op except that
    ``start`` runs ``prepare`` and :attr:`part` is the output itself.

    Example:
        >>> with ShardedRun(out, ctx) as run:  # doctest: +SKIP
        ...     run.start(prepare=fold_leftovers)      # rank 0 first, then everyone
        ...     mine = shard_items(todo, ctx.rank, ctx.world_size)
        ...     with JsonlWriter(run.part) as w: ...   # this rank's records
        ...     run.finish(merge)                      # rank 0: merge(parts), then clean up
    """

    def __init__(
        self, output: str | os.PathLike, ctx: DistContext, *, timeout: float | None = None, poll: float = 0.25
    ):
        self.output = Path(output)
        self.ctx = ctx
        if timeout is None:
            timeout = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT)
        self.timeout = timeout
        self.poll = poll
        self.run_id: str | None = None
        self.payloads: list[Any] = []  # after finish(), on rank 0: every rank's payload
        self._part_lock = None
        self._finished = False

    # ------------------------------------------------------------------ files
    @property
    def part(self) -> Path:
        """Where this rank writes: its part file, or the output itself in a single process."""
        if not self.ctx.is_sharded:
            return self.output
        return part_path(self.output, self.ctx.rank, self.ctx.world_size)

    @property
    def start_file(self) -> Path:
        return self.output.with_name(f"{self.output.name}.shards.json")

    def marker(self, rank: int, kind: str) -> Path:
        """``OUT.rank{r}-of-{n}.done`` / ``.failed``."""
        return self.output.with_name(f"{self.output.name}.rank{rank}-of-{self.ctx.world_size}.{kind}")

    def _markers(self) -> list[Path]:
        name = _glob_escape(self.output.name)
        folder = self.output.parent
        return [*folder.glob(f"{name}.rank*-of-*.done"), *folder.glob(f"{name}.rank*-of-*.failed"), self.start_file]

    def _write_json(self, path: Path, data: dict[str, Any]) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, path)

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _progress(self) -> tuple:
        """What changes while any rank works: sizes of the parts, the markers present."""
        sig = []
        for r in range(self.ctx.world_size):
            for p in (part_path(self.output, r, self.ctx.world_size), self.marker(r, "done"), self.marker(r, "failed")):
                try:
                    sig.append((p.name, p.stat().st_size))
                except FileNotFoundError:
                    pass
        return tuple(sig)

    def _wait(self, ready: Callable[[], bool], waiting_for: Callable[[], str]) -> None:
        """Poll ``ready`` until it is true; ShardError after ``timeout`` s without progress."""
        last, since = self._progress(), time.monotonic()
        while not ready():
            time.sleep(self.poll)
            now = self._progress()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since > self.timeout:
                raise ShardError(
                    f"rank {self.ctx.rank} of {self.ctx.world_size} waited {self.timeout:.0f} s for {waiting_for()}, "
                    f"and no rank wrote anything meanwhile. If a process died, re-run the same command to resume "
                    f"(finished records are kept); for slower batches raise ${TIMEOUT_ENV}."
                )

    def _peer_failure(self, rank: int) -> str | None:
        info = self._read_json(self.marker(rank, "failed"))
        if info is not None and info.get("run") == self.run_id:
            return str(info.get("error", "unknown error"))
        return None

    # ------------------------------------------------------------------ protocol
    def start(self, prepare: Callable[[], None] | None = None) -> None:
        """Rank 0 runs ``prepare`` (it holds the output lock; no other rank has read or
        written anything yet), then every rank may read the output and write its part.

        Raises:
            ShardError: rank 0's ``prepare`` failed (on the other ranks), or no start came
                within the timeout (file-based meeting only).
        """
        ctx = self.ctx
        if ctx.is_main:
            for p in self._markers():  # left by an interrupted launch
                p.unlink(missing_ok=True)
        if not ctx.is_sharded:
            if prepare is not None:
                prepare()
            return
        if ctx.is_main:
            error: BaseException | None = None
            try:
                if prepare is not None:
                    prepare()
            except BaseException as exc:  # the other ranks must hear of it, then it is re-raised
                error = exc
            self.run_id = os.environ.get(RUN_ID_ENV) or uuid.uuid4().hex
            self._write_json(
                self.start_file,
                {
                    "run": self.run_id,
                    "world_size": ctx.world_size,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "status": "failed" if error else "running",
                    "error": _describe(error) if error else None,
                },
            )
            if ctx.barrier is not None:
                ctx.barrier()
            if error is not None:
                raise error
        else:
            if ctx.barrier is not None:
                ctx.barrier()
                info = self._read_json(self.start_file)
                if info is None:
                    raise ShardError(f"rank 0 passed the start barrier without writing {self.start_file}")
            else:
                info = self._wait_for_start()
            if info.get("status") == "failed":
                raise ShardError(f"rank 0 failed before the run started: {info.get('error')}")
            if info.get("world_size") != ctx.world_size:
                raise ShardError(
                    f"{self.start_file} is for {info.get('world_size')} processes, this launch has {ctx.world_size}"
                )
            self.run_id = info["run"]
        from vlmfix.io import OutputLock

        self._part_lock = OutputLock(self.part).acquire()

    def _wait_for_start(self) -> dict[str, Any]:
        pinned = os.environ.get(RUN_ID_ENV)
        started = _process_start_time() - 1.0  # file-system timestamps may be coarse
        found: dict[str, Any] = {}

        def ready() -> bool:
            try:
                mtime = self.start_file.stat().st_mtime
            except FileNotFoundError:
                return False
            info = self._read_json(self.start_file)
            if info is None:
                return False
            fresh = info.get("run") == pinned if pinned else mtime >= started
            if fresh:
                found.update(info)
            return fresh

        self._wait(ready, lambda: f"rank 0 to start the run ({self.start_file})")
        return found

    def finish(self, merge: Callable[[list[Path]], None] | None = None, payload: Any = None) -> None:
        """This rank's part is written. Rank 0 waits for every rank, calls
        ``merge(part_paths)`` (writing the output), then deletes the parts and markers;
        the other ranks wait until it has.

        Args:
            merge: rank 0's merge of the part files (also called, with no parts, in a
                single process).
            payload: JSON-serialisable data of this rank (e.g. telemetry counters); on
                rank 0 :attr:`payloads` then holds every rank's, by rank.

        Raises:
            ShardError: another rank failed (its error is in the message) or timed out.
        """
        self._release_part()
        ctx = self.ctx
        self.payloads = [payload]
        if not ctx.is_sharded:
            if merge is not None:
                merge([])
            self._finished = True
            return
        if not ctx.is_main:
            done = self.marker(ctx.rank, "done")
            info = {"run": self.run_id, "pid": os.getpid(), "host": socket.gethostname(), "payload": payload}
            self._write_json(done, info)
            self._finished = True

            def merged() -> bool:
                failure = self._peer_failure(0)
                if failure is not None:
                    raise ShardError(f"rank 0 failed while finishing the run: {failure}")
                return not done.exists()

            self._wait(merged, lambda: "rank 0 to merge the part files")
            return
        pending = set(range(1, ctx.world_size))
        self.payloads = [payload] + [None] * (ctx.world_size - 1)

        def all_done() -> bool:
            for r in sorted(pending):
                failure = self._peer_failure(r)
                if failure is not None:
                    raise ShardError(
                        f"rank {r} of {ctx.world_size} failed: {failure}. The records every rank finished are kept in "
                        f"{part_path(self.output, r, ctx.world_size).name} and the other part files; re-run the "
                        "same command to resume."
                    )
                info = self._read_json(self.marker(r, "done"))
                if info is not None and info.get("run") == self.run_id:
                    pending.discard(r)
                    self.payloads[r] = info.get("payload")
            return not pending

        self._wait(all_done, lambda: f"rank(s) {sorted(pending)} to finish their part")
        parts = [part_path(self.output, r, ctx.world_size) for r in range(ctx.world_size)]
        if merge is not None:
            merge(parts)
        for p in parts:  # only after a successful merge
            p.unlink(missing_ok=True)
        for p in self._markers():
            p.unlink(missing_ok=True)
        self._finished = True

    def _release_part(self) -> None:
        if self._part_lock is not None:
            self._part_lock.release()
            self._part_lock = None

    def fail(self, exc: BaseException) -> None:
        """Mark this rank failed (the other ranks stop waiting and name the error)."""
        self._release_part()
        if self.ctx.is_sharded and self.run_id is not None and not self._finished:
            try:
                self._write_json(
                    self.marker(self.ctx.rank, "failed"),
                    {"run": self.run_id, "error": _describe(exc), "pid": os.getpid(), "host": socket.gethostname()},
                )
            except OSError:  # the original error matters more
                logger.exception("could not mark rank %d failed", self.ctx.rank)

    def __enter__(self) -> ShardedRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.fail(exc)
        else:
            self._release_part()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C or SIGTERM)"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
