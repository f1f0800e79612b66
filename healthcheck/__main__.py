from healthcheck.check import main

raise SystemExit(main())
