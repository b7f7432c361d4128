"""`python -m qlorakit ...` (also what `torchrun -m qlorakit` runs)."""

from qlorakit.cli import main

if __name__ == "__main__":  # importing the module (e.g. a package walker) must not start a run
    raise SystemExit(main())
