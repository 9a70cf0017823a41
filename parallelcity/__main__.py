from parallelcity.cli import main

raise SystemExit(main())
