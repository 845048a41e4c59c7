import sys

from kshrink.cli import main

sys.exit(main())
