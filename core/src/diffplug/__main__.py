"""``python -m diffplug`` (and so ``torchrun ... -m diffplug``)."""

from diffplug.cli import main

if __name__ == "__main__":
    main()
