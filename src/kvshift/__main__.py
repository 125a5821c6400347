"""`python -m kvshift ...` (and `torchrun -m kvshift train ...`) runs the command-line interface."""

from kvshift.cli import main

raise SystemExit(main())
