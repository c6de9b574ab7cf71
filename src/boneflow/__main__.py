"""`python -m boneflow` is the `boneflow` console script."""

from boneflow.cli import main

raise SystemExit(main())
