"""imitation-audit: does a discriminator catch an imitator's incorrigible plan?

The ``audit`` package is the framework: trajectories, rollouts, the registry,
run directories and the command line. It knows no particular environment or
model; those register themselves by name (see :mod:`audit.registry`).
"""

__version__ = "0.1.0"
