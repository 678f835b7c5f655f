import sys

from services.ratelimit.service import SERVICE, LimitsUnavailable
from tradeguard.service import main
from tradeguard.storage.redis import RedisUnavailable

try:
    code = main(SERVICE)
except (LimitsUnavailable, RedisUnavailable) as error:  # one line, no traceback: what to fix is in it
    print(f"ratelimit: {error}", file=sys.stderr)
    code = 2
raise SystemExit(code)
