import sys

from loratrf.experiments.cli import main

sys.exit(main())
