"""A state machine with optimistic concurrency: moving money between two balances.

Each account is a state whose ``balance`` annotation holds its money. A transfer changes both
balances in ONE commit, so either both new versions are stored or neither is. The commit
expects each account to be at the rev the transfer read; if anyone committed an account in
the meantime, the whole commit fails with ``RevMismatchError`` naming that account, and the
transfer reloads both accounts by id and tries again with fresh numbers.

1. A transfer races with a deposit: the first attempt conflicts, the retry succeeds.
2. Ten transfers in both directions run concurrently, each retried until it commits; the
   total balance is the same before and after.

Run it with ``python examples/money_transfer.py [STORE_URL]``. Without a URL it uses a fresh
SQLite file in a temporary directory, deleted at the end. A given store must not hold the
``alice``/``bob`` accounts yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import flowstate as fs

OPENING = {"alice": 100, "bob": 50}
DEPOSIT = 50
# (from, to, amount): small enough that no order of execution can overdraw an account, so the
# final balances do not depend on which transfer wins which race.
CONCURRENT = [
    ("alice", "bob", 7),
    ("bob", "alice", 3),
    ("alice", "bob", 10),
    ("bob", "alice", 8),
    ("alice", "bob", 1),
    ("alice", "bob", 4),
    ("bob", "alice", 9),
    ("bob", "alice", 2),
    ("alice", "bob", 6),
    ("bob", "alice", 5),
]


@dataclass
class Report:
    """What main() observed, for readers and tests."""

    opening_total: int = 0
    deposits: int = 0
    balances: dict[str, int] = field(default_factory=dict)
    conflicts: int = 0  # failed commit attempts that were retried
    attempts: list[int] = field(default_factory=list)  # per concurrent transfer

    @property
    def total(self) -> int:
        return sum(self.balances.values())


def balance(ctx: fs.StateCtx) -> int:
    return int(ctx.current.annotations["balance"])


def set_balance(ctx: fs.StateCtx, amount: int) -> None:
    ctx.current.annotations["balance"] = str(amount)


async def load(engine: fs.Engine, *ids: str) -> list[fs.StateCtx]:
    """Fresh ctxs holding the latest version of each account (their revs are what we expect)."""
    ctxs = [fs.StateCtx() for _ in ids]
    await engine.do(*(fs.get_state_by_id(ctx, i) for ctx, i in zip(ctxs, ids, strict=True)))
    return ctxs


async def transfer(
    engine: fs.Engine,
    report: Report,
    src_id: str,
    dst_id: str,
    amount: int,
    *,
    verbose: bool = False,
    before_commit: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Move ``amount`` from one account to the other; return how many attempts it took."""
    name = f"transfer {src_id}->{dst_id} {amount}"
    attempt = 0
    while True:
        attempt += 1
        # Always start from what the store holds now: a retry that reused the stale ctxs
        # would conflict forever, and a decision made on old balances would be wrong.
        src, dst = await load(engine, src_id, dst_id)
        if verbose:
            print(
                f"  {name}: read {src_id}={balance(src)} (rev {src.current.rev}),"
                f" {dst_id}={balance(dst)} (rev {dst.current.rev})"
            )
        if balance(src) < amount:
            raise ValueError(f"{name}: insufficient funds")
        set_balance(src, balance(src) - amount)
        set_balance(dst, balance(dst) + amount)
        if before_commit is not None and attempt == 1:
            await before_commit()
        # Real code would do other I/O here; yielding lets the concurrent transfers read the
        # same revs, which is what makes them race.
        await asyncio.sleep(0)
        try:
            # Both accounts in one commit: all-or-nothing, checked against the revs we read.
            await engine.do(fs.commit(fs.park(src), fs.park(dst)))
        except fs.RevMismatchError as err:
            report.conflicts += 1
            if verbose:
                print(f"  {name}: rev mismatch on {', '.join(err.ids)}, reloading and retrying")
            continue
        if verbose:
            print(f"  {name}: committed {src_id}={balance(src)} {dst_id}={balance(dst)}")
        return attempt


@contextlib.contextmanager
def store(url: str | None) -> Iterator[str]:
    """The given store URL, or a fresh SQLite file in a temporary directory."""
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="flowstate-") as tmp:
        yield "sqlite:///" + (Path(tmp) / "money_transfer.db").as_posix()


async def main(store_url: str | None = None) -> Report:
    """Run both parts; return balances, totals and how many conflicts were retried."""
    report = Report(opening_total=sum(OPENING.values()))
    with store(store_url) as url:
        print(f"store: {url}")
        async with fs.Engine(fs.open_driver(url)) as engine:
            accounts = [
                fs.StateCtx(current=fs.State(id=name, annotations={"balance": str(amount)}))
                for name, amount in OPENING.items()
            ]
            # Parked: an account is data, not work, so nothing is owed to any flow.
            await engine.do(fs.commit(*(fs.park(ctx) for ctx in accounts)))
            print("opening balances:", ", ".join(f"{n}={a}" for n, a in OPENING.items()))

            print("1. a transfer races with a deposit to alice")

            async def deposit() -> None:
                # Another actor updates alice after the transfer read her, before it commits.
                (alice,) = await load(engine, "alice")
                set_balance(alice, balance(alice) + DEPOSIT)
                await engine.do(fs.commit(fs.park(alice)))
                report.deposits += DEPOSIT
                print(
                    f"  meanwhile: deposit {DEPOSIT} to alice committed (rev {alice.current.rev})"
                )

            await transfer(engine, report, "alice", "bob", 30, verbose=True, before_commit=deposit)

            print(f"2. {len(CONCURRENT)} concurrent transfers, each retried until it commits")
            report.attempts = await asyncio.gather(
                *(transfer(engine, report, src, dst, amount) for src, dst, amount in CONCURRENT)
            )
            for (src, dst, amount), attempts in zip(CONCURRENT, report.attempts, strict=True):
                print(f"  {src}->{dst} {amount:>2}: committed on attempt {attempts}")

            for ctx in await load(engine, *OPENING):
                report.balances[ctx.current.id] = balance(ctx)

    expected = report.opening_total + report.deposits
    verdict = "conserved" if report.total == expected else "NOT conserved"
    print("closing balances:", ", ".join(f"{n}={b}" for n, b in report.balances.items()))
    print(
        f"total {report.total} = opening {report.opening_total} + deposit {report.deposits}:"
        f" {verdict} ({report.conflicts} conflicting commits were retried)"
    )
    return report


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
