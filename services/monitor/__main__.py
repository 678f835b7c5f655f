import sys

from services.monitor.service import SERVICE, ConfigUnavailable
from tradeguard.service import main

# What stops the service at start-up is one line, no traceback, saying what to fix.
try:
    code = main(SERVICE)
except ConfigUnavailable as error:
    print(f"monitor: {error}", file=sys.stderr)
    code = 2
except ValueError as error:  # the kill switch's credentials file refused (permissions, shape)
    print(f"monitor: {error}", file=sys.stderr)
    code = 2
raise SystemExit(code)
