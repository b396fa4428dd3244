"""``stamen bench``: stamen measured against the compute floor, plain Flower and its goals.

Each scenario is one module with a ``run(ctx)`` function, registered in
:data:`simulations.bench.runner.SCENARIOS`; the runner times it, adds the machine and the
load average, prints its one-line result and appends one object to ``DIR/bench.json``.
stamen itself is always run as ``stamen simulate`` in a child process, so every
measured run is a clean process tree, exactly as a user runs it.
"""
