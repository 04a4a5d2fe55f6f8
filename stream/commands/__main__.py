from stream.commands import main

raise SystemExit(main())
