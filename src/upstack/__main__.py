from upstack.cli import main

raise SystemExit(main())
