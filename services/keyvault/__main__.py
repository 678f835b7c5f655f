from services.keyvault.service import SERVICE
from tradeguard.service import main

raise SystemExit(main(SERVICE))
