"""`python -m sentinel.sim.worker --port N --profile-env FILE`: run one simulated worker."""

import sys

from sentinel.sim.worker.main import main

sys.exit(main())
