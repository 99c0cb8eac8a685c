import sys

from aigckit.cli import main

sys.exit(main())
