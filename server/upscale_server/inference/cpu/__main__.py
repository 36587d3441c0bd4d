"""``python -m upscale_server.inference.cpu``: build the Winograd kernel ahead of time (see ``kernel.py``)."""

from upscale_server.inference.cpu.kernel import main

raise SystemExit(main())
