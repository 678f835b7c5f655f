from services.audit.service import SERVICE
from tradeguard.service import main

raise SystemExit(main(SERVICE))
