"""Load shapes, one per module: when each request is sent.

- :mod:`.concurrent`: closed loop, N clients back to back;
- :mod:`.rate`: open loop at R requests/s, constant / Poisson / gamma arrivals;
- :mod:`.replay`: a JSONL trace of timestamps and lengths;
- :mod:`.sweep`: rising rates until the server saturates;
- :mod:`.goodput`: the highest rate that meets an SLO.
"""

from modelkiln.bench.profiles.concurrent import ClosedLoop
from modelkiln.bench.profiles.rate import ARRIVALS, OpenLoop, arrival_offsets
from modelkiln.bench.profiles.replay import TraceRequest, load_trace

__all__ = ["ARRIVALS", "ClosedLoop", "OpenLoop", "TraceRequest", "arrival_offsets", "load_trace"]
