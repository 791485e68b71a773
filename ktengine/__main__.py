import sys

from ktengine.cli import main

sys.exit(main())
