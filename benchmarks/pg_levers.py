"""What the PostgreSQL commit levers would give, measured through the whole engine.

    .venv/bin/python -m benchmarks.pg_levers [--seconds 2] [--rounds 2]

A prototype, not the driver: :class:`LeverDriver` subclasses :class:`flowstate.PostgresDriver`
and, per variant, changes how a commit made only of transit/park sub-commands is sent:

* ``driver``: unchanged (BEGIN; ``flowstate_alloc_revs``; ``flowstate_commit``; COMMIT; and
  asyncpg's reset query when the connection goes back to the pool);
* ``no-reset``: a pool without the reset query;
* ``one-statement``: one autocommit call of a function that allocates the revs and commits
  (the client stages the states with placeholder revs -1, -2, ... and shifts them after), and
  no reset;
* ``one-statement-no-notify``: the same without ``pg_notify`` inside the transaction.

Each variant runs ``engine.do(commit(park(ctx)))`` with 1, 4 and 16 workers on a fresh schema,
and checks that the revs it reports are the stored ones and that a stale commit conflicts.
Not for production: without the reset query, a statement failing between the advisory lock
and its unlock would leave the lock held on that pooled connection.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from typing import Any

import asyncpg

import flowstate as fs
from benchmarks.common import PG_DSN, pg_drop_schema
from flowstate.clock import to_millis
from flowstate.commands import CommitCmd, NoopCmd, ParkCmd, TransitCmd
from flowstate.drivers.base import process_commit, run_commit_async
from flowstate.drivers.sqljson import dumps_map as _dumps
from flowstate.state import State

VARIANTS = ["driver", "no-reset", "one-statement", "one-statement-no-notify"]

COMMIT_ONE = """
CREATE OR REPLACE FUNCTION bench_commit_one(
    ids text[], expected bigint[], committed_at bigint[], annotations jsonb[], labels jsonb[],
    tos text[], transition_annotations jsonb[], channel text
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n integer := array_length(ids, 1);
    first bigint := flowstate_alloc_revs(n);
    revs bigint[];
    conflicts text[];
BEGIN
    SELECT array_agg(first + g - 1 ORDER BY g) INTO revs FROM generate_series(1, n) AS g;
    conflicts := {commit_fn}(ids, expected, revs, committed_at, annotations, labels, tos,
                             transition_annotations, channel);
    IF coalesce(array_length(conflicts, 1), 0) > 0 THEN
        RAISE EXCEPTION 'conflict' USING ERRCODE = 'FS001',
            DETAIL = array_to_string(conflicts, ',');
    END IF;
    RETURN first;
END $$;
"""


class _Staging:
    """A commit transaction that only stages states, with placeholder revs -1, -2, ..."""

    def __init__(self) -> None:
        self.staged: list[tuple[State, int]] = []

    async def commit_state(self, state: State, expected_rev: int) -> bool:
        state.rev = -(len(self.staged) + 1)
        self.staged.append((state, expected_rev))
        return True


def _simple(cmd: CommitCmd) -> bool:
    """Only transit/park sub-commands, each ctx once: nothing but state rows to write."""
    seen: set[int] = set()
    for sub in cmd.commands:
        if isinstance(sub, NoopCmd):
            continue
        if not isinstance(sub, TransitCmd | ParkCmd) or id(sub.ctx) in seen:
            return False
        seen.add(id(sub.ctx))
    return True


class LeverDriver(fs.PostgresDriver):
    def __init__(self, *args: Any, variant: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.variant = variant

    async def _open(self) -> None:
        await super()._open()
        if self.variant == "driver":
            return
        assert self._pool is not None
        await self._pool.close()

        async def no_reset(conn: asyncpg.Connection) -> None:
            return None

        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self._min_size,
            max_size=self._max_size,
            server_settings=self._settings(),
            reset=no_reset,
        )
        if not self.variant.startswith("one-statement"):
            return
        async with self._pool.acquire() as conn:
            commit_fn = "flowstate_commit"
            if self.variant.endswith("no-notify"):
                src = await conn.fetchval("SELECT pg_get_functiondef('flowstate_commit'::regproc)")
                src = re.sub(r"PERFORM pg_notify\([^;]*\);", "", src)
                await conn.execute(
                    src.replace(f"{self.schema}.flowstate_commit", "bench_commit_no_notify")
                )
                commit_fn = "bench_commit_no_notify"
            await conn.execute(COMMIT_ONE.replace("{commit_fn}", commit_fn))

    async def commit(self, cmd: CommitCmd) -> None:
        if not self.variant.startswith("one-statement") or not _simple(cmd):
            await super().commit(cmd)
            return
        tx = _Staging()
        outcome = await run_commit_async(process_commit(cmd, self.clock.now()), tx)  # type: ignore[arg-type]
        states = [s for s, _ in tx.staged]
        if states:
            assert self._pool is not None
            async with self._pool.acquire() as conn:
                try:
                    first = await conn.fetchval(
                        "SELECT bench_commit_one($1, $2, $3, $4, $5, $6, $7, $8)",
                        [s.id for s in states],
                        [e for _, e in tx.staged],
                        [to_millis(s.committed_at) if s.committed_at else 0 for s in states],
                        [_dumps(s.annotations) for s in states],
                        [_dumps(s.labels) for s in states],
                        [s.transition.to for s in states],
                        [_dumps(s.transition.annotations) for s in states],
                        self.channel,
                    )
                except asyncpg.PostgresError as exc:
                    if getattr(exc, "sqlstate", "") == "FS001":
                        raise fs.RevMismatchError(str(exc.detail).split(",")) from None
                    raise

            def real(rev: int) -> int:
                return first - rev - 1 if rev < 0 else rev

            for s in states:
                s.rev = real(s.rev)
            for _, work in outcome.pairs:
                work.current.rev = real(work.current.rev)
                work.committed.rev = real(work.committed.rev)
            outcome.max_rev = first + len(states) - 1
        outcome.apply()
        if outcome.max_rev:
            self.notifier.notify(outcome.max_rev)


async def measure(variant: str, conc: int, seconds: float) -> float:
    schema = f"bench_levers_{variant.replace('-', '_')}_{conc}"
    await pg_drop_schema(schema)
    driver = LeverDriver(PG_DSN, schema=schema, max_size=max(10, conc), variant=variant)
    try:
        async with fs.Engine(driver) as eng:
            ctxs = []
            for w in range(conc):
                ctx = fs.StateCtx(current=fs.State(id=f"w{w}"))
                await eng.do(fs.commit(fs.park(ctx)))
                ctxs.append(ctx)
            done = 0
            end = time.perf_counter() + seconds

            async def worker(ctx: fs.StateCtx) -> None:
                nonlocal done
                while time.perf_counter() < end:
                    await eng.do(fs.commit(fs.park(ctx)))
                    done += 1

            await asyncio.gather(*(worker(c) for c in ctxs))
            stored = fs.StateCtx()
            await eng.do(fs.get_state_by_id(stored, "w0"))
            if stored.current.rev != ctxs[0].committed.rev:
                raise RuntimeError(f"{variant}: rev {ctxs[0].committed.rev} is not the stored one")
            stale = stored.copy()
            stale.committed.rev -= 1
            try:
                await eng.do(fs.commit(fs.park(stale)))
                raise RuntimeError(f"{variant}: a stale commit did not conflict")
            except fs.RevMismatchError:
                pass
    finally:
        await pg_drop_schema(schema)
    return done / seconds


async def run(seconds: float, rounds: int) -> None:
    print(f"{'variant':<26}" + "".join(f"{f'c={c}':>10}" for c in (1, 4, 16)), flush=True)
    for r in range(rounds):
        for variant in VARIANTS:
            rates = [await measure(variant, c, seconds) for c in (1, 4, 16)]
            print(
                f"{variant + f' ({r + 1})':<26}" + "".join(f"{x:>10,.0f}" for x in rates),
                flush=True,
            )


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pg_levers", description=__doc__)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    asyncio.run(run(args.seconds, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
