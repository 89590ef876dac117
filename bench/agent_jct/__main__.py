import sys

from bench.agent_jct.run import main

sys.exit(main())
