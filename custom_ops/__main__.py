"""``python -m nomic_export.custom_ops [--asan] [--force] [--verbose]``: build the op library, print its path."""

import argparse
import logging
import sys

from nomic_export.custom_ops import build
from nomic_export.errors import UserError

parser = argparse.ArgumentParser(prog="python -m nomic_export.custom_ops", description=__doc__)
parser.add_argument("--asan", action="store_true", help="build with AddressSanitizer (a separate library)")
parser.add_argument("--force", action="store_true", help="rebuild even if the cached library is current")
parser.add_argument("--verbose", action="store_true")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
try:
    print(build(verbose=args.verbose, force=args.force, asan=args.asan))
except UserError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
