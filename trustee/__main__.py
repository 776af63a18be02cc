from trustee.run import main

raise SystemExit(main())
