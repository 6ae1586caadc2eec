import sys

from .standalone.cli import EXIT_INTERRUPTED, main

try:
    code = main()
except KeyboardInterrupt:  # a Ctrl-C after the command's own handling (while it exits): no traceback
    code = EXIT_INTERRUPTED
sys.exit(code)
