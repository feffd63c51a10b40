"""`python -m omx.node [start] ...`: what `omx node start` runs."""

import sys

from omx.node.server import main

args = sys.argv[1:]
if args[:1] == ["start"]:
    args = args[1:]
sys.exit(main(args))
