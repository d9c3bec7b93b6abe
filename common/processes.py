"""Which process this is, and waiting for the others: the same calls with or without an accelerate ``Accelerator``.

Library functions take ``accelerator=None`` for one process; with several, every process calls the same function,
takes its share of the work by rank, and meets the others at :func:`barrier` before reading what they wrote.
"""

from __future__ import annotations


def rank_world(accelerator) -> tuple[int, int]:
    """This process's index and the process count (0, 1 without an accelerator)."""
    return (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)


def is_main(accelerator) -> bool:
    """Whether this process writes what all of them computed (always, without an accelerator)."""
    return accelerator is None or accelerator.is_main_process


def barrier(accelerator) -> None:
    """Wait until every process gets here (nothing to wait for without an accelerator)."""
    if accelerator is not None:
        accelerator.wait_for_everyone()
