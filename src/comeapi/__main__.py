from comeapi.cli import main

main()
