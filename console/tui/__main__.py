import sys

from omx.console.tui.launch import main

sys.exit(main())
