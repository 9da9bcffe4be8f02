"""`python -m mtmoe.train`: see mtmoe.cli.train."""

from mtmoe.cli.train import main

if __name__ == "__main__":
    main()
