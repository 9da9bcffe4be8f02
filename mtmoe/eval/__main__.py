"""`python -m mtmoe.eval`: see mtmoe.cli.eval."""

from mtmoe.cli.eval import main

if __name__ == "__main__":
    main()
