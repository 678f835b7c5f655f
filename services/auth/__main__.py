from services.auth.service import SERVICE
from tradeguard.service import main

raise SystemExit(main(SERVICE))
