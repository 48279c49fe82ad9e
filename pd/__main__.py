"""`python -m pd`: same as the `pd` command.

This file is only the entry point; it is the one place in pd/ allowed to import launch/ (the library code in
pd/ never depends on launch/).
"""

from launch.cli import main

raise SystemExit(main())
