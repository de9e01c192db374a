"""When to send: open-loop arrival times. Closed-loop (fixed concurrency) needs none.

Inter-arrival gaps are gamma-distributed with shape `burstiness` and mean 1 / rate, as in
`vllm bench serve`: burstiness 1 is a Poisson process, below 1 burstier, above 1 more regular.
A ramp changes the rate linearly from `start` to `end` requests/s over the run.
"""

from __future__ import annotations

import random


def gamma_arrivals(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    return ramp_arrivals(num, rate, rate, burstiness, seed)


def ramp_arrivals(num: int, start: float, end: float, burstiness: float, seed: int) -> list[float]:
    """Request i is sent at the rate start + (end - start) * i / num."""
    if start <= 0 or end <= 0 or burstiness <= 0:
        raise ValueError("request rates and burstiness must be > 0")
    rng = random.Random(seed)
    t, times = 0.0, []
    for i in range(num):
        times.append(t)
        rate = start + (end - start) * i / max(num - 1, 1)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return times
