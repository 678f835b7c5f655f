import sys

if sys.argv[1:2] == ["change-passphrase"]:
    from services.keyvault.passphrase_cmd import main as change_passphrase

    sys.exit(change_passphrase(sys.argv[2:]))

from services.keyvault.server import main

main()
