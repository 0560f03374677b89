from upstack.commands.cli import main

raise SystemExit(main())
