"""Allow ``python -m moeharden``."""

from moeharden.cli import main

if __name__ == "__main__":
    main()
