"""``python -m upscale_server.inference.cpu``: which Winograd kernel variant loads here and why (``kernel.py``)."""

from upscale_server.inference.cpu.kernel import main

raise SystemExit(main())
