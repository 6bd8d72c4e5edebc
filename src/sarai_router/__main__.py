"""The ``sarai-router`` program (and ``python -m sarai_router``): its modules load with the
garbage collector paused.

Loading the command line builds thousands of objects (classes and their generated methods,
the config schema and its converter, click's commands) that live as long as the process,
and next to no garbage. Left on, the cyclic collector walks them every few hundred
allocations: 40-odd passes, about 10 ms of the 150 ms that ``route`` takes. So the program
loads its modules with the collector off, then freezes what they built (``gc.freeze``: the
collector never walks it again) and turns the collector back on before any command runs.
This is the program's choice, made here; importing ``sarai_router`` changes nothing.
"""

from __future__ import annotations

import gc


def main() -> None:
    """The ``sarai-router`` console script."""
    gc.disable()
    try:
        from .cli import main as run
    finally:
        gc.freeze()
        gc.enable()
    run()


if __name__ == "__main__":
    main()
