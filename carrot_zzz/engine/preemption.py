"""Preemption: SIGTERM (what a scheduler sends before it takes the machine back) or SIGINT during training.

    with StopSignals() as stop:                   the handlers of the two signals, for the epochs of a run
        ... trainer.stop = stop ...               the loop asks stop.requested at each update boundary

The first signal is only noted: the loop stops at the next update boundary (single process), or at the next log
line under torchrun, where the ranks agree on it in one small all_reduce (every rank stops at the same update),
writes a recovery checkpoint of that update (rank 0) and raises Preempted, whose message names the file and how to
continue (`--resume auto`). A second signal stops the process at once, as if no handler were installed.

Under torchrun, when another process of the run dies its collectives fail here; fit turns that error into
ProcessLost (engine.process.lost_process_message: which rank, and how to continue) while the handlers still hold
the SIGTERM torchrun sends the survivors, so the line is printed before the process ends.
"""
import logging
import os
import signal
import threading
from typing import Dict, Optional

import torch
import torch.distributed as dist

__all__ = ['StopSignals', 'Preempted', 'ProcessLost', 'agreed_stop']

_logger = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
    """Training stopped on a signal; the message says what was saved and how to continue."""


class ProcessLost(RuntimeError):
    """Under torchrun another process of the run died; the message names it and how to continue."""


class StopSignals:
    """Context manager that turns SIGTERM / SIGINT into a stop request (see module doc); outside the main thread
    (where Python cannot install handlers) it does nothing."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: Dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ''

    def _handle(self, signum, frame) -> None:
        if self.received is not None:                # the second signal: stop now, as without a handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        _logger.warning(f'{signal.Signals(signum).name} received: stopping at the next update with a recovery '
                        f'checkpoint (send it again to stop at once)')

    def __enter__(self) -> 'StopSignals':
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def agreed_stop(stop: Optional[StopSignals], distributed: bool, device: torch.device) -> bool:
    """Whether every rank stops now: the local request, or under DDP whether any rank has one (all_reduce MAX)."""
    local = stop is not None and stop.requested
    if not distributed:
        return local
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
