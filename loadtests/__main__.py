"""``python -m loadtests``: see loadtests/run.py."""
import sys

from loadtests.run import main

sys.exit(main())
