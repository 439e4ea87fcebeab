"""Allow ``python -m dicom_node``."""

import sys

from dicom_node.cli import main

if __name__ == "__main__":
    sys.exit(main())
