from trb.cli import main

main()
