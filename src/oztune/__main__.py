import sys

from oztune.cli import main

sys.exit(main())
