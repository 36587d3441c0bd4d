from upscale_server.cli import main

raise SystemExit(main())
