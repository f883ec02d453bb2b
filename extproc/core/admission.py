"""Giving back what an admitted call holds: when the decision fails after admitting it, when its
response has been read, or when its end was never seen (the sweeper, after its deadline).

Whoever closes the call in the in-flight store first releases it; the others find it closed and do
nothing, so a slot is never left twice nor a reservation settled twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from extproc.core.inflight import InFlightStore, OpenCall
from extproc.quota.engine import QuotaEngine
from extproc.quota.plan import Estimate

if TYPE_CHECKING:
    from extproc.core.bulkhead import LocalBulkhead, SharedBulkhead
    from extproc.policy.compiled import PolicySet

log = logging.getLogger(__name__)
SWEEP_INTERVAL_S = 1.0


async def release(call: OpenCall, *, quota: QuotaEngine, bulkhead: LocalBulkhead | SharedBulkhead,
                  used: Estimate | None) -> None:
    """Give back the call's slot and settle its reservation on ``used`` (None: refund it whole)."""
    if call.slot:
        await bulkhead.leave(call.scope, call.call_id)
    if call.reservation is not None:
        try:
            if used is None:
                await quota.refund(call.reservation)
            else:
                await quota.settle(call.reservation, used)
        except Exception:  # the backstop must go on with the other calls
            log.exception("could not release the reservation of call %s", call.call_id)


async def sweep_once(inflight: InFlightStore, *, quota: QuotaEngine, bulkhead: LocalBulkhead | SharedBulkhead,
                     policy: Callable[[], PolicySet], now: float | None = None) -> int:
    """Release every call past its deadline; how many there were."""
    due = await inflight.expired(time.time() if now is None else now)
    prices = policy().prices
    for call in due:
        # Nothing says how far it got: what was sent is charged, the reserved output is given back.
        price = prices.lookup(call.provider, call.model)
        cost = price.micro_usd(call.input_estimate, 0) if price is not None else 0
        await release(call, quota=quota, bulkhead=bulkhead, used=Estimate(call.input_estimate, 0, cost))
        log.info("call %s of %s/%s ended unseen (caller gone or response lost): its slot and reservation "
                 "were released after its deadline", call.call_id, call.namespace, call.service)
    return len(due)


async def sweep_forever(inflight: InFlightStore, *, quota: QuotaEngine, bulkhead: LocalBulkhead | SharedBulkhead,
                        policy: Callable[[], PolicySet], on_swept: Callable[[int], None] | None = None,
                        interval_s: float = SWEEP_INTERVAL_S) -> None:
    """The backstop task: never dies on an error, only when cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            swept = await sweep_once(inflight, quota=quota, bulkhead=bulkhead, policy=policy)
            if swept and on_swept is not None:
                on_swept(swept)
        except Exception:
            log.exception("in-flight sweep failed; retrying")
