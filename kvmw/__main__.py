import sys

from kvmw.cli import main

sys.exit(main())
