"""`python -m mtmoe.export`: see mtmoe.cli.export."""

from mtmoe.cli.export import main

if __name__ == "__main__":
    main()
