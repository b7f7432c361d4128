"""`python -m qlorakit ...` (also what `torchrun -m qlorakit` runs)."""

from qlorakit.cli import main

raise SystemExit(main())
