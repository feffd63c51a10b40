"""`python -m omx.node start|up ...`: what `omx node start` and `omx up` run."""

import sys

args = sys.argv[1:]
if args[:1] == ["up"]:
    from omx.node.up import main as up

    sys.exit(up(args[1:]))
from omx.node.server import main  # noqa: E402

if args[:1] == ["start"]:
    args = args[1:]
sys.exit(main(args))
