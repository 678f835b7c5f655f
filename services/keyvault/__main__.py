import sys

from services.keyvault import migrate_cmd, passphrase_cmd
from services.keyvault.server import main

COMMANDS = {"change-passphrase": passphrase_cmd.main, "migrate-root": migrate_cmd.main}

if sys.argv[1:2] and sys.argv[1] in COMMANDS:
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
main()
