import sys

from services.ratelimit.service import SERVICE, LimitsUnavailable
from tradeguard.service import main
from tradeguard.storage.redis import RedisUnavailable

# What stops the service at start-up is one line, no traceback, saying what to fix.
try:
    code = main(SERVICE)
except LimitsUnavailable as error:
    print(f"ratelimit: {error}", file=sys.stderr)
    code = 2
except RedisUnavailable as error:  # its message carries the URL with the password masked
    print(
        f"ratelimit: the counters' Redis (TRADEGUARD_RATELIMIT_REDIS_URL) does not answer: {error}",
        file=sys.stderr,
    )
    code = 2
raise SystemExit(code)
