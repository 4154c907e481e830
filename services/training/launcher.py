"""``mlx.launch``, minus its busy loop: ``python -m forgellm.services.training.launcher ARGS``
takes mlx.launch's own arguments and runs mlx.launch's own ``main()``.

Why: mlx.launch (mlx 0.32) relays each rank's stdin with ``select(reads, [child_stdin], [],
1.0)``; a pipe with room is always writable, so every rank's relay thread spins, and so does
its main loop when its own stdin is at end of file. Measured on this 2-core machine during a
2-rank run: the launcher's threads took ~115 % of the 200 % CPU. Ranks of ours never read
stdin, so here the relay threads wait for output only (the write set is left out of their
``select``); everything else (hosts, ssh, hostfiles, backends, environment, killing ranks) is
mlx.launch's, unchanged. If mlx's launcher module is not where this expects it, mlx.launch runs
as it is.
"""

from __future__ import annotations

import select as _select
import sys


def _select_without_writers(reads, writes, errors, timeout=None):
    readable, _, broken = _select.select(reads, [], errors, timeout)
    return readable, [], broken


def main() -> int | None:
    import os

    from mlx._distributed_utils import launch

    if getattr(launch, "select", None) is _select.select:
        launch.select = _select_without_writers
    # Its main loop forwards this process's stdin to the ranks: at end of file (/dev/null, a
    # closed pipe) that select returns at once, forever. A pipe nobody writes makes it wait.
    idle_read, _idle_write = os.pipe()
    os.dup2(idle_read, 0)
    sys.argv[0] = "mlx.launch"
    return launch.main()


def available() -> bool:
    try:
        from mlx._distributed_utils import launch
    except ImportError:
        return False
    return callable(getattr(launch, "main", None))


if __name__ == "__main__":
    sys.exit(main())
