import sys

from bench.replay.run import main

sys.exit(main())
