from destfnd.cli import main

raise SystemExit(main())
