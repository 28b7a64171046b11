from distbert.cli.main import main

raise SystemExit(main())
