"""`python -m mtmoe.translate`: see mtmoe.cli.translate."""

from mtmoe.cli.translate import main

if __name__ == "__main__":
    main()
