"""vlmfix.shard: the split, the part-file names, the merge rule, rank detection, and the
file protocol of a launch (ranks played by threads of one process, meeting through files)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from vlmfix.errors import ConfigError, ShardError
from vlmfix.io import JsonlWriter, read_jsonl
from vlmfix.shard import (
    DistContext,
    ShardedRun,
    dist_context,
    merge_records,
    part_files,
    part_path,
    shard_items,
)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_split_is_disjoint_complete_balanced_and_deterministic(n, world):
    items = [f"item{i}" for i in range(n)]
    shares = [shard_items(items, r, world) for r in range(world)]
    flat = [x for share in shares for x in share]
    assert sorted(flat) == sorted(items) and len(set(flat)) == n
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shares == [shard_items(items, r, world) for r in range(world)]
    for share in shares:  # each share keeps the items' order
        assert share == sorted(share, key=items.index)


def test_split_rejects_a_bad_rank():
    with pytest.raises(ConfigError, match="rank 2 is outside 0..1"):
        shard_items([1, 2, 3], 2, 2)


def test_part_files_are_found_by_name_and_sorted(tmp_path):
    out = tmp_path / "a[1].jsonl"  # glob metacharacters in the output's name
    assert part_path(out, 1, 2).name == "a[1].jsonl.rank1-of-2.part.jsonl"
    made = [part_path(out, r, n) for n, r in [(4, 3), (2, 1), (2, 0), (4, 0)]]
    for p in made:
        p.write_text("")
    for lookalike in [
        "a[1].jsonl.rank1-of-2.part.jsonl.lock",
        "b.jsonl.rank0-of-2.part.jsonl",
        "a[1].jsonl.rankX-of-2.part.jsonl",
    ]:
        (tmp_path / lookalike).write_text("")
    assert [p.name for p in part_files(out)] == [
        "a[1].jsonl.rank0-of-2.part.jsonl",
        "a[1].jsonl.rank1-of-2.part.jsonl",
        "a[1].jsonl.rank0-of-4.part.jsonl",
        "a[1].jsonl.rank3-of-4.part.jsonl",
    ]


def test_merge_keeps_the_first_good_record_else_the_last_error():
    main = [{"k": "a", "v": 1}, {"k": "b", "error": "old"}, {"k": "c", "error": "old"}, {"v": "no key"}]
    part = [{"k": "b", "v": 2}, {"k": "c", "error": "new"}, {"k": "a", "v": 3}, {"k": "d", "v": 4}]
    recs = merge_records([main, part], key=lambda r: r.get("k"))
    assert list(recs) == ["a", "b", "c", "d"]  # order of first appearance
    assert [recs[k].get("v", recs[k].get("error")) for k in recs] == [1, 2, "new", 4]


def test_dist_context_from_the_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert dist_context() == DistContext()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not dist_context().is_sharded
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="RANK is not set"):
        dist_context()
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(ConfigError, match="outside 0..2"):
        dist_context()
    monkeypatch.setenv("RANK", "2")
    ctx = dist_context()  # no rendezvous address: the ranks meet through files
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.barrier, ctx.is_main) == (2, 3, 2, None, False)
    assert ctx.device == "cpu"  # this machine has no GPU; with GPUs it is cuda:LOCAL_RANK


# ---------------------------------------------------------------------- the protocol


def _ranks(world: int):
    return [DistContext(rank=r, world_size=world) for r in range(world)]


def _launch(world, body, **kw):
    """Run ``body(run, ctx)`` on ``world`` threads, one per rank; return rank -> result or exception."""
    results: dict[int, object] = {}

    def target(ctx):
        try:
            results[ctx.rank] = body(ctx, **kw)
        except BaseException as exc:  # collected for the test
            results[ctx.rank] = exc

    threads = [threading.Thread(target=target, args=(ctx,)) for ctx in _ranks(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def _write_share(ctx, out, items, *, fail_after=None, prepare=None, merge_fail=False, timeout=20.0):
    merged: list = []
    with ShardedRun(out, ctx, timeout=timeout, poll=0.02) as run:
        run.start(prepare)
        with JsonlWriter(run.part) as w:
            for i, item in enumerate(shard_items(items, ctx.rank, ctx.world_size)):
                if fail_after is not None and ctx.rank == 1 and i == fail_after:
                    raise RuntimeError("CUDA out of memory (simulated)")
                w.write({"key": item})

        def merge(parts):
            if not parts:  # a single process wrote the output itself
                return
            if merge_fail:
                raise OSError("disk full (simulated)")
            recs = merge_records((read_jsonl(p) for p in parts), key=lambda r: r["key"])
            merged.extend(recs)
            with JsonlWriter(out) as w:
                w.write_many(recs[k] for k in items if k in recs)

        run.finish(merge, payload={"rank": ctx.rank})
        return {"merged": merged, "payloads": run.payloads}


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if ".rank" in p.name or ".shards" in p.name)


def test_three_ranks_write_parts_and_rank_0_merges_them(tmp_path):
    out = tmp_path / "out.jsonl"
    items = [f"s{i}" for i in range(10)]
    res = _launch(3, _write_share, out=out, items=items)
    assert not any(isinstance(r, BaseException) for r in res.values()), res
    assert [r["key"] for r in read_jsonl(out)] == items
    assert res[0]["payloads"] == [{"rank": 0}, {"rank": 1}, {"rank": 2}]
    assert res[1]["merged"] == [] and res[2]["merged"] == []
    assert _leftovers(tmp_path) == []  # parts and markers deleted after the merge


def test_a_failed_rank_stops_rank_0_with_its_error_and_keeps_the_parts(tmp_path):
    out = tmp_path / "out.jsonl"
    items = [f"s{i}" for i in range(8)]
    res = _launch(2, _write_share, out=out, items=items, fail_after=2)
    assert isinstance(res[1], RuntimeError)
    assert isinstance(res[0], ShardError)
    msg = str(res[0])
    assert "rank 1 of 2 failed: RuntimeError: CUDA out of memory (simulated)" in msg and "re-run" in msg
    assert not out.exists()  # nothing merged
    parts = {p.name: [r["key"] for r in read_jsonl(p)] for p in part_files(out)}
    assert parts == {
        "out.jsonl.rank0-of-2.part.jsonl": ["s0", "s2", "s4", "s6"],
        "out.jsonl.rank1-of-2.part.jsonl": ["s1", "s3"],
    }


def test_rank_0_failing_before_the_start_stops_the_others(tmp_path):
    def prepare():
        raise ConfigError("other settings (simulated)")

    res = _launch(3, _write_share, out=tmp_path / "out.jsonl", items=["a", "b"], prepare=prepare)
    assert isinstance(res[0], ConfigError)
    for r in (1, 2):
        assert isinstance(res[r], ShardError) and "rank 0 failed before the run started" in str(res[r])
        assert "ConfigError: other settings (simulated)" in str(res[r])


def test_rank_0_failing_in_the_merge_stops_the_others(tmp_path):
    res = _launch(2, _write_share, out=tmp_path / "out.jsonl", items=["a", "b", "c"], merge_fail=True)
    assert isinstance(res[0], OSError)
    assert isinstance(res[1], ShardError) and "rank 0 failed while finishing the run: OSError: disk full" in str(res[1])
    assert len(part_files(tmp_path / "out.jsonl")) == 2  # kept for the next run


def test_a_rank_that_never_comes_times_out_with_a_clear_message(tmp_path):
    out = tmp_path / "out.jsonl"
    t0 = time.monotonic()
    with pytest.raises(ShardError, match=r"waited 1 s for rank\(s\) \[1\] to finish.*VLMFIX_SHARD_TIMEOUT"):
        _write_share(DistContext(0, 2), out, ["a", "b"], timeout=1.0)
    assert time.monotonic() - t0 < 10


def test_a_stale_start_file_is_not_taken_for_this_launch(tmp_path):
    out = tmp_path / "out.jsonl"
    start = tmp_path / "out.jsonl.shards.json"
    start.write_text(json.dumps({"run": "old", "world_size": 2, "status": "running"}))
    old = time.time() - 3600
    os.utime(start, (old, old))  # written by a launch that ended before this process started
    with pytest.raises(ShardError, match="to start the run"):
        _write_share(DistContext(1, 2), out, ["a", "b"], timeout=0.5)
    assert not part_files(out)  # rank 1 wrote nothing without a start


def test_a_single_process_writes_the_output_itself(tmp_path):
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.rank1-of-2.done").write_text("{}")  # a stale marker is cleared
    res = _write_share(DistContext(), out, ["a", "b"])
    assert [r["key"] for r in read_jsonl(out)] == ["a", "b"]
    assert res["payloads"] == [{"rank": 0}]
    assert _leftovers(tmp_path) == []
