from xdpnet.cli import main

raise SystemExit(main())
