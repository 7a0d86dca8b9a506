from metareason.cli import main

raise SystemExit(main())
