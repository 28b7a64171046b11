from distbert.cli import main

raise SystemExit(main())
