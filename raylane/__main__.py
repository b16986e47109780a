import sys

from raylane.cli import main

sys.exit(main())
