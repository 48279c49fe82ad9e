"""`python -m launch`: same as the `pd` command."""

from launch.cli import main

raise SystemExit(main())
