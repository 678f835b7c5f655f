from services.trading.server import main

main()
