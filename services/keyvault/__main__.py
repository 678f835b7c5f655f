from services.keyvault.server import main

main()
