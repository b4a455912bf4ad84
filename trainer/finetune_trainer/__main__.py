"""`python -m finetune_trainer run job.yaml` — the entrypoint KubeRay runs inside the cluster."""

import sys

from .cli import main

sys.exit(main())
