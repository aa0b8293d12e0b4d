"""The scoring run's Coordinator (issue 3), a job board between the driver and the scoring actors: jobs
go out once and in order, a waiting actor wakes when work arrives, a restarted actor's jobs go back on
the board, results come back in the order the driver asks for, and a failure reaches every waiter.
A plain asyncio test: the class's logic does not need Ray."""

from __future__ import annotations

import asyncio

import numpy as np

from idtl_ray.errors import InputError
from idtl_ray.scoring import Coordinator


def run(coro):
    return asyncio.run(coro)


def test_jobs_go_out_once_in_order_and_results_come_back_in_the_drivers_order():
    async def main():
        c = Coordinator()
        assert await c.register("A", "a", "ta") and await c.register("B", "b", "tb")
        idle = asyncio.create_task(c.claim("b", "tb"))      # nothing on the board yet: B waits
        await asyncio.sleep(0.01)
        assert not idle.done()
        await c.add({("gradient", 0): ("gradient", "x0"), ("gradient", 1): ("gradient", "x1")})
        assert await asyncio.wait_for(idle, 5) == (("gradient", 0), ("gradient", "x0"))
        assert await c.claim("a", "ta") == (("gradient", 1), ("gradient", "x1"))
        first = asyncio.create_task(c.take(("gradient", 0)))
        await c.deliver(("gradient", 1), np.array([2.0]))  # out of order: kept until asked for
        await asyncio.sleep(0.01)
        assert not first.done()
        await c.deliver(("gradient", 0), np.array([1.0]))
        assert (await asyncio.wait_for(first, 5))[1][0] == 1.0
        assert (await c.take(("gradient", 1)))[1][0] == 2.0
        assert c._results == {} and c._jobs == {}       # taken results are forgotten
        waiting = [asyncio.create_task(c.claim(a, "t" + a)) for a in "ab"]
        await c.put(["s_ref"])                          # s is out: claimers stop, getters get it
        assert await asyncio.gather(*waiting) == [None, None]
        assert await c.get() == ("ok", ["s_ref"])
        assert len(await c.actors()) == 2

    run(main())


def test_a_restarted_actor_gives_back_its_job_and_a_late_copy_is_ignored():
    async def main():
        c = Coordinator()
        await c.register("A", "a", "ta"), await c.register("B", "b", "tb")
        await c.add({("solve",): ("solve", "sub")})
        assert (await c.claim("a", "ta"))[0] == ("solve",)
        blocked = asyncio.create_task(c.claim("b", "tb"))   # the only job is held by A
        await asyncio.sleep(0.01)
        assert not blocked.done()
        await c.register("A", "a", "ta2")             # Ray restarted A: its job is free again
        assert (await asyncio.wait_for(blocked, 5))[0] == ("solve",)
        await c.deliver(("solve",), "from B")
        await c.deliver(("solve",), "from A, too late")
        assert await c.take(("solve",)) == ("ok", "from B")

    run(main())


def test_a_claim_left_waiting_by_a_crashed_process_takes_no_job():
    async def main():
        c = Coordinator()
        await c.register("A", "a", "first")
        stale = asyncio.create_task(c.claim("a", "first"))   # A's first process waits for work, then dies
        await asyncio.sleep(0.01)
        await c.register("A", "a", "second")                 # Ray restarts A with the same id
        fresh = asyncio.create_task(c.claim("a", "second"))
        await asyncio.sleep(0.01)
        await c.add({("product", 0, 0): ("product",)})
        assert await asyncio.wait_for(stale, 5) is None      # the dead process's claim gets nothing
        assert (await asyncio.wait_for(fresh, 5))[0] == ("product", 0, 0)
        assert c._held == {("product", 0, 0): "a"}
        assert await c.count() == 1

    run(main())


def test_a_failure_reaches_every_waiter_and_refuses_newcomers():
    async def main():
        c = Coordinator()
        await c.register("A", "a", "ta")
        result = asyncio.create_task(c.take(("gradient", 0)))
        s = asyncio.create_task(c.get())
        job = asyncio.create_task(c.claim("a", "ta"))
        await asyncio.sleep(0.01)
        await c.fail(InputError("labels out of range (test)"))
        status, err = await asyncio.wait_for(result, 5)
        assert status == "error" and isinstance(err, InputError) and "out of range" in str(err)
        assert await asyncio.wait_for(s, 5) == ("error", "labels out of range (test)")
        assert await asyncio.wait_for(job, 5) is None
        assert await c.register("B", "b", "tb") is False
        await c.fail("a second error")                # the first cause is kept
        return await c.take(("gradient", 0))

    status, err = run(main())
    assert status == "error" and isinstance(err, InputError)


def test_fail_accepts_text():
    async def main():
        c = Coordinator()
        await c.fail("the solve on the driver failed")
        return await c.take(("solve",))

    status, err = run(main())
    assert status == "error" and "solve on the driver failed" in str(err)
