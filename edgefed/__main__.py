import sys

from edgefed.apps.cli import main

sys.exit(main())
