import sys

from fastmu.cli import main

sys.exit(main())
