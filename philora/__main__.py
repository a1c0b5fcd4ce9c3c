from philora.cli import main

raise SystemExit(main())
