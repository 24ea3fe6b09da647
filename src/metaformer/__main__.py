from metaformer.cli import main

raise SystemExit(main())
